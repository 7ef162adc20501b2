"""The CLI's signal handlers (cli/main.py): raise where the interrupted code can take an
exception; inside an import, a finaliser or JAX's gc callback, re-send the signal 50 ms later."""
import signal
import sys
import time

import pytest

from salt.cli import main


def _frame_in_del():
    frames = []

    class Finalised:
        def __del__(self):
            frames.append(sys._getframe())

    Finalised()
    return frames[0]


def _frame_in_import(tmp_path, monkeypatch):
    (tmp_path / "salt_probe_module.py").write_text("import sys\nFRAME = sys._getframe()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "salt_probe_module", raising=False)
    import salt_probe_module
    return salt_probe_module.FRAME


def _xla_gc_callback():  # the name of JAX's callback
    return sys._getframe()


def test_where_an_exception_cannot_be_taken(tmp_path, monkeypatch):
    assert main._cannot_take_an_exception(_frame_in_del())
    assert main._cannot_take_an_exception(_frame_in_import(tmp_path, monkeypatch))
    assert main._cannot_take_an_exception(_xla_gc_callback())
    assert not main._cannot_take_an_exception(sys._getframe())


def test_handler_raises_or_resends(tmp_path, monkeypatch):
    handler = main._raising(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGUSR1, sys._getframe())
    received = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        assert handler(signal.SIGUSR1, _frame_in_import(tmp_path, monkeypatch)) is None  # no raise
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert received == [signal.SIGUSR1]
