import signal

import pytest


@pytest.fixture(autouse=True)
def keep_sigint_handler():
    """Tests that run a script's main in this process (runpy) let it install its Ctrl-C handler: put pytest's back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)
