"""``salt import hf`` and ``salt export hf``: Hugging Face checkpoints <-> SALT runs (docs/interop.md)."""
from __future__ import annotations

import json

import click

from salt.runtime.interop.hf import EXPORT_DTYPES


@click.group("import")
def import_():
    """Import a model from another system as a SALT run."""


@import_.command("hf", short_help="A local Hugging Face checkpoint directory -> a SALT run.")
@click.argument("src", type=click.Path())
@click.option("--out", required=True, type=click.Path(),
              help="Run directory to create (absent or empty): one checkpoint, step 0.")
@click.option("--name", default=None, help="Model name recorded in the run [default: hf-<model_type>].")
def import_hf_command(src, out, name):
    """Import SRC (config.json, model.safetensors or its shards with model.safetensors.index.json,
    tokenizer.json; no network) as the SALT run OUT, usable as --teacher, by salt score / eval /
    teacher cache.  Llama (2, 3.x, SmolLM2), Mistral without a sliding window, Qwen2 / 2.5, Qwen3 and
    Gemma 1 are supported; anything else is refused before anything is written."""
    from salt.core.outputs import OutputError
    from salt.runtime.interop.hf import import_hf

    try:
        summary = import_hf(src, out, name=name)
    except (OutputError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot import {src} into {out}: {e.strerror or e}"
                                   f"{f' ({e.filename})' if e.filename else ''}") from None
    click.echo(json.dumps(summary))


@click.group("export")
def export():
    """Export a SALT run for another system."""


@export.command("hf", short_help="A SALT run -> a Hugging Face model directory.")
@click.argument("run", type=click.Path())
@click.option("--out", required=True, type=click.Path(),
              help="Model directory to create (absent or empty; or a previous export with --overwrite).")
@click.option("--step", type=int, default=None, help="Checkpoint step [default: the newest intact].")
@click.option("--tokenizer", type=click.Path(), default=None,
              help="Tokenizer (token store, model directory or file) [default: the run's data, or the model "
                   "it was imported from]; its sha256 must be the run's.")
@click.option("--dtype", type=click.Choice(sorted(EXPORT_DTYPES)), default=None,
              help="Tensor dtype [default: the imported checkpoint's, float32 for SALT's own runs].")
@click.option("--overwrite", is_flag=True, help="Replace a previous `salt export hf` directory.")
def export_hf_command(run, out, step, tokenizer, dtype, overwrite):
    """Write config.json, model.safetensors and the tokenizer files of RUN to OUT, loadable by
    transformers' AutoModelForCausalLM / AutoTokenizer (and vLLM, lm-eval's HF backend).  SALT's
    own presets export as Gemma, the family with their architecture."""
    from salt.core.outputs import OutputError
    from salt.runtime.interop.hf import export_hf

    try:
        summary = export_hf(run, out, step=step, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
    except (OutputError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot export {run} to {out}: {e.strerror or e}"
                                   f"{f' ({e.filename})' if e.filename else ''}") from None
    click.echo(json.dumps(summary))
