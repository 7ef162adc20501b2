"""``salt bench ...``: benchmarks. Each lives in ``bench/<name>.py`` as a click command ``cli``."""
import click

from salt.cli.main import LazyGroup

BENCHMARKS = {
    "kd-loss": ("salt.bench.kd_loss", "cli", "KD loss kernels: time, memory, roofline."),
    "step": ("salt.bench.step", "cli", "KD vs standard train step: time ratio, FLOP/s, memory."),
    "score": ("salt.bench.score", "cli", "Selection score: Numba vs NumPy tokens/s."),
    "attention": ("salt.bench.attention", "cli", "MQA/GQA attention: time and compiled memory per impl."),
    "data": ("salt.bench.data", "cli", "Data prepare wall time and loader tokens/s."),
}


@click.group("bench", cls=LazyGroup, lazy_commands=BENCHMARKS)
def bench():
    """Benchmarks. Speed and memory figures come from here, never from unit tests."""
