"""salt xi (runtime/eval/xi.py): the plug-in ξ̂_t against the exact ξ_t of bigram oracles and
students (L_t by dynamic programming over the vocabulary), through the estimator core and
through the real KV-cache sampler and student loss; the CLI end to end."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from salt.cli.main import cli
from salt.reference.config import ModelConfig
from salt.runtime.eval import xi as X
from salt.runtime.model import transformer as model
from tiny_corpus import make_tiny_corpus, save_checkpoint

Z = 4.5  # a correct estimator's |error| exceeds 4.5 standard errors with probability ~7e-6 per check


def exact_L(window, A, Bmat):
    """L_0 … L_T of a bigram oracle ``A`` (rows: P*(next | prev)) and bigram student ``Bmat``."""
    T = len(window) - 1
    cost = -np.log(Bmat)                      # c(u, v) = -log f(v | u)
    cbar = (A * cost).sum(axis=1)             # expected next-token cost from u under P*
    seen = np.concatenate([[0.0], np.cumsum(cost[window[:-1], window[1:]])])
    L = np.empty(T + 1)
    for t in range(T + 1):
        dist = np.eye(A.shape[0])[window[t]]
        future = 0.0
        for _ in range(t + 1, T + 1):
            future += dist @ cbar
            dist = dist @ A
        L[t] = (seen[t] + future) / T
    return L


def bigram_functions(A, Bmat):
    """NumPy sampler (Gumbel-max, noise from the row's key and position) and loss of bigrams."""
    logA = np.log(A)

    def sample_fn(tokens, prefix_len, keys):
        out = tokens.copy()
        for b in range(out.shape[0]):
            for s in range(prefix_len[b], out.shape[1]):
                g = np.random.default_rng([int(keys[b, 0]), int(keys[b, 1]), s]).gumbel(size=A.shape[0])
                out[b, s] = np.argmax(logA[out[b, s - 1]] + g)
        return out

    def loss_fn(tokens):
        return -np.log(Bmat[tokens[:, :-1], tokens[:, 1:]]).mean(axis=1)

    return sample_fn, loss_fn


def _random_bigram(rng, V, sharpness):
    logits = sharpness * rng.normal(size=(V, V))
    P = np.exp(logits - logits.max(axis=1, keepdims=True))
    return P / P.sum(axis=1, keepdims=True)


def _z_scores(est, windows, A, Bmat):
    """|ξ̂_t − ξ_t| / se_t for every window and t (se from the paired completions)."""
    z = []
    for n, w in enumerate(windows):
        xi = np.diff(exact_L(w, A, Bmat))
        z.append(np.abs(est.xi[n] - xi) / np.maximum(est.se[n], 1e-12))
    return np.array(z)


def test_estimator_converges_to_exact_bigram_xi():
    rng = np.random.default_rng(0)
    V, T = 5, 6
    A, Bmat = _random_bigram(rng, V, 1.5), _random_bigram(rng, V, 1.0)
    windows = rng.integers(0, V, (4, T + 1))
    sample_fn, loss_fn = bigram_functions(A, Bmat)
    est = X.estimate(windows, sample_fn, loss_fn, n_com=400, seed=3, batch_rows=128)
    assert est.xi.shape == (4, T) and est.L_hat.shape == (4, T + 1)
    for n, w in enumerate(windows):
        L = exact_L(w, A, Bmat)
        assert est.L_hat[n, -1] == pytest.approx(L[-1], abs=1e-12)           # L_T = ℓ(w), no sampling
        assert est.xi[n].sum() == pytest.approx(est.L_hat[n, -1] - est.L_hat[n, 0], abs=1e-12)
    z = _z_scores(est, windows, A, Bmat)
    assert (z < Z).all(), z
    assert (est.se > 0).all() and est.se.max() < 0.05   # 400 completions: errors are small, not just z
    # the same check has power: completions from the wrong oracle fail it
    wrong_fn, _ = bigram_functions(_random_bigram(np.random.default_rng(9), V, 1.5), Bmat)
    bad = X.estimate(windows, wrong_fn, loss_fn, n_com=400, seed=3, batch_rows=128)
    assert (_z_scores(bad, windows, A, Bmat) >= Z).any()


def test_estimate_validates():
    fns = bigram_functions(np.full((3, 3), 1 / 3), np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="n_com"):
        X.estimate(np.zeros((2, 4), int), *fns, n_com=1)
    with pytest.raises(ValueError, match="windows"):
        X.estimate(np.zeros((2, 1), int), *fns, n_com=4)


def _bigram_transformer(V, seed, scale=0.5):
    """A 1-layer model whose layer adds nothing (output projections zero): its next-token
    distribution depends on the current token only, a bigram P(v | u) = softmax(forward([u]))."""
    config = ModelConfig(f"bigram-{seed}", V, 1, 16, 32, 2, 1)
    params = model.init_params(config, seed)
    params["embed"] = params["embed"] * scale  # 0.5: every P(v | u) >= 0.02, no near-certain step
    params["layers"]["wo"] = jnp.zeros_like(params["layers"]["wo"])
    params["layers"]["w_down"] = jnp.zeros_like(params["layers"]["w_down"])
    logits = np.asarray(model.forward(params, jnp.arange(V, dtype=jnp.int32)[:, None], config)[:, 0],
                        np.float64)
    P = np.exp(logits - logits.max(axis=1, keepdims=True))
    return config, params, P / P.sum(axis=1, keepdims=True)


def test_model_functions_exact_on_bigram_transformers():
    """The real path (KV-cache sampler of the oracle, student loss as salt eval computes it)
    against the exact ξ_t of two bigram transformers."""
    V, T = 10, 5
    o_config, o_params, A = _bigram_transformer(V, 1)
    s_config, s_params, Bmat = _bigram_transformer(V, 2)
    sample_fn, loss_fn = X.model_functions(s_params, s_config, o_params, o_config, vocab=V)
    windows = np.random.default_rng(4).integers(0, V, (3, T + 1))
    assert loss_fn(windows) == pytest.approx(-np.log(Bmat[windows[:, :-1], windows[:, 1:]]).mean(1),
                                             rel=1e-5)
    est = X.estimate(windows, sample_fn, loss_fn, n_com=300, seed=5, batch_rows=512)
    z = _z_scores(est, windows, A, Bmat)
    assert (z < Z).all(), z


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from salt.data import TokenStore, prepare
    from salt.reference.config import get_preset

    root = tmp_path_factory.mktemp("xi")
    prepare(root / "data", [make_tiny_corpus(root / "src")], vocab_size=300, val_fraction=0.2,
            progress=False)
    store = TokenStore(root / "data")
    for name, preset, seed in (("baseline", "tiny-student", 1), ("slm", "tiny-teacher", 2)):
        config = get_preset(preset).replace(vocab_size=store.vocab_size)
        save_checkpoint(root / name, config, model.init_params(config, seed=seed), store, 4,
                        run_config={"seq_len": 16, "batch": 4, "seed": 0, "kd_steps": 0})
    return root


def test_cli_xi_writes_table_and_plots(runs):
    from salt.runtime.eval import evaluate

    out = runs / "xi-out"
    argv = ["xi", "--run", str(runs / "baseline"), "--oracle", str(runs / "slm"), "--data",
            str(runs / "data"), "--lengths", "4,8", "--windows", "3", "--n-com", "3", "--out", str(out)]
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith(".")) == []  # no build leftovers
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # an ordinary directory, not mkdtemp's 0700
    res = json.loads((out / "xi.json").read_text())
    assert [s["T"] for s in res["by_T"]] == [4, 8]
    assert (out / "xi_hist_T4.png").stat().st_size > 0 and (out / "xi_hist_T8.png").exists()
    md = (out / "xi.md").read_text()
    assert "| 8 | 3 |" in md and "t = 8" in md and "| T | windows | t = 1 | t = 4 | t = 5 | t = 8 |" in md
    # the paper's Tables 15-16 beside it
    assert "| Table 15 (2.8B) | 64 | 0.338 | 0.133 | 0.106 | 0.087 | — | — | — |" in md
    assert "| Table 16 (1.5B) | 1280 | 0.113 |" in md
    # L̂_T is the student's own held-out loss on those windows (salt eval's numbers)
    config, params, _ = X.checkpoint.load_params(runs / "baseline")
    stats = evaluate.window_stats(params, config, runs / "data", seq_len=8, max_windows=3)
    lt = np.array(res["per_window"]["8"]["L_hat"])[:, -1]
    np.testing.assert_allclose(lt, stats["loss_sum"] / 8, rtol=1e-5)
    xi = np.array(res["per_window"]["8"]["xi"])
    np.testing.assert_allclose(np.abs(xi).mean(0), res["by_T"][1]["mean_abs_xi"], rtol=1e-12)
    # a second run into the same (now non-empty) directory is refused, nothing changed
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code != 0 and "not an empty directory" in r.output and "Traceback" not in r.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize("flag,value,message", [("--lengths", "4,x", "comma-separated integers"),
                                                ("--n-com", "1", "n-com"),
                                                ("--data", "/nonexistent/xi", "does not exist")])
def test_cli_xi_bad_input(runs, tmp_path, flag, value, message):
    args = {"--run": str(runs / "baseline"), "--oracle": str(runs / "slm"), "--data": str(runs / "data"),
            "--lengths": "4", "--windows": "2", "--out": str(tmp_path / "o"), flag: value}
    r = CliRunner().invoke(cli, ["xi"] + [x for kv in args.items() for x in kv])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_sampler_keys_are_jax_keys():
    keys = X.completion_keys(0, 4, 16)
    assert keys.shape == (4, 16, 2) and len({tuple(k) for k in keys.reshape(-1, 2)}) == 64
    assert np.array_equal(X.completion_keys(0, 2, 3)[1, 2],
                          np.asarray(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 1), 2)))
