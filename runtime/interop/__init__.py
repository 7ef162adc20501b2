"""Interoperability with Hugging Face checkpoints: ``salt import hf`` and ``salt export hf``
(docs/interop.md)."""
