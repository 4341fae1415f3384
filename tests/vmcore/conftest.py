import os

import pytest

from vmcore.kvm import kick


@pytest.fixture(scope="session", autouse=True)
def _kick_handler():
    # vCPU threads are kicked with a signal whose handler must come from the main thread.
    kick.install()


@pytest.fixture(scope="session")
def kvm_available():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable by this user")
