"""JAX selection score (eq. 11) against the reference, selection, pool, resumable job, CLI."""
import numpy as np
import pytest

from salt.reference.score import selection_score
from salt.core import outputs
from salt.data.ids import load_window_ids
from salt.runtime.select import score as S
from tiny_corpus import make_tiny_corpus, save_checkpoint


def _logits_with_ties(rng, B, T, V):
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    # Quantise half the rows so that ties with the target's logit occur.
    logits[: B // 2] = np.round(logits[: B // 2] * 2) / 2
    return logits


@pytest.mark.parametrize("mode", ["zero", "exclude"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_token_terms_and_median_equal_reference(mode, k):
    import jax.numpy as jnp

    rng = np.random.default_rng(k)
    B, T, V = 6, 7, 24  # odd T: plain middle; also test even T below
    for T in (7, 8):
        logits = _logits_with_ties(rng, B, T, V)
        targets = rng.integers(0, V, size=(B, T))
        ce, in_topk = S.token_terms(jnp.asarray(logits), jnp.asarray(targets), k)
        got = S.window_medians(np.asarray(ce), np.asarray(in_topk), mode)
        want = selection_score(logits.astype(np.float64), targets, k, mode=mode)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert got.dtype == np.float64


def test_topk_membership_counts_strictly_greater():
    import jax.numpy as jnp

    # target logit 1.0 tied with two others; one strictly greater (2.0).
    logits = np.array([[[2.0, 1.0, 1.0, 1.0, 0.0]]], np.float32)
    targets = np.array([[2]])
    for k, member in ((1, False), (2, True), (5, True)):
        _, in_topk = S.token_terms(jnp.asarray(logits), jnp.asarray(targets), k)
        assert bool(np.asarray(in_topk)[0, 0]) is member


def test_exclude_mode_without_topk_scores_minus_inf():
    ce = np.array([[1.0, 2.0], [3.0, 4.0]])
    keep = np.array([[False, False], [True, False]])
    np.testing.assert_array_equal(S.window_medians(ce, keep, "exclude"), [-np.inf, 3.0])
    np.testing.assert_array_equal(S.window_medians(ce, keep, "zero"), [0.0, 1.5])
    with pytest.raises(ValueError, match="topk mode"):
        S.window_medians(ce, keep, "drop")


def test_select_top_m_ties_by_window_id():
    ids = np.array([7, 3, 9, 1, 5], np.int64)
    scores = np.array([1.0, 2.0, 1.0, -np.inf, 2.0])
    np.testing.assert_array_equal(S.select_top_m(ids, scores, 4), [3, 5, 7, 9])
    np.testing.assert_array_equal(S.select_top_m(ids, scores, 5), [3, 5, 7, 9, 1])
    with pytest.raises(ValueError, match="exceeds"):
        S.select_top_m(ids, scores, 6)
    assert S.select_top_m(ids, scores, 0).size == 0  # as the reference: m = 0 selects nothing
    with pytest.raises(ValueError, match="integer"):
        S.select_top_m(ids, scores, -1)
    with pytest.raises(ValueError, match="NaN"):
        S.select_top_m(ids, np.array([1.0, np.nan, 0, 0, 0]), 2)


def test_overlapping_windows_maps_token_ranges():
    # same length: identity (clipped to range)
    np.testing.assert_array_equal(S.overlapping_windows(np.array([3, 1, 1, 50]), 8, 8, 10), [1, 3])
    # seen windows of 4 tokens (T=3) vs candidates of 6 tokens (T=5):
    # seen id 1 covers tokens [4, 8) -> candidates 0 [0,6) and 1 [6,12); seen id 3 covers [12,16) -> 2.
    np.testing.assert_array_equal(S.overlapping_windows(np.array([1, 3]), 3, 5, 10), [0, 1, 2])
    # brute force on random inputs
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(1, 9, size=2)
        seen = rng.choice(30, size=5, replace=False)
        n = 25
        got = S.overlapping_windows(seen, a, b, n)
        covered = set()
        for s in seen:
            covered.update(range(s * (a + 1), (s + 1) * (a + 1)))
        want = [i for i in range(n) if covered & set(range(i * (b + 1), (i + 1) * (b + 1)))]
        np.testing.assert_array_equal(got, want)


def test_save_and_load_helpers_are_atomic_and_pickle_free(tmp_path):
    out = tmp_path / "ids.npy"
    outputs.save_npy(out, np.arange(5, dtype=np.int64))
    np.testing.assert_array_equal(load_window_ids(out), np.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy"]  # no temp left behind
    with pytest.raises(ValueError, match="does not exist"):
        load_window_ids(tmp_path / "missing.npy")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="integer"):
        load_window_ids(bad)
    with pytest.raises(ValueError, match="not a SALT scores file"):
        outputs.save_npz(tmp_path / "x.npz", a=np.zeros(2))
        S.load_scores(tmp_path / "x.npz")


def test_teacher_forward_scores_equal_reference_on_teacher_logits():
    """The per-token statistics `salt score` runs (WindowStats: the batch sharded over the 8 fake
    devices, the fused-linear kernels per shard) vs the reference score on the same model's
    logits, both modes."""
    import jax.numpy as jnp

    from salt.reference.config import get_preset
    from salt.runtime.model import transformer as model
    from salt.runtime.model.tokens import WindowStats

    config = get_preset("tiny-teacher")
    params = model.init_params(config, seed=3)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, config.vocab_size, size=(8, 13)).astype(np.int32)
    logits = np.asarray(model.forward(params, jnp.asarray(windows[:, :-1]), config), np.float64)
    stats = WindowStats(params, config, batch_size=8, impl="xla")(windows)
    for k in (1, 10):
        for mode in ("zero", "exclude"):
            got = S.window_medians(stats["ce"], stats["n_greater"] < k, mode)
            want = selection_score(logits, windows[:, 1:], k, mode=mode)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the scoring job





@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from salt.data import TokenStore, prepare
    from salt.reference.config import get_preset
    from salt.runtime.model import transformer as model

    root = tmp_path_factory.mktemp("score")
    prepare(root / "data", [make_tiny_corpus(root / "src")], vocab_size=300, val_fraction=0.2,
            progress=False)
    store = TokenStore(root / "data")
    config = get_preset("tiny-teacher").replace(vocab_size=store.vocab_size)
    params = model.init_params(config, seed=1)
    run_config = {"seq_len": 12, "batch": 4, "seed": 5, "kd_steps": 0, "subset": None, "exclude": None}
    save_checkpoint(root / "teacher", config, params, store, 3, run_config)
    return {"root": root, "data": root / "data", "store": store, "config": config, "params": params,
            "teacher": root / "teacher", "run_config": run_config}


def test_score_job_equals_reference_and_excludes_seen_windows(tiny_setup, tmp_path):
    import jax.numpy as jnp

    from salt.data import Loader
    from salt.runtime.model import transformer as model

    t = tiny_setup
    T = 16
    job = S.ScoreJob(teacher=str(t["teacher"]), data=str(t["data"]), out=str(tmp_path / "s.npz"),
                     k=5, seq_len=T, batch=6, chunk_batches=2)
    summary = S.score(job, progress=False)
    z = S.load_scores(tmp_path / "s.npz")
    assert z["window_ids"].dtype == np.int64 and z["scores"].dtype == np.float64
    assert int(z["k"]) == 5 and str(z["mode"]) == "zero" and int(z["seq_len"]) == T
    assert str(z["tokenizer_sha256"]) == t["store"].tokenizer_sha256
    assert str(z["teacher"]).endswith("@3")
    # pool = all train windows at T=16 minus those overlapping the teacher's first 3 batches (T=12)
    seen = Loader(t["data"], seq_len=12, global_batch=4, seed=5).window_ids
    seen_tokens = set()
    for step0 in range(3):
        for w in seen(step0):
            seen_tokens.update(range(int(w) * 13, (int(w) + 1) * 13))
    full = Loader(t["data"], seq_len=T, global_batch=1)
    want_pool = [i for i in range(full.num_windows)
                 if not seen_tokens & set(range(i * (T + 1), (i + 1) * (T + 1)))]
    np.testing.assert_array_equal(z["window_ids"], want_pool)
    assert summary["n_excluded"] == full.num_windows - len(want_pool) > 0
    # scores = reference eq. 11 on the teacher's float32 logits
    windows = full.windows(z["window_ids"])
    logits = np.asarray(model.forward(t["params"], jnp.asarray(windows[:, :-1]), t["config"]))
    want = selection_score(logits.astype(np.float64), windows[:, 1:], 5)
    np.testing.assert_allclose(z["scores"], want, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "s.npz.partial").exists()


def test_score_job_resumes_after_interruption(tiny_setup, tmp_path, monkeypatch):
    t = tiny_setup
    kw = dict(teacher=str(t["teacher"]), data=str(t["data"]), k=3, seq_len=16, batch=4,
              chunk_batches=1, mode="exclude")
    S.score(S.ScoreJob(out=str(tmp_path / "full.npz"), **kw), progress=False)
    calls = {"n": 0}
    original = S.window_medians

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(S, "window_medians", failing)
    with pytest.raises(KeyboardInterrupt):
        S.score(S.ScoreJob(out=str(tmp_path / "r.npz"), **kw), progress=False)
    monkeypatch.setattr(S, "window_medians", original)
    assert not (tmp_path / "r.npz").exists()
    assert len(list((tmp_path / "r.npz.partial").glob("chunk_*.npz"))) == 2
    # different settings do not silently mix with the partial results
    with pytest.raises(ValueError, match="different job"):
        S.score(S.ScoreJob(out=str(tmp_path / "r.npz"), **dict(kw, k=4)), progress=False)
    summary = S.score(S.ScoreJob(out=str(tmp_path / "r.npz"), **kw), progress=False)
    assert summary["resumed_chunks"] == 2
    a, b = S.load_scores(tmp_path / "full.npz"), S.load_scores(tmp_path / "r.npz")
    np.testing.assert_array_equal(a["window_ids"], b["window_ids"])
    np.testing.assert_array_equal(a["scores"], b["scores"])


def test_max_candidates_samples_the_pool(tiny_setup, tmp_path):
    t = tiny_setup
    job = S.ScoreJob(teacher=str(t["teacher"]), data=str(t["data"]), out=str(tmp_path / "s.npz"),
                     k=5, seq_len=16, batch=8, max_candidates=10)
    S.score(job, progress=False)
    ids = S.load_scores(tmp_path / "s.npz")["window_ids"]
    assert ids.size == 10 and np.all(np.diff(ids) > 0)


def test_cli_score_and_select(tiny_setup, tmp_path):
    from click.testing import CliRunner

    from salt.cli.main import cli

    t = tiny_setup
    runner = CliRunner()
    scores = tmp_path / "scores.npz"
    r = runner.invoke(cli, ["score", "--teacher", str(t["teacher"]), "--data", str(t["data"]),
                            "--k", "10", "--seq-len", "16", "--out", str(scores), "--quiet"])
    assert r.exit_code == 0, r.output
    z = S.load_scores(scores)
    sel = tmp_path / "sel.npy"
    r = runner.invoke(cli, ["select", "--scores", str(scores), "--top-m", "5", "--out", str(sel)])
    assert r.exit_code == 0, r.output
    ids = np.load(sel, allow_pickle=False)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, S.select_top_m(z["window_ids"], z["scores"], 5))
    # top-m larger than the pool: clear error, nothing written
    r = runner.invoke(cli, ["select", "--scores", str(scores), "--top-m", str(z["scores"].size + 1),
                            "--out", str(tmp_path / "sel2.npy")])
    assert r.exit_code != 0 and "exceeds" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "sel2.npy").exists()
    # existing output is not overwritten
    before = sel.read_bytes()
    r = runner.invoke(cli, ["select", "--scores", str(scores), "--top-m", "2", "--out", str(sel)])
    assert r.exit_code != 0 and "already exists" in r.output and sel.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "k must be in [1, 300]"),
    (["--k", "301"], "k must be in [1, 300]"),
    (["--teacher", "/nonexistent/run"], "does not exist"),
    (["--data", "/nonexistent/data"], "does not exist"),
])
def test_cli_score_bad_input(tiny_setup, tmp_path, args, message):
    from click.testing import CliRunner

    from salt.cli.main import cli

    t = tiny_setup
    base = {"--teacher": str(t["teacher"]), "--data": str(t["data"]), "--k": "10",
            "--seq-len": "16", "--out": str(tmp_path / "s.npz")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["score", "--quiet"] + [x for kv in base.items() for x in kv]
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s.npz").exists()


def test_score_refuses_tokenizer_mismatch(tiny_setup, tmp_path):
    from salt.data import prepare

    t = tiny_setup
    other = tmp_path / "other"
    prepare(other, [make_tiny_corpus(tmp_path / "src2", seed=7)], vocab_size=290,
            val_fraction=0.2, progress=False)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        S.score(S.ScoreJob(teacher=str(t["teacher"]), data=str(other), out=str(tmp_path / "s.npz"),
                           seq_len=16), progress=False)
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.slow
def test_exclude_file_and_exclude_run(tiny_setup, tmp_path):
    t = tiny_setup
    base = dict(teacher=str(t["teacher"]), data=str(t["data"]), k=5, seq_len=12, batch=8)
    S.score(S.ScoreJob(out=str(tmp_path / "a.npz"), **base), progress=False)
    pool = S.load_scores(tmp_path / "a.npz")["window_ids"]
    # the teacher's own run given as --exclude-run reproduces the default exclusion
    S.score(S.ScoreJob(out=str(tmp_path / "b.npz"), exclude_teacher_seen=False,
                       exclude_runs=(str(t["teacher"]),), **base), progress=False)
    np.testing.assert_array_equal(S.load_scores(tmp_path / "b.npz")["window_ids"], pool)
    # nothing excluded at all
    S.score(S.ScoreJob(out=str(tmp_path / "c.npz"), exclude_teacher_seen=False, **base), progress=False)
    everything = S.load_scores(tmp_path / "c.npz")["window_ids"]
    from salt.data import Loader

    loader = Loader(t["data"], seq_len=12, global_batch=4, seed=5)
    seen = np.unique(np.concatenate([loader.window_ids(s) for s in range(3)]))
    np.testing.assert_array_equal(np.setdiff1d(everything, pool), seen)
    np.testing.assert_array_equal(everything, np.arange(everything.size))
    # an explicit exclusion file
    outputs.save_npy(tmp_path / "ex.npy", pool[:3])
    S.score(S.ScoreJob(out=str(tmp_path / "d.npz"), exclude_files=(str(tmp_path / "ex.npy"),), **base),
            progress=False)
    np.testing.assert_array_equal(S.load_scores(tmp_path / "d.npz")["window_ids"], pool[3:])


def test_candidate_pool_of_an_imported_teacher_excludes_nothing_and_says_so(tiny_setup):
    """A checkpoint imported from Hugging Face (metadata ``hf``, no run config) saw no window of the
    store: nothing excluded, and a note says so; a SALT checkpoint without a run config is refused."""
    t = tiny_setup
    job = S.ScoreJob(teacher=str(t["teacher"]), data=str(t["data"]), out="unused.npz", seq_len=12)
    pool, n_excluded, notes = S.candidate_pool(job, {"hf": {"model_type": "llama"}}, 0, 50)
    assert n_excluded == 0 and pool.tolist() == list(range(50))
    assert len(notes) == 1 and "imported from Hugging Face (llama)" in notes[0] and "none of its windows" in notes[0]
    with pytest.raises(ValueError, match="records no run config"):
        S.candidate_pool(job, {"config": {}}, 3, 50)
    from salt.runtime.model import checkpoint

    pool, n_excluded, notes = S.candidate_pool(job, checkpoint.read_meta(t["teacher"]), 3, 50)
    assert n_excluded > 0 and notes == []
