"""What every attention backend agrees on: the mask as per-position vectors, and the masked-score value.

Kept apart from `attention.py` (the backends and the dispatcher) so that a backend
module such as `splash.py` can use these without importing the dispatcher that
imports it. The rule the vectors describe is in `attention.py`'s docstring.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# A large negative, finite number: fully masked rows (pad queries) give a uniform
# softmax instead of NaNs, so gradients stay finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttentionMask(NamedTuple):
    """Which keys each query sees, as vectors (see `grpo_jax.models.attention` for the rule)."""

    q_slots: jax.Array  # [T] int32: slot of each query (its index in the sequence, or its cache slot)
    kv_slots: jax.Array  # [S] int32: slot of each key
    kv_valid: jax.Array  # [B, S] bool: the key is a real token
    q_segments: Optional[jax.Array] = None  # [B, T] int32: packed-sequence id of each query
    kv_segments: Optional[jax.Array] = None  # [B, S] int32: packed-sequence id of each key
