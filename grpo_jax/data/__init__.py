"""Data: sources -> rows `{prompt, answer, ...}` -> resumable batches -> left-padded prompt ids.

    from grpo_jax.data import load_dataset, batches, PromptFormatter

    train = load_dataset(cfg.data, cfg.data.split, seed=cfg.run.seed)
    it = batches(train, cfg.data.batch_size, cfg.run.seed, shuffle=cfg.data.shuffle,
                 process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)                       # dict of lists: prompt, answer, other columns, index, valid
    enc = PromptFormatter.from_config(cfg.data, tokenizer).encode(
        batch["prompt"], cfg.rollout.max_prompt_length, cfg.data.overlong_prompts)
    it.state()                             # {"epoch", "position", "dropped"}: checkpoint it; restore with it.restore(s)

See `dataset.py` for the `Dataset` / `DataError` types, `sources.py` for the sources,
`iterator.py` for ordering / sharding and `prompts.py` for templating.
"""

from grpo_jax.data.builtin import ProceduralDataset, make_arithmetic, make_countdown, verify_countdown
from grpo_jax.data.dataset import DataError, Dataset
from grpo_jax.data.iterator import BatchIterator, batches, collate, epoch_permutation, overlong_filter, run_batches
from grpo_jax.data.prompts import (
    R1_SYSTEM_PROMPT,
    SYSTEM_PROMPTS,
    EncodedPrompts,
    PromptFormatter,
    encode_ids,
    pad_token_id,
    resolve_system_prompt,
)
from grpo_jax.data.sources import (
    ListDataset,
    ReasoningGymDataset,
    TfdsDataset,
    load_dataset,
    map_row,
    read_jsonl,
    resolve_files,
)

__all__ = [
    "BatchIterator", "DataError", "Dataset", "EncodedPrompts", "ListDataset", "ProceduralDataset", "PromptFormatter",
    "R1_SYSTEM_PROMPT", "ReasoningGymDataset", "SYSTEM_PROMPTS", "TfdsDataset", "batches", "collate", "encode_ids",
    "epoch_permutation", "load_dataset", "make_arithmetic", "make_countdown", "map_row", "overlong_filter",
    "pad_token_id",
    "read_jsonl", "resolve_files", "run_batches", "resolve_system_prompt", "verify_countdown",
]
