"""A deterministic pseudo-text corpus for tests that need a real token store.

Enough distinct pieces for a 300-token SentencePiece vocabulary, small enough to prepare
in about a second.
"""
import numpy as np

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "fa", "gu", "zi", "ve", "ba"]


def make_tiny_corpus(directory, n_docs=40, words=300, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join("".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(words))
        (directory / f"doc{i:03d}.txt").write_text(text + "\n")
    return directory
