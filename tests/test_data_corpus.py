"""Sources: files, directories, globs, JSONL (plain, gzip, zstd) and every bad input of issue 3."""
import gzip
import json
import pathlib

import pytest
import zstandard

from salt.data.corpus import CorpusStats, embedded_corpus, iter_documents, resolve_sources


def read_all(sources, **kwargs):
    stats = CorpusStats()
    docs = list(iter_documents(resolve_sources(sources), stats, **kwargs))
    return docs, stats


def jsonl_bytes(records):
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_plain_files_directories_and_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee\n")
    (tmp_path / "d" / "a.txt").write_text("  ay\n\tindented\r\n")
    (tmp_path / "d" / "sub" / "c.txt").write_text("sea")
    (tmp_path / "d" / ".hidden").write_text("never read")
    (tmp_path / "d" / "empty.txt").write_text("")
    docs, stats = read_all([tmp_path / "d"])
    # Sorted by relative path; hidden files skipped; the empty file counted, not yielded.
    assert docs == ["  ay\n\tindented\r\n", "bee\n", "sea"]
    assert stats.files == 4 and stats.documents == 3 and stats.empty_documents == 1

    docs, _ = read_all([str(tmp_path / "d" / "*.txt"), tmp_path / "d" / "sub" / "c.txt"])
    assert docs == ["  ay\n\tindented\r\n", "bee\n", "sea"]
    docs, _ = read_all([str(tmp_path / "d" / "**" / "c.txt")])
    assert docs == ["sea"]
    # A file named twice is read once.
    docs, _ = read_all([tmp_path / "d" / "b.txt", tmp_path / "d" / "b.txt"])
    assert docs == ["bee\n"]


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="nope.txt.*no such file"):
        resolve_sources([tmp_path / "nope.txt"])
    with pytest.raises(ValueError, match=r"\*.jsonl.*matches no files"):
        resolve_sources([str(tmp_path / "*.jsonl")])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="emptydir.*no .*files"):
        resolve_sources([tmp_path / "emptydir"])
    with pytest.raises(ValueError, match="empty list"):
        resolve_sources([])


@pytest.mark.parametrize("suffix,compress", [
    (".jsonl", lambda b: b),
    (".jsonl.gz", gzip.compress),
    (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_jsonl_formats(tmp_path, suffix, compress):
    records = [{"text": "first\n  doc"}, {"text": "", "id": 2}, {"text": "third ▁ é 😀", "meta": {"a": 1}}]
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(compress(jsonl_bytes(records) + b"\n  \n"))
    docs, stats = read_all([path])
    assert docs == ["first\n  doc", "third ▁ é 😀"]
    assert stats.documents == 2 and stats.empty_documents == 1 and stats.blank_jsonl_lines == 2


@pytest.mark.parametrize("suffix,compress", [
    (".jsonl", lambda b: b),
    (".jsonl.gz", gzip.compress),
    (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_jsonl_lines_spanning_read_chunks(tmp_path, monkeypatch, suffix, compress):
    # Tiny read chunks: lines (and multi-byte characters) are split across many chunks.
    import salt.data.corpus as corpus_module

    monkeypatch.setattr(corpus_module, "_READ_CHUNK_BYTES", 5)
    records = [{"text": "a" * 57 + " é 😀\n x"}, {"text": "b"}, {"text": "c\td" * 9}]
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(compress(jsonl_bytes(records) + b"\n" + jsonl_bytes([{"text": "last"}])[:-1]))
    docs, stats = read_all([path])
    assert docs == [r["text"] for r in records] + ["last"]
    assert stats.blank_jsonl_lines == 1 and stats.non_utf8_documents == 0


def test_jsonl_multiple_zstd_frames_and_custom_field(tmp_path):
    c = zstandard.ZstdCompressor()
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(c.compress(jsonl_bytes([{"body": "one"}])) + c.compress(jsonl_bytes([{"body": "two"}])))
    docs, _ = read_all([path], text_field="body")
    assert docs == ["one", "two"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl_bytes([{"text": "ok"}]) + b'{"text": "unterminated\n' + jsonl_bytes([{"text": "ok2"}]))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        read_all([path])
    docs, stats = read_all([path], skip_invalid=True)
    assert docs == ["ok", "ok2"] and stats.invalid_json_lines == 1


def test_non_object_jsonl_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_bytes(b'["text"]\n' + jsonl_bytes([{"text": "fine"}]))
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object"):
        read_all([path])
    docs, stats = read_all([path], skip_invalid=True)
    assert docs == ["fine"] and stats.invalid_json_lines == 1


def test_missing_text_field_is_named(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_bytes(jsonl_bytes([{"text": "a"}, {"content": "b"}, {"text": 7}]))
    with pytest.raises(ValueError, match=r"fields\.jsonl:2: no field 'text' \(fields: 'content'\)"):
        read_all([path])
    with pytest.raises(ValueError, match=r"fields\.jsonl:1: no field 'content'"):
        read_all([path], text_field="content")
    docs, stats = read_all([path], skip_invalid=True)
    assert docs == ["a"] and stats.missing_field_lines == 2
    path2 = tmp_path / "num.jsonl"
    path2.write_bytes(jsonl_bytes([{"text": 7}]))
    with pytest.raises(ValueError, match=r"num\.jsonl:1: field 'text' is a int"):
        read_all([path2])


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 \xef\xbf\xbd ok \xff\xfe")
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "na\xefve"}\n{"text": "lone \\ud800 surrogate"}\n')
    docs, stats = read_all([tmp_path / "latin1.txt", tmp_path / "good.txt", tmp_path / "c.jsonl"])
    # The pre-existing U+FFFD in latin1.txt is not counted as a replacement.
    assert docs == ["caf\ufffd \ufffd ok \ufffd\ufffd", "fine", "na\ufffdve", "lone \ufffd surrogate"]
    assert stats.non_utf8_documents == 3
    assert stats.replaced_characters == 3 + 1 + 1


def test_binary_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02text")
    (tmp_path / "t.txt").write_text("text")
    docs, stats = read_all([tmp_path])
    assert docs == ["text"] and stats.binary_files == 1


def test_truncated_gzip_is_named(tmp_path):
    data = gzip.compress(jsonl_bytes([{"text": f"document number {i} " * 20} for i in range(300)]))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: truncated or corrupt gzip"):
        read_all([path])
    text_gz = tmp_path / "doc.txt.gz"
    text_gz.write_bytes(gzip.compress(b"x" * 10000)[:20])
    with pytest.raises(ValueError, match=r"doc\.txt\.gz: truncated or corrupt gzip"):
        read_all([text_gz])


def test_truncated_zstd_is_named(tmp_path):
    data = zstandard.ZstdCompressor().compress(
        jsonl_bytes([{"text": f"document number {i} " * 20} for i in range(300)]))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.zst: truncated zstd"):
        read_all([path])
    garbage = tmp_path / "garbage.zst"
    garbage.write_bytes(b"this is not zstd at all")
    with pytest.raises(ValueError, match=r"garbage\.zst: corrupt zstd"):
        read_all([garbage])


def test_embedded_corpus_is_stdlib_without_site_packages():
    corpus = embedded_corpus()
    assert corpus.description["kind"] == "embedded-stdlib"
    assert len(corpus.files) > 500 and corpus.description["num_files"] == len(corpus.files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in corpus.files)
    assert len(corpus.description["file_list_sha256"]) == 64
    assert embedded_corpus().description == corpus.description  # deterministic
    names = {pathlib.PurePath(f).name for f in corpus.files}
    assert {"os.py", "json.py"} & names or "__init__.py" in names


def test_iter_lines_equals_split_whatever_the_chunking():
    from salt.data.corpus import _iter_lines

    data = b"a\nbc\n\n\nd\xc3\xa9ef\n" + b"x" * 40 + b"\ntail"
    want = data.split(b"\n")
    for size in (1, 2, 3, 7, len(data)):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        assert list(_iter_lines(iter(chunks))) == want
        assert list(_iter_lines(iter(chunks + [b"\n"]))) == want  # a final newline ends "tail"
    assert list(_iter_lines(iter([]))) == [] and list(_iter_lines(iter([b"", b"\n"]))) == [b""]
