"""`salt data prepare` over Parquet files (several row groups, a directory of shards, a glob) and a
Hugging Face dataset saved to disk (written by `datasets` itself, the oracle): the token store is
byte-identical to the one from the same texts as JSONL; bad rows are errors naming the file and
row, or skipped and counted with --skip-invalid; a missing column names the columns."""
import json

import pytest
from click.testing import CliRunner

from salt.cli.main import cli
from salt.data import prepare

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

VOCAB = 300


def _docs():
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    docs = [" ".join(words[(i * 7 + j * 3) % len(words)] + ("." if j % 9 == 8 else "") for j in range(60 + i % 40))
            for i in range(150)]
    docs[3] = ""  # an empty document: skipped and counted alike
    docs[5] = "naïve café — ünïcödé ✓ " + docs[5]
    return docs


def _store_bytes(path):  # metadata.json names the sources; everything else must match
    meta = json.loads((path / "metadata.json").read_text())
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name not in ("metadata.json",
                                                                                        "token_check.json")}
    return files, {k: v for k, v in meta.items() if k not in ("corpus", "input_files")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tabular")
    docs = _docs()
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, root / "one.parquet", row_group_size=16)  # ten row groups
    (root / "shards").mkdir()
    pq.write_table(table.slice(0, 70), root / "shards" / "part-000.parquet", row_group_size=32)
    pq.write_table(table.slice(70), root / "shards" / "part-001.parquet", row_group_size=32)
    return root


def _prepare(out, sources, **kw):
    return prepare(out, [str(s) for s in sources], vocab_size=VOCAB, val_fraction=0.2, progress=False, **kw)


def test_parquet_and_hf_dataset_give_the_jsonl_store(inputs, tmp_path):
    datasets = pytest.importorskip("datasets")
    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({"id": list(range(len(_docs()))), "text": _docs()}).save_to_disk(
        str(hf), max_shard_size="20KB")  # several Arrow files
    assert len(json.loads((hf / "state.json").read_text())["_data_files"]) > 1
    reference = _prepare(tmp_path / "jsonl", [inputs / "docs.jsonl"])
    want = _store_bytes(tmp_path / "jsonl")
    for name, sources in (("parquet", [inputs / "one.parquet"]), ("shards", [inputs / "shards"]),
                          ("glob", [inputs / "shards" / "*.parquet"]), ("hf", [hf])):
        meta = _prepare(tmp_path / f"store-{name}", sources)
        assert _store_bytes(tmp_path / f"store-{name}") == want, name
        assert meta["totals"]["documents"] == reference["totals"]["documents"] == len(_docs()) - 1
        assert meta["skipped"]["empty_documents"] == 1


def test_bad_rows_and_columns(inputs, tmp_path):
    docs = _docs()
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": docs[:40] + [None] + docs[41:]}), bad, row_group_size=16)
    with pytest.raises(ValueError, match=rf"{bad}: row 40 \(0-based\): the text is null"):
        _prepare(tmp_path / "s1", [bad])
    assert not (tmp_path / "s1").exists()
    meta = _prepare(tmp_path / "s2", [bad], skip_invalid=True)
    assert meta["skipped"]["missing_field_lines"] == 1
    with pytest.raises(ValueError, match=r"one\.parquet: no column 'body' \(columns: 'id', 'text'\)"):
        _prepare(tmp_path / "s3", [inputs / "one.parquet"], text_field="body")
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): the text is a int"):
        _prepare(tmp_path / "s4", [ints])
    broken = tmp_path / "broken.parquet"
    broken.write_bytes((inputs / "one.parquet").read_bytes()[:-100])
    result = CliRunner().invoke(cli, ["data", "prepare", str(broken), "--out", str(tmp_path / "s5"), "--quiet",
                                      "--vocab-size", str(VOCAB)])
    assert result.exit_code != 0 and str(broken) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s5").exists()


def test_dataset_dict_is_refused_naming_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": _docs()[:10]}),
                               "test": datasets.Dataset.from_dict({"text": _docs()[10:20]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict .*splits: test, train"):
        _prepare(tmp_path / "s", [tmp_path / "dd"])
    assert not (tmp_path / "s").exists()
