"""Tiny real inputs for tests: a deterministic pseudo-text corpus (enough distinct pieces for a
300-token SentencePiece vocabulary, prepared in about a second) and a checkpoint writer for
hand-made parameters."""
import numpy as np

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "fa", "gu", "zi", "ve", "ba"]


def make_tiny_corpus(directory, n_docs=40, words=300, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join("".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(words))
        (directory / f"doc{i:03d}.txt").write_text(text + "\n")
    return directory


def save_checkpoint(run_dir, config, params, store, step, run_config=None):
    """A checkpoint in the trainer's layout (params + meta) without training."""
    from salt.runtime.model import checkpoint

    meta = {"config": config.to_dict(), "tokenizer_sha256": store.tokenizer_sha256,
            "vocab_size": int(store.vocab_size), "teacher": None, "preset": config.name}
    if run_config is not None:  # recorded as the trainer records it: a whole TrainConfig
        from salt.runtime.train.config import TrainConfig
        base = TrainConfig(preset=config.name, data=str(store.path), out=str(run_dir))
        meta["run_config"] = {**base.to_dict(), **run_config}
    checkpoint.save(run_dir, step, params, {"count": np.zeros((), np.int32)}, meta)
