"""The LAMBADA-style last-word task of `salt reproduce` (salt.runtime.eval.cloze): SLM-difficulty
buckets, the held-out passage builder, scoring against the float64 reference model, the report."""
import math

import numpy as np
import pytest

from kernel_tolerances import F32_TOL, assert_close
from salt.runtime.eval import cloze as C
from salt.runtime.experiments import cloze_stage
from tiny_corpus import SYLLABLES


# ----------------------------------------------------------------------------- buckets

def test_difficulty_order_correct_first_then_confidence_then_index():
    correct = [0, 1, 1, 0, 1, 0, 0]
    loglik = [-1.0, -3.0, -0.5, -1.0, -3.0, -9.0, -0.1]
    # correct: 2 (-0.5), then 1 and 4 tie at -3.0 -> index; wrong: 6 (-0.1), 0 / 3 tie -> index, 5
    np.testing.assert_array_equal(C.difficulty_order(correct, loglik), [2, 1, 4, 6, 0, 3, 5])
    b = C.difficulty_buckets(correct, loglik)  # 7 = 3 + 2 + 2
    assert [b[k].tolist() for k in C.BUCKETS] == [[2, 1, 4], [6, 0], [3, 5]]
    b8 = C.difficulty_buckets(correct + [1], loglik + [-0.2])  # 8 = 3 + 3 + 2, passage 7 easiest
    assert [b8[k].tolist() for k in C.BUCKETS] == [[7, 2, 1], [4, 6, 0], [3, 5]]
    with pytest.raises(ValueError, match="at least 3"):
        C.difficulty_buckets([1, 0], [0.0, 0.0])


def test_bucket_summaries_and_paired_difference():
    slm = {"correct_P": np.array([1, 1, 0, 0, 0, 0], bool),
           "loglik_P": np.array([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])}
    buckets = C.difficulty_buckets(slm["correct_P"], slm["loglik_P"])  # [0,1] [2,3] [4,5]
    a = {"correct_P": np.array([1, 0, 1, 1, 0, 1], bool), "loglik_P": np.arange(6.0)}
    base = {"correct_P": np.array([1, 1, 0, 1, 0, 0], bool), "loglik_P": np.zeros(6)}
    s = C.model_summary(a, buckets)
    assert s["accuracy"] == pytest.approx(4 / 6) and s["loglik"] == pytest.approx(2.5)
    assert [s["buckets"][k]["accuracy"] for k in C.BUCKETS] == [0.5, 1.0, 0.5]
    assert s["buckets"]["hard"]["loglik"] == pytest.approx(4.5)
    d = C.paired_bucket_difference(a, base, buckets)["accuracy"]
    assert [d[k]["mean"] for k in C.BUCKETS] == [-0.5, 0.5, 0.5]
    assert d["easy"]["se"] == pytest.approx(np.std([0, -1], ddof=1) / math.sqrt(2))
    assert d["all"]["mean"] == pytest.approx(1 / 6) and d["all"]["n"] == 6
    ll = C.paired_bucket_difference(a, base, buckets)["loglik"]
    assert [ll[k]["mean"] for k in C.BUCKETS] == [0.5, 2.5, 4.5]
    assert ll["hard"]["se"] == pytest.approx(np.std([4.0, 5.0], ddof=1) / math.sqrt(2))


def _scores(rng, n):
    return {"correct_P": rng.random(n) < 0.4, "loglik_P": -rng.random(n) * 5}


def test_summarize_pools_seeds_and_report_shows_table_and_claim():
    from salt.runtime.experiments import report as R, report_render as RR

    rng = np.random.default_rng(0)
    n = 31
    passages = {"windows_PxT1": np.zeros((n, 9), np.int32), "n_target_P": np.full(n, 2),
                "length_P": np.full(n, 9), "n_candidates": 40, "n_documents": 5}
    scores = {seed: {(v, ph): _scores(rng, n) for v in R.VARIANTS for ph in ("at_kd", "final")}
              for seed in (0, 1)}
    cz = cloze_stage.summarize(passages, _scores(rng, n), scores)
    assert cz["bucket_sizes"] == {"easy": 11, "medium": 10, "hard": 10}
    assert cz["slm"]["buckets"]["easy"]["accuracy"] >= cz["slm"]["buckets"]["hard"]["accuracy"]
    for m in ("accuracy", "loglik"):
        p = cz["pooled"]["final"]["SALT-BASELINE"][m]["easy"]
        per_seed = [cz["per_seed"][s]["paired"]["final"]["SALT-BASELINE"][m]["easy"]["mean"]
                    for s in ("0", "1")]
        assert p["n"] == 2 and p["mean"] == pytest.approx(np.mean(per_seed))
    cfg = {"seq_len": 8, "teacher_steps": 10, "kd_steps": 2, "steps": 10, "claims_testable": True}
    results = {"config": cfg, "per_seed": {}, "cloze": cz}
    g = R._cloze_claim(cz)
    assert g["id"] == "g" and g["status"] == "descriptive" and "2 seeds" in g["here"]
    assert "accuracy end: easy" in g["here"] and "target log-lik n_kd: easy" in g["here"]
    assert "end: easy +0.08, medium +0.09, hard +0.08" in g["paper"]
    text = "\n".join(RR._cloze_section(results))
    assert "Table 11" in text and "31 passages" in text and "| SLM | 10 |" in text
    assert "0.87 | 0.00 | 0.00 |" in text and "| SALT_DS | 2 |" in text
    assert text.count("SALT-BASELINE") == 8  # 2 seeds x (n_kd, end) x (accuracy, log-lik)
    skipped = {"n_passages": 1, "n_candidates": 2, "n_documents": 1, "skipped": "only 1 passages"}
    assert "not measured (only 1 passages" in R._cloze_claim(skipped)["here"]
    assert "Not measured: only 1" in "\n".join(RR._cloze_section(dict(results, cloze=skipped)))


# ----------------------------------------------------------------------------- passages

def sentence_corpus(directory, n_docs=30, seed=0):
    """Pseudo-text documents of short sentences ending in '.', '!' or '?' (some code-like lines)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        sentences = []
        for _ in range(int(rng.integers(8, 16))):
            words = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4)))
                     for _ in range(int(rng.integers(4, 12)))]
            sentences.append(" ".join(words) + str(rng.choice([".", ".", "!", "?"])))
        lines = [" ".join(sentences[j:j + 3]) for j in range(0, len(sentences), 3)]
        lines.insert(1, "x = f(a, b)  # e.g. ka.lo")
        (directory / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from salt.data import TokenStore, prepare

    root = tmp_path_factory.mktemp("cloze")
    prepare(root / "data", [sentence_corpus(root / "src")], vocab_size=300, val_fraction=0.3,
            progress=False)
    return TokenStore(root / "data")


def _train_text(store):
    sp = store.processor()
    tok, off = store.tokens("train"), store.doc_offsets("train")
    return "\n".join(sp.decode(np.asarray(tok[off[d]:off[d + 1] - 1]).tolist())
                     for d in range(off.size - 1))


def test_passages_are_held_out_sentence_final_words(store):
    from salt.data.tokenizer import EOS_ID, PAD_ID

    T = 24
    p = C.build_passages(store, T)
    docs = list(C.held_out_documents(store))
    assert p["n_documents"] == len(docs) == store.num_documents("val") >= 3
    assert p["n_candidates"] == sum(len(C.TARGET.findall(d)) for d in docs)
    P = p["windows_PxT1"].shape[0]
    assert 20 <= P <= p["n_candidates"] and p["windows_PxT1"].shape == (P, T + 1)
    sp, train_text = store.processor(), _train_text(store)
    for i in range(P):
        w, L, k = p["windows_PxT1"][i], p["length_P"][i], p["n_target_P"][i]
        assert w[0] == EOS_ID and L <= T + 1 and (w[L:] == PAD_ID).all() and k >= 1
        doc, c, word = docs[p["doc_P"][i]], p["char_P"][i], p["word_P"][i]
        assert doc[c:c + len(word)] == word and doc[c - 1] == " " and doc[c + len(word)] in ".!?"
        assert len(word) >= 3 and word.isalpha()
        assert w[L - k:L].tolist() == sp.encode(" " + word)
        context = sp.decode(w[1:L - k].tolist())
        assert doc[:c - 1].endswith(context)  # the text right before the word, in its document
        start = c - 1 - len(context)
        assert start == 0 or doc[start - 1].isspace()
        assert L - 1 - k >= (T - k) // 2  # the context fills at least half of its budget
        assert context + " " + word not in train_text  # held out: the students never saw it
    again = C.build_passages(store, T)
    for key in ("windows_PxT1", "length_P", "n_target_P", "doc_P", "char_P", "word_P"):
        np.testing.assert_array_equal(again[key], p[key])
    assert C.passages_sha(again) == C.passages_sha(p)
    few = C.build_passages(store, T, max_passages=5)  # spaced over the first SCAN_FACTOR * 5 found
    assert few["windows_PxT1"].shape[0] == 5 and few["n_documents"] <= p["n_documents"]
    where = list(zip(p["doc_P"].tolist(), p["char_P"].tolist()))
    picked = [where.index(w) for w in zip(few["doc_P"].tolist(), few["char_P"].tolist())]
    assert picked[0] == 0 and picked == sorted(picked) and picked[-1] >= C.SCAN_FACTOR * 5 - 1
    assert C.passages_sha(few) != C.passages_sha(p)
    longer = C.build_passages(store, 48)
    assert longer["length_P"].mean() > p["length_P"].mean()
    with pytest.raises(ValueError, match="seq_len"):
        C.build_passages(store, 1)


# ----------------------------------------------------------------------------- scoring

def test_scores_equal_float64_reference_logits():
    import jax

    from salt.reference.config import get_preset
    from salt.reference.model import forward as ref_forward
    from salt.runtime.model import transformer as model

    config = get_preset("tiny-student").replace(vocab_size=97)
    params = model.init_params(config, seed=3)
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    rng = np.random.default_rng(1)
    P, T1 = 11, 17
    windows = rng.integers(4, 97, size=(P, T1)).astype(np.int32)
    length = rng.integers(6, T1 + 1, size=P)
    n_target = rng.integers(1, 4, size=P)
    for i in range(P):
        windows[i, length[i]:] = 0
    for i in range(0, P, 2):  # make every other target the model's own greedy continuation
        for pos in range(length[i] - n_target[i] - 1, length[i] - 1):
            logits = ref_forward(p64, windows[i:i + 1, :pos + 1], config)[0, -1]
            windows[i, pos + 1] = int(np.argmax(logits))
    passages = {"windows_PxT1": windows, "length_P": length, "n_target_P": n_target}
    got = C.score_passages(params, config, passages, batch_size=4)  # 11 = 4 + 4 + 3 (padded)
    logits = ref_forward(p64, windows[:, :-1], config)
    logp = logits - (np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                     + logits.max(-1, keepdims=True))
    for i in range(P):
        span = np.arange(length[i] - n_target[i] - 1, length[i] - 1)
        targets = windows[i, span + 1]
        assert_close(got["loglik_P"][i], logp[i, span, targets].sum(), F32_TOL, f"loglik {i}")
        assert got["correct_P"][i] == bool((logits[i, span].argmax(-1) == targets).all())
    assert got["correct_P"][::2].all() and got["correct_P"].dtype == bool
