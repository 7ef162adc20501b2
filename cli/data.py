"""``salt data``: prepare the corpus, tokenizer and token store; inspect a store."""
from __future__ import annotations

import json

import click

from salt.data.build import DEFAULT_VAL_FRACTION, EMBEDDED_VOCAB_SIZE


@click.group("data")
def data():
    """Prepare the corpus, tokenizer and token store."""


@data.command("prepare", short_help="Build a token store (tokenizer + packed ids) from a corpus.")
@click.argument("sources", nargs=-1)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory of the token store (refused if it exists, unless --overwrite).")
@click.option("--vocab-size", type=click.IntRange(min=1), default=None,
              help=f"Vocabulary of the trained tokenizer [default: {EMBEDDED_VOCAB_SIZE} for the "
                   "embedded corpus; by corpus size otherwise].")
@click.option("--tokenizer", type=click.Path(), default=None,
              help="Reuse this tokenizer instead of training one (teacher and student share it): a SentencePiece "
                   "model, a Hugging Face tokenizer.json, or a model directory holding one.")
@click.option("--text-field", default="text", show_default=True,
              help="JSONL field holding the document text.")
@click.option("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, show_default=True,
              help="Fraction of documents (by hash) held out for validation.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--skip-invalid", is_flag=True,
              help="Skip (and count) malformed JSONL lines and lines without the text field.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the train/val split and of the tokenizer's training sample.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Tokenizing processes [default: 1 below 4 MB of input, else min(2, CPUs)]; "
                   "the output does not depend on it.")
@click.option("--sentinels", type=click.IntRange(min=0, max=1000), default=0, show_default=True,
              help="Sentinel ids the trained tokenizer reserves for `salt train --objective ul2` "
                   "(span corruption; 100 covers windows up to ~2K tokens).")
@click.option("--quiet", is_flag=True, help="No progress bars or summary.")
def prepare_command(sources, out_dir, vocab_size, tokenizer, text_field, val_fraction, overwrite,
                    skip_invalid, seed, workers, sentinels, quiet):
    """Build a token store from SOURCES (files, directories, globs; .jsonl/.jsonl.gz/.jsonl.zst
    with one JSON object per line) or, with no SOURCES, from the embedded default corpus (the
    Python standard library's *.py files of this interpreter)."""
    from salt.data.build import prepare

    try:
        metadata = prepare(out_dir, list(sources) or None, vocab_size=vocab_size, tokenizer=tokenizer,
                text_field=text_field, val_fraction=val_fraction, overwrite=overwrite,
                skip_invalid=skip_invalid, seed=seed, progress=not quiet, workers=workers,
                sentinels=sentinels)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # e.g. --out under a file or in a read-only folder, disk full
        where = f" ({e.filename})" if e.filename else ""
        raise click.ClickException(f"cannot write the token store {out_dir}: "
                                   f"{e.strerror or e}{where}") from None
    if not quiet:
        click.echo(f"token store written to {out_dir}", err=True)
    elif any(metadata["skipped"].values()) or metadata["roundtrip_failures"]:
        # Even when quiet, nothing skipped or altered goes unreported.
        skipped = ", ".join(f"{k}={v}" for k, v in metadata["skipped"].items() if v)
        click.echo(f"skipped/altered: {skipped or 'none'}; round-trip failures: "
                   f"{metadata['roundtrip_failures']}", err=True)


@data.command("info", short_help="Summarise and check a token store.")
@click.argument("store_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the full metadata.json.")
@click.option("--verify", is_flag=True,
              help="Re-check every token id and document offset from scratch (reads the whole store).")
def info_command(store_dir, as_json, verify):
    """Summarise the token store in STORE_DIR (and check that it is complete)."""
    from salt.data.build import summary_lines
    from salt.data.store import TokenStore

    try:
        store = TokenStore(store_dir)
        facts = store.verify() if verify else None
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(store.metadata, indent=2, sort_keys=True))
        return
    corpus = store.metadata["corpus"]
    if corpus.get("kind") == "embedded-stdlib":
        click.echo(f"corpus: embedded stdlib of Python {corpus['python_version']} "
                   f"({corpus['num_files']} files, list sha256 {corpus['file_list_sha256'][:16]}...)")
    else:
        click.echo(f"corpus: {corpus.get('num_files')} files from {corpus.get('sources')}")
    for line in summary_lines(store.metadata):
        click.echo(line)
    if facts is not None:
        click.echo("verified: " + "; ".join(f"{s}: {f['documents']:,} documents, max token id {f['max_id']}"
                                            for s, f in facts.items()) + f" < vocab_size {store.vocab_size}")
