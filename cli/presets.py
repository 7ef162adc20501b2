"""``salt presets``: the model presets with their exact parameter counts."""
import click

from salt.reference.config import PRESETS, param_count


@click.command("presets")
def presets():
    """List model presets and their exact parameter counts."""
    click.echo(f"{'preset':<14}{'layers':>7}{'d_model':>8}{'d_ff':>7}{'heads':>6}{'kv':>4}"
               f"{'vocab':>8}{'params':>16}{'non-embedding':>16}")
    for name, c in PRESETS.items():
        click.echo(f"{name:<14}{c.n_layers:>7}{c.d_model:>8}{c.d_ff:>7}{c.n_heads:>6}"
                   f"{c.n_kv_heads:>4}{c.vocab_size:>8}{param_count(c):>16,}"
                   f"{param_count(c, embedding=False):>16,}")
