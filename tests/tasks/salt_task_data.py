"""Loader of the local test tasks: the harness calls ``load(data_file=...)`` (the YAML's
``custom_dataset``) and gets the file's ``train`` / ``test`` rows as a DatasetDict, read by
``datasets``' packaged ``json`` builder from this directory (no network)."""
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def load(data_file, **_metadata):
    import datasets

    rows = datasets.load_dataset("json", data_files=str(HERE / data_file), split="train")
    return datasets.DatasetDict({split: rows.filter(lambda r, s=split: r["split"] == s)
                                 for split in ("train", "test")})
