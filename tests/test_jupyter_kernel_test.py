"""Issue 4: the Jupyter project's kernel conformance suite (jupyter_kernel_test) against the
`forkvm` kernelspec. The suite starts one kernel for the class in setUpClass; the class-level
usefixtures below makes pytest build the template and point FORKVM_RUNTIME_DIR at the test
daemon (session fixtures) before setUpClass runs."""

from __future__ import annotations

import os

import jupyter_kernel_test as jkt
import pytest
from jupyter_client.manager import start_new_kernel

from tests.jupyter_support import KERNEL_START_TIMEOUT_S


@pytest.mark.slow
@pytest.mark.usefixtures("forkvm_template")
class ForkvmKernelTests(jkt.KernelTests):
    kernel_name = "forkvm"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"

    completion_samples = [
        {"text": "zi", "matches": {"zip"}},
        {"text": "import nump", "matches": {"numpy"}},
    ]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]

    code_page_something = "zip?"
    code_generate_error = "raise ValueError('forkvm test error')"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
        {"code": "import numpy; int(numpy.arange(10).sum())", "result": "45"},
    ]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))", "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))", "mime": "text/latex"},
    ]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    @classmethod
    def setUpClass(cls) -> None:
        assert os.environ.get("FORKVM_RUNTIME_DIR"), "the test daemon's runtime directory must be set"
        # As the base class does, with a start-up budget for emulated VMs on a shared host.
        cls.km, cls.kc = start_new_kernel(kernel_name=cls.kernel_name, startup_timeout=KERNEL_START_TIMEOUT_S)
