"""Model shapes by name: the HF config.json fields of the models people fine-tune, without a download.

`python -m launch plan --model-preset qwen2.5-7b` and a run config whose model.path is a hub id
(planned without downloading it) read their decoder shape from here.
"""

from __future__ import annotations

import re
from typing import Optional

# The fields of each model's HF config.json that shape it (copied from the hub's config files).
_QWEN2 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0,
              max_position_embeddings=32768, use_sliding_window=False, attention_bias=True)
_QWEN3 = dict(model_type="qwen3", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0,
              max_position_embeddings=40960, use_sliding_window=False, attention_bias=False, head_dim=128)
_LLAMA32 = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500_000.0,
                max_position_embeddings=131072, vocab_size=128256,
                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))

PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100_000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, hidden_act="silu"),
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100_000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, hidden_act="silu"),
    "qwen2.5-0.5b": dict(_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(_QWEN2, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-math-1.5b": dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                              tie_word_embeddings=True, rope_theta=10_000.0, max_position_embeddings=4096),
    "qwen2.5-math-7b": dict(_QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                            rope_theta=10_000.0, max_position_embeddings=4096),
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=False),
    "llama3.2-1b": dict(_LLAMA32, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama3.2-3b": dict(_LLAMA32, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "llama3.1-8b": dict(_LLAMA32, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                        rope_scaling=dict(_LLAMA32["rope_scaling"], factor=8.0)),
}


def preset_name(name_or_path: str) -> Optional[str]:
    """The preset a model name or hub id refers to ("Qwen/Qwen2.5-7B-Instruct" -> "qwen2.5-7b"), or None."""
    key = name_or_path.rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-")
    key = re.sub(r"-(instruct|it|base|chat)$", "", key)
    key = key.replace("llama-3.", "llama3.")
    return key if key in PRESETS else None
