"""salt.data: corpus, tokenizer, packed token store and the deterministic loader.

``prepare(out_dir, sources=None, ...)`` builds a store (``salt data prepare``);
``TokenStore(dir)`` opens one; ``Loader`` yields resumable, process-sharded batches of
windows; ``validation_batches`` iterates over the held-out split in fixed order.
"""
from salt.data.corpus import CorpusStats, embedded_corpus, resolve_sources
from salt.data.loader import Loader, validation_batches
from salt.data.build import (DEFAULT_VAL_FRACTION, EMBEDDED_VOCAB_SIZE, default_vocab_size,
                               prepare, summary_lines)
from salt.data.store import TokenStore
from salt.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, UNK_ID, VocabSizeError,
                                 encode_document, load_processor, train_tokenizer)

__all__ = [
    "prepare", "TokenStore", "Loader", "validation_batches",
    "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID", "SPECIAL_IDS",
    "DEFAULT_VAL_FRACTION", "EMBEDDED_VOCAB_SIZE", "default_vocab_size", "summary_lines",
    "CorpusStats", "embedded_corpus", "resolve_sources",
    "VocabSizeError", "encode_document", "load_processor", "train_tokenizer",
]
