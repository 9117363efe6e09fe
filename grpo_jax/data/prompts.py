"""Prompt text (plain or chat template, optional system prompt) and tokenisation.

    fmt = PromptFormatter.from_config(cfg.data, tokenizer)
    enc = fmt.encode(batch["prompt"], max_prompt_length=cfg.rollout.max_prompt_length,
                     overlong=cfg.data.overlong_prompts)
    enc.ids, enc.mask      # [B', P] int32 / bool, left-padded
    enc.kept               # indices into the batch of the rows in ids (all rows unless dropped)
    enc.num_truncated, enc.num_dropped

Chat: the messages are `[system?] + user` (or the row's own message list) through
`tokenizer.apply_chat_template(..., add_generation_prompt=True)`, then tokenised
without adding special tokens again (the template carries BOS where the model
wants it). Plain (no template, or `data.chat_template=false`): the prompt text
itself, or `"{system}\\nUser: {prompt}\\nAssistant:"` with a system prompt (the
R1-Zero layout), tokenised with the tokenizer's special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from grpo_jax.config import OVERLONG_PROMPTS
from grpo_jax.data.dataset import DataError

R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)

SYSTEM_PROMPTS = {"r1": R1_SYSTEM_PROMPT}
"""Presets for `data.system_prompt`; any other value is used as the text itself."""

Prompt = Union[str, Sequence[dict]]


def resolve_system_prompt(value: Optional[str]) -> Optional[str]:
    """A preset name (`r1`) -> its text; other text unchanged; None / "" -> None."""
    if not value:
        return None
    return SYSTEM_PROMPTS.get(value.strip(), value)


@dataclass
class EncodedPrompts:
    ids: np.ndarray  # [B', P] int32, left-padded with pad_id
    mask: np.ndarray  # [B', P] bool, True on real tokens
    lengths: np.ndarray  # [B'] int32 tokens per prompt (after truncation)
    kept: np.ndarray  # [B'] int64 indices into the input rows (all of them unless some were dropped)
    num_truncated: int  # prompts cut from the left to max_prompt_length
    num_dropped: int  # prompts left out for being too long (overlong="drop")
    texts: list[str]  # the templated text of every input row

    def metrics(self) -> dict[str, float]:
        return {"data/prompts_truncated": float(self.num_truncated), "data/prompts_dropped": float(self.num_dropped),
                "data/prompt_length_mean": float(self.lengths.mean()) if len(self.lengths) else 0.0,
                "data/prompt_length_max": float(self.lengths.max()) if len(self.lengths) else 0.0}


def pad_token_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


class PromptFormatter:
    """Turns dataset prompts into text and left-padded token ids for one tokenizer."""

    def __init__(self, tokenizer, system_prompt: Optional[str] = None, chat_template: bool = True,
                 assistant_prefix: str = ""):
        self.tokenizer = tokenizer
        self.system_prompt = resolve_system_prompt(system_prompt)
        self.assistant_prefix = assistant_prefix
        self.use_chat = bool(chat_template) and bool(getattr(tokenizer, "chat_template", None))
        self.pad_id = pad_token_id(tokenizer)

    @classmethod
    def from_config(cls, data_cfg, tokenizer) -> "PromptFormatter":
        return cls(tokenizer, data_cfg.system_prompt, data_cfg.chat_template, data_cfg.assistant_prefix)

    def messages(self, prompt: Prompt) -> list[dict]:
        if isinstance(prompt, str):
            msgs = [{"role": "user", "content": prompt}]
        else:
            msgs = [dict(m) for m in prompt]
        if self.system_prompt and not any(m.get("role") == "system" for m in msgs):
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        return msgs

    def text(self, prompt: Prompt) -> str:
        """The text the model sees before its completion, ending in data.assistant_prefix."""
        return self._framed(prompt) + self.assistant_prefix

    def _framed(self, prompt: Prompt) -> str:
        if self.use_chat:
            out = self.tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)
            if not isinstance(out, str):  # some versions return a list for a single conversation
                out = out[0]
            return out
        if not isinstance(prompt, str):
            raise DataError("a prompt given as chat messages needs a tokenizer with a chat template "
                            "(and data.chat_template=true)")
        if self.system_prompt:
            return f"{self.system_prompt}\nUser: {prompt}\nAssistant:"
        return prompt

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), add_special_tokens=not self.use_chat)
        return [list(map(int, ids)) for ids in enc["input_ids"]]

    def encode(self, prompts: Sequence[Prompt], max_prompt_length: int,
               overlong: str = "truncate_left", pad_to: Optional[int] = None) -> EncodedPrompts:
        texts = [self.text(p) for p in prompts]
        return encode_ids(self.token_ids(texts), max_prompt_length, overlong, self.pad_id, pad_to, texts)

    def is_overlong(self, prompt: Prompt, max_prompt_length: int) -> bool:
        """For `batches(..., keep=...)`: drop rows before they reach a batch, keeping batches full."""
        return len(self.token_ids([self.text(prompt)])[0]) > max_prompt_length


def encode_ids(token_ids: Sequence[Sequence[int]], max_prompt_length: int, overlong: str = "truncate_left",
               pad_id: int = 0, pad_to: Optional[int] = None, texts: Optional[list[str]] = None) -> EncodedPrompts:
    """Left-pad token id lists into [B', P]; P = the longest kept prompt, or `pad_to`.

    overlong="truncate_left" keeps the last max_prompt_length tokens (the end of
    the prompt, next to the generation, matters most); "drop" leaves such rows out
    (`kept` says which rows remain).
    """
    if overlong not in OVERLONG_PROMPTS:
        raise DataError(f"data.overlong_prompts={overlong!r}: expected one of {', '.join(OVERLONG_PROMPTS)}")
    if max_prompt_length <= 0:
        raise DataError("rollout.max_prompt_length must be positive")
    rows, kept, truncated, dropped = [], [], 0, 0
    for i, ids in enumerate(token_ids):
        ids = list(ids)
        if len(ids) > max_prompt_length:
            if overlong == "drop":
                dropped += 1
                continue
            ids = ids[-max_prompt_length:]
            truncated += 1
        if not ids:
            raise DataError(f"prompt {i} is empty after tokenisation")
        rows.append(ids)
        kept.append(i)
    width = max((len(r) for r in rows), default=0)
    if pad_to is not None and pad_to < width:
        raise DataError(f"pad_to={pad_to} is shorter than the longest prompt ({width} tokens)")
    ids = np.full((len(rows), width), pad_id, np.int32)  # the rows, right-aligned at the longest one's width
    mask = np.zeros((len(rows), width), bool)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = True
    if pad_to is not None:
        ids, mask = pad_prompts_left(ids, mask, pad_to, pad_id)
    return EncodedPrompts(ids=ids, mask=mask, lengths=np.array([len(r) for r in rows], np.int32),
                          kept=np.array(kept, np.int64), num_truncated=truncated, num_dropped=dropped,
                          texts=list(texts) if texts is not None else [])


def pad_prompts_left(prompt_ids, prompt_mask, length: int, pad_token_id: int):
    """Left-pad [B, P] prompts to [B, length] (host side, numpy): the one home of left padding (the
    encoder, the sampler's prompt buckets and SFT all pad through it)."""
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
    extra = length - ids.shape[1]
    if extra < 0:
        # keep the right end: left-padded prompts may only drop leading padding
        if mask[:, :-length].any():
            raise ValueError(f"prompts hold more than {length} tokens")
        return ids[:, -length:], mask[:, -length:]
    ids = np.concatenate([np.full((ids.shape[0], extra), pad_token_id, ids.dtype), ids], axis=1)
    mask = np.concatenate([np.zeros((mask.shape[0], extra), bool), mask], axis=1)
    return ids, mask
