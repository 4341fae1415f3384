"""Issue 4: `jupyter nbconvert --execute` runs a notebook in a forkvm kernel: plain results,
streams, an error that does not stop the run (--allow-errors), and rich display output."""

from __future__ import annotations

import base64
import re
import struct
import subprocess
import zlib
from pathlib import Path

import nbformat
import pytest

from tests.jupyter_support import CELL_TIMEOUT_S, KERNEL_START_TIMEOUT_S, forkvm_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forkvm_template")]


def tiny_png(width: int = 3, height: int = 2) -> bytes:
    """A valid RGB PNG made by hand (no imaging library in the loop)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes([255, 0, 0, 0, 255, 0, 0, 0, 255][: 3 * width]) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_nbconvert_execute_notebook(tmp_path: Path) -> None:
    png = tiny_png()
    cells = [
        "import numpy as np\nnp.arange(10).sum()",
        "print('hello from', 'forkvm')\nprint(6 * 7)",
        "1 / 0",
        "from IPython.display import HTML, display\ndisplay(HTML('<b>bold forkvm</b>'))",
        f"from IPython.display import Image\nImage(data={png!r})",
        "after_error = 'still running'\nafter_error",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in cells])
    nb.metadata["kernelspec"] = {"name": "forkvm", "display_name": "Python 3 (forkvm)", "language": "python"}
    source = tmp_path / "demo.ipynb"
    nbformat.write(nb, source)

    result = subprocess.run(
        ["jupyter", "nbconvert", "--to", "notebook", "--execute", "--allow-errors",
         "--ExecutePreprocessor.kernel_name=forkvm",
         f"--ExecutePreprocessor.timeout={CELL_TIMEOUT_S}",
         f"--ExecutePreprocessor.startup_timeout={KERNEL_START_TIMEOUT_S}",
         "--output", "executed.ipynb", str(source)],
        capture_output=True, text=True, env=forkvm_env(), cwd=tmp_path,
        timeout=KERNEL_START_TIMEOUT_S + len(cells) * CELL_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    outs = [cell.outputs for cell in executed.cells]
    counts = [cell.execution_count for cell in executed.cells]
    assert counts == [1, 2, 3, 4, 5, 6], counts

    # numpy
    assert [o.output_type for o in outs[0]] == ["execute_result"]
    assert outs[0][0].data["text/plain"] in ("45", "np.int64(45)")
    # printing
    assert [(o.output_type, o.name) for o in outs[1]] == [("stream", "stdout")]
    assert outs[1][0].text == "hello from forkvm\n42\n"
    # the exception is recorded, and the run went on
    assert [o.output_type for o in outs[2]] == ["error"]
    assert outs[2][0].ename == "ZeroDivisionError"
    assert "division by zero" in outs[2][0].evalue
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(outs[2][0].traceback))
    assert "1 / 0" in traceback and "ZeroDivisionError" in traceback, traceback
    # rich output: HTML through display(), PNG as the cell's result
    assert [o.output_type for o in outs[3]] == ["display_data"]
    assert outs[3][0].data["text/html"] == "<b>bold forkvm</b>"
    assert [o.output_type for o in outs[4]] == ["execute_result"]
    assert base64.b64decode(outs[4][0].data["image/png"]) == png
    assert outs[5][0].data["text/plain"] == "'still running'"
