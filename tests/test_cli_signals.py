"""The CLI's signal handlers (cli/main.py): raise where the interrupted code can take an
exception; inside a module's top-level code (an import, native or not), a finaliser or JAX's gc
callback, re-send the signal 50 ms later."""
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


def _frame_in_module_code_run_natively():
    """A module's top-level code run without importlib on the stack (as an extension module's
    native set-up may run it): a ``<module>`` frame of a module that is not ``__main__``."""
    namespace = {"__name__": "salt_probe_native", "sys": sys}
    exec(compile("FRAME = sys._getframe()", "salt_probe_native.py", "exec"), namespace)
    return namespace["FRAME"]


def test_where_an_exception_cannot_be_taken(tmp_path, monkeypatch):
    here = sys._getframe()  # the command's entry: frames below it (the test runner's) are not looked at
    assert main._cannot_take_an_exception(_frame_in_del(), here)
    assert main._cannot_take_an_exception(_frame_in_import(tmp_path, monkeypatch), here)
    assert main._cannot_take_an_exception(_xla_gc_callback(), here)
    assert main._cannot_take_an_exception(_frame_in_module_code_run_natively(), here)
    assert not main._cannot_take_an_exception(here, here)
    assert not main._cannot_take_an_exception(_plain_function_frame(), here)


def _plain_function_frame():
    return sys._getframe()


def test_handler_raises_or_resends(tmp_path, monkeypatch):
    handler = main._raising(KeyboardInterrupt)
    monkeypatch.setattr(main, "_ENTRY", sys._getframe())
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGUSR1, _plain_function_frame())
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
