"""``salt plan``: compile the run's steps for a TPU topology on this host; memory, fit, roofline."""
from __future__ import annotations

import dataclasses
import json

import click

from salt.runtime.train.config import DTYPES, TrainConfig
from salt.runtime.train.optim import OPTIMIZERS

# --grad-accum is offered only when the trainer's step accumulates gradients
HAS_GRAD_ACCUM = "grad_accum" in {f.name for f in dataclasses.fields(TrainConfig)}


def _options(fn):
    opts = [
        click.option("--topology", required=True,
                     help="TPU topology, e.g. v5e:16x16, v5p:4x4x4, v6e:8x8 (or v5e, v5p, v6e: 4 chips)."),
        click.option("--student", required=True, help="Student preset (salt presets)."),
        click.option("--teacher", default=None, help="Teacher preset; without it only the standard step."),
        click.option("--batch", type=click.IntRange(min=1), required=True, help="Global batch (windows)."),
        click.option("--seq-len", type=click.IntRange(min=1), required=True, help="Window length T."),
        click.option("--mesh", default="data=-1,model=1", show_default=True,
                     help="Mesh over the topology's chips, as salt train --mesh."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adafactor",
                     show_default=True),
        click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16",
                     show_default=True, help="Compute dtype (parameters stay float32)."),
        click.option("--kernels", type=click.Choice(["pallas", "xla", "naive"]), default="pallas",
                     show_default=True),
        click.option("--remat/--no-remat", default=True, show_default=True,
                     help="Recompute each layer's activations in the backward."),
        click.option("--vocab", type=click.IntRange(min=2), default=None,
                     help="Vocabulary size for both models (default: the presets')."),
        click.option("--vocab-chunks", type=click.IntRange(min=1), default=None,
                     help="Vocabulary-parallel loss chunks (as salt train; default: automatic)."),
        click.option("--search/--no-search", default=True, show_default=True,
                     help="Search the largest per-chip batch that fits (more compiles)."),
        click.option("--search-compiles", type=click.IntRange(min=1), default=4, show_default=True,
                     help="At most this many extra compiles per step for the batch search."),
        click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON."),
    ]
    if HAS_GRAD_ACCUM:
        opts.insert(5, click.option("--grad-accum", type=click.IntRange(min=1), default=1,
                                    show_default=True, help="Microbatches per step (as salt train)."))
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.command("plan")
@_options
def plan(topology, student, teacher, batch, seq_len, mesh, optimizer, dtype, kernels, remat, vocab,
         vocab_chunks, search, search_compiles, as_json, grad_accum=1):
    """Will this run fit a TPU pod, and how fast can it go?  Compiles the trainer's KD and
    standard steps ahead of time for TOPOLOGY's chips (no TPU needed) and reports per chip the
    compiled memory against the chip's HBM, the largest per-chip batch that fits, analytic
    FLOPs, the roofline step time and the predicted KD overhead."""
    from salt.runtime.experiments.plan import PlanError, format_plan, plan as make_plan

    def progress(text):  # on stderr: stdout holds only the report
        click.echo(text, err=True)

    try:
        result = make_plan(topology=topology, student=student, teacher=teacher, batch=batch,
                           seq_len=seq_len, mesh=mesh, optimizer=optimizer, dtype=dtype,
                           kernels=kernels, remat=remat, vocab=vocab, grad_accum=grad_accum,
                           vocab_chunks=vocab_chunks,
                           search=search, max_search_compiles=search_compiles,
                           progress=progress)
    except PlanError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=2) if as_json else format_plan(result))
