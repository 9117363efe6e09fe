"""Small models built from scratch, written as ordinary HF folders.

`make_char_model` writes a Qwen2-style decoder with random weights and a
character-level tokenizer, so a demo or a test can run the whole pipeline (SFT,
GRPO, eval, export) offline in minutes on a CPU, through the same loaders a
hub model goes through.
"""

from __future__ import annotations

import string
from pathlib import Path

CHARS = list(string.ascii_letters + string.digits + " .,?!+-*/=:;<>()#'\"\n")
SPECIAL = ["<pad>", "<eos>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}<eos>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def char_tokenizer():
    """One token per character (letters, digits, punctuation, space, newline) plus <pad>, <eos>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    out.chat_template = CHAT_TEMPLATE
    return out


def make_char_model(folder, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                    mlp: int = 384, seed: int = 0, vocab: int = 96):
    """Write a random-init Qwen2-style model + char tokenizer to `folder` (an HF folder); returns it."""
    from flax import nnx

    from grpo_jax.models.hf import export_hf
    from grpo_jax.models.transformer import Transformer, TransformerConfig

    folder = Path(folder)
    tokenizer = char_tokenizer()
    if len(tokenizer) > vocab:
        raise ValueError(f"vocab={vocab} is smaller than the {len(tokenizer)}-token character tokenizer")
    config = TransformerConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hidden // heads, rope_theta=10000.0, tie_word_embeddings=True,
        qkv_bias=True, model_type="qwen2", max_position_embeddings=1024)
    model = Transformer(config, rngs=nnx.Rngs(seed))
    export_hf(model, config, folder, tokenizer=tokenizer)
    return folder
