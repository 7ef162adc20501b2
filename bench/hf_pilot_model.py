"""The tiny Hugging Face model of the pilot in docs/interop.md (``salt reproduce --teacher`` with an
imported teacher): a byte-level BPE trained on SALT's embedded corpus (eos and pad added after the
learned pieces; no bos, no unk) and a random LlamaForCausalLM whose vocabulary (4160) pads the
tokenizer's (4096), saved with ``save_pretrained`` beside the tokenizer files.

    PYTHONSAFEPATH=1 python -m salt.bench.hf_pilot_model OUT_DIR     # needs the interop extra

OUT_DIR must not exist."""
import json
import pathlib
import sys

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from salt.data.corpus import CorpusStats, embedded_corpus, iter_documents

out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True)
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(iter_documents(embedded_corpus(), CorpusStats()), trainers.BpeTrainer(
    vocab_size=4094, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
tok.add_special_tokens(["<|endoftext|>", "<pad>"])
print("tokenizer vocab", tok.get_vocab_size(), "eos", tok.token_to_id("<|endoftext|>"), "pad", tok.token_to_id("<pad>"))
tok.save(str(out / "tokenizer.json"))
(out / "tokenizer_config.json").write_text(json.dumps({
    "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<pad>",
    "bos_token": None, "unk_token": None}))
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=4160, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                  max_position_embeddings=512, initializer_range=0.02,
                                  eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<pad>"),
                                  bos_token_id=None)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(out)
print("saved", out, sum(p.numel() for p in model.parameters()), "parameters")
