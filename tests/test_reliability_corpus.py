"""Property-based fuzzing of the corpus reader (issue 10): 10,000 generated inputs (JSONL lines of
every shape, random bytes, broken archives, huge streamed files) raise nothing but the documented
ValueError naming the file, and whatever is yielded is non-empty valid text."""
import gzip
import json
import pathlib

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from salt.data import corpus as corpus_mod
from salt.data.corpus import CorpusStats, iter_documents, resolve_sources

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
JSONL_EXAMPLES, FILE_EXAMPLES, SPLIT_EXAMPLES = 5000, 4000, 1000  # 10,000 in total


def _read(path: pathlib.Path, **kw):
    stats = CorpusStats()
    try:
        docs = list(iter_documents(resolve_sources([path]), stats, **kw))
    except ValueError as e:  # the documented error: it names the file
        assert path.name in str(e)
        return None, stats
    for d in docs:
        assert isinstance(d, str) and d
        d.encode("utf-8")  # valid text (invalid input was replaced and counted)
    assert stats.documents == len(docs)
    return docs, stats


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=12)
lines = st.one_of(
    st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=40)),
    st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=True), st.text(max_size=40)),
    json_values.map(json.dumps),
    st.builds(lambda n, t: "[" * n + json.dumps(t) + "]" * n, st.integers(0, 3000), st.text(max_size=5)),
    st.builds(lambda n: '{"text": "x", "a": ' + "{" * n + "}" * n + "}", st.integers(0, 3000)),
    st.sampled_from(['{"text": "\\ud800"}', '{"text": 5}', "{", "null", '"text"', "", "  ", '{"text": ""}',
                     '{"text": "a"} trailing', "\ufeff{}", '{"text": NaN}']),
    st.text(max_size=40),
).map(lambda s: s.encode("utf-8", "surrogatepass"))
raw_lines = st.one_of(lines, st.binary(max_size=40))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.slow
@settings(FUZZ, max_examples=JSONL_EXAMPLES)
@given(body=st.lists(raw_lines, max_size=8), skip=st.booleans(), suffix=st.sampled_from([".jsonl", ".jsonl.gz"]),
       trailing_newline=st.booleans())
def test_jsonl_reader(scratch, body, skip, suffix, trailing_newline):
    data = b"\n".join(body) + (b"\n" if trailing_newline else b"")
    path = scratch / f"in{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    docs, stats = _read(path, skip_invalid=skip)
    if skip:  # with --skip-invalid nothing is an error, and everything skipped is counted
        assert docs is not None


@pytest.mark.slow
@settings(FUZZ, max_examples=FILE_EXAMPLES)
@given(data=st.binary(max_size=400), kind=st.sampled_from(["txt", "gz", "zst", "gz-cut", "zst-cut", "jsonl.zst"]),
       cut=st.integers(0, 400))
def test_file_reader(scratch, data, kind, cut):
    if kind == "txt":
        path, payload = scratch / "f.txt", data
    elif kind.startswith("gz"):
        path, payload = scratch / "f.txt.gz", gzip.compress(data)
    else:
        path = scratch / ("f.jsonl.zst" if kind == "jsonl.zst" else "f.txt.zst")
        payload = zstandard.ZstdCompressor().compress(data)
    if kind.endswith("-cut"):
        payload = payload[:cut]
    if cut % 7 == 0 and kind == "txt":
        payload = bytes(cut % 256 for _ in range(cut))  # binary-looking input
    path.write_bytes(payload)
    _read(path)


@settings(FUZZ, max_examples=SPLIT_EXAMPLES)
@given(text=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=3000),
       segment=st.integers(4, 64))
def test_large_files_stream_in_pieces_that_join_to_the_file(scratch, text, segment):
    path = scratch / "big.txt"
    path.write_bytes(text.encode("utf-8"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(corpus_mod, "LARGE_DOCUMENT_BYTES", 32)
        mp.setattr(corpus_mod, "SEGMENT_BYTES", segment)
        mp.setattr(corpus_mod, "_READ_CHUNK_BYTES", 17)
        docs, stats = _read(path)
    assert "".join(docs) == text  # nothing lost, nothing altered
    assert stats.split_large_files == int(len(text.encode()) > 32)
    assert all(len(d.encode()) <= max(segment, 4) for d in docs) or stats.split_large_files == 0


def test_deep_json_is_an_invalid_line_even_with_skip_invalid(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "a"}\n' + "[" * 200_000 + "]" * 200_000 + '\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="deep.jsonl:2: malformed JSON"):
        list(iter_documents(resolve_sources([path]), CorpusStats()))
    stats = CorpusStats()
    assert list(iter_documents(resolve_sources([path]), stats, skip_invalid=True)) == ["a", "b"]
    assert stats.invalid_json_lines == 1
