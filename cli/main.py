"""Entry point of the ``salt`` command.

Subcommands live in their own modules and are imported lazily, so ``salt --help``
stays fast and one broken optional dependency does not take the whole CLI down.
To add a command, add its ``"name": "module:attribute"`` to ``COMMANDS``.
"""
from __future__ import annotations

import errno
import os
import signal
import sys


def _quit_during_start_up(signum, frame):
    """Ctrl-C / SIGTERM while the ``salt`` command is still importing (before :func:`main` has
    its handlers): nothing has been written yet, so end at once with one line, no traceback."""
    os.write(2, f"interrupted ({signal.Signals(signum).name}) during start-up; nothing was written\n".encode())
    os._exit(128 + signum)


if os.path.basename(sys.argv[0]) == "salt":  # the command itself, not an importer (tests)
    try:
        signal.signal(signal.SIGTERM, _quit_during_start_up)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _quit_during_start_up)
    except ValueError:  # not the main thread
        pass

import importlib  # noqa: E402 - after the start-up handlers
import importlib.util  # noqa: E402
import threading  # noqa: E402

import click  # noqa: E402

from salt.core.platform import default_jax_platforms  # noqa: E402

COMMANDS = {
    "data": ("salt.cli.data", "data", "Prepare the corpus, tokenizer and token store."),
    "golden": ("salt.cli.golden", "golden", "Generate or check the reference golden values."),
    "train": ("salt.cli.train", "train", "Train a model (BASELINE / RKD / SALT / SALT_DS)."),
    "finetune": ("salt.cli.finetune", "finetune", "Supervised fine-tuning on prompt/completion JSONL."),
    "score": ("salt.cli.score", "score", "Score training windows with a teacher (eq. 11)."),
    "select": ("salt.cli.score", "select", "Select the top-m scored windows."),
    "eval": ("salt.cli.evaluate", "evaluate", "Held-out accuracy and log-perplexity, by bucket."),
    "reproduce": ("salt.cli.reproduce", "reproduce", "Run the paper's comparison end to end."),
    "bench": ("salt.cli.bench", "bench", "Benchmarks (kd-loss, step, score, data)."),
    "teacher": ("salt.cli.teacher", "teacher", "Cache the teacher's top-k over a run's KD phase."),
    "presets": ("salt.cli.presets", "presets", "List model presets with exact parameter counts."),
    "plan": ("salt.cli.plan", "plan", "Compile the steps for a TPU topology: memory, fit, roofline."),
    "import": ("salt.cli.interop", "import_", "Import a Hugging Face checkpoint as a SALT run."),
    "export": ("salt.cli.interop", "export", "Export a SALT run as a Hugging Face checkpoint."),
    "xi": ("salt.cli.xi", "xi", "Martingale differences of a run's loss (appendix L)."),
    "ds-study": ("salt.cli.ds_study", "ds_study", "SALT_DS per selection setting on a reproduction (claim c)."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args, lazy_commands: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx, name):
        if name in self.lazy_commands:
            module_name, attr, _ = self.lazy_commands[name]
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name == module_name:
                    return None  # not implemented yet
                raise
            return getattr(module, attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        rows = [(n, self.lazy_commands[n][2]) for n in self.list_commands(ctx)
                if n in self.lazy_commands and _module_exists(self.lazy_commands[n][0])]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _module_exists(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@click.group(cls=LazyGroup, lazy_commands=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="salt")
def cli():
    """SALT: a small LM helps pre-train a large one (KD early, then standard training)."""


class Terminated(BaseException):
    """SIGTERM outside the training loop (which saves a checkpoint instead)."""


def _cannot_take_an_exception(frame, entry=None) -> bool:
    """Whether the interrupted code is somewhere an exception raised by a signal handler does harm:
    a module's top-level code (an import: extension modules run it from native code during their
    set-up, sometimes without importlib's frames on the stack, and an exception there aborts or
    crashes the process), importlib itself, or a finaliser / JAX's garbage-collection callback
    (where it is swallowed: "Exception ignored in ...").  ``entry``: the frame the command started
    in (:func:`main`'s); the frames below it (the interpreter's own ``__main__``, a test runner)
    are not looked at."""
    while frame is not None and frame is not entry:
        code = frame.f_code
        if code.co_filename.startswith("<frozen importlib") or code.co_name in ("__del__", "_xla_gc_callback"):
            return True
        if code.co_name == "<module>" and frame.f_globals.get("__name__") != "__main__":
            return True
        frame = frame.f_back
    return False


_ENTRY = None  # main()'s frame while the command runs


def _raising(exc):
    """A handler that raises ``exc`` where the interrupted code can take it, and otherwise re-sends
    the signal 50 ms later (so a Ctrl-C or SIGTERM during start-up is neither lost nor fatal)."""
    def handler(signum, frame):
        if _cannot_take_an_exception(frame, _ENTRY):
            resend = threading.Timer(0.05, os.kill, (os.getpid(), signum))
            resend.daemon = True  # never joined at exit (it would raise in threading._shutdown)
            resend.start()
            return
        raise exc
    return handler


_on_sigterm = _raising(Terminated)


def _error(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def main(argv=None):
    """Run the CLI. User errors, interrupts and OS errors end with one line on stderr and a
    non-zero exit code, never a traceback (docs/safety.md): ClickException -> its code (1, 2 for
    usage); Ctrl-C -> 130; SIGTERM outside the training loop -> 143; OSError -> 1."""
    global _ENTRY
    _ENTRY = sys._getframe()
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _quit_during_start_up):
            signal.signal(signal.SIGINT, _raising(KeyboardInterrupt))  # not if ignored (nohup, &)
    except ValueError:  # not the main thread
        pass
    default_jax_platforms()
    try:
        rv = cli.main(args=argv, prog_name="salt", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted (Ctrl-C); nothing more was saved", err=True)
        sys.exit(130)
    except Terminated:
        click.echo("terminated (SIGTERM); nothing more was saved", err=True)
        sys.exit(143)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        verb = "cannot write" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "cannot access"
        _error(f"{verb}{where}: {e.strerror or e}", 1)
    except MemoryError:
        _error("out of host memory; try a smaller --batch", 1)
    except Exception as e:  # noqa: BLE001
        if "RESOURCE_EXHAUSTED" in str(e):  # XLA out of device memory
            _error(f"out of device memory ({str(e).splitlines()[0][:200]}); try a smaller --batch", 1)
        raise
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
