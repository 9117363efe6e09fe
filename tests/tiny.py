"""A tiny random HF model with a character-level tokenizer, saved to a folder: a whole
run config can point `model.path` at it, as a user points it at a hub model."""

from __future__ import annotations

import string
from pathlib import Path

CHARS = list(string.ascii_letters + string.digits + " .,?!+-*/=:<>()#\n")
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_tiny_model(folder, seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 96,
                    allow_small_vocab: bool = False):
    """Qwen2-style tiny model (tied embeddings, GQA 2) + tokenizer in `folder`; returns the folder.

    allow_small_vocab builds an embedding smaller than the tokenizer (a mismatch, for error tests)."""
    import torch
    import transformers

    folder = Path(folder)
    tokenizer = make_tokenizer()
    assert allow_small_vocab or len(tokenizer) <= vocab
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
