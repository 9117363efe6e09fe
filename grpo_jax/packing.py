"""Sequence packing for the update: several (prompt + completion) sequences per row, on the host.

R1-style completions differ wildly in length, and a padded batch makes every row as long as the
longest. Packing lays the sequences end to end into rows of `length` tokens with a segment id
per token (attention stays inside a segment; positions restart per sequence, so each token sees
exactly what it saw in its padded row) and leaves the loss where it was: the loss-side arrays
(completion mask, advantages, old / reference log-probs) stay one row per sequence, [R, N], and
`trainer.completion_logprobs` gathers each sequence's completion log-probs out of the packed rows.
The loss types keep their TRL semantics because they never see the packed layout.

Layout (what makes micro-batches and devices line up): the R sequences are dealt to
`units = devices x micro-batches` units of R / units each, balanced by tokens, and each unit packs
its sequences into `rows_per_unit` rows (first-fit decreasing). Unit (device d, micro-batch i)
holds loss rows d * R/dp + j * count + i and packed rows d * Rp/dp + b * count + i, the same
strided order `trainer.split_micro_batches` and the rows-over-devices sharding use, so a device's
micro-batch finds its sequences in its own packed rows. The loss rows are a permutation of the
padded batch's rows (`PackedRows.order`); the loss does not depend on row order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PackedRows(NamedTuple):
    """Host arrays of one packed batch (global row order of this process's rows)."""

    tokens: np.ndarray  # [Rp, L] int32
    positions: np.ndarray  # [Rp, L] int32: restart at 0 for each sequence
    attention_mask: np.ndarray  # [Rp, L] bool: a real token
    segment_ids: np.ndarray  # [Rp, L] int32: 1, 2, ... per sequence in a row; 0 on padding
    source_row: np.ndarray  # [R] int32: the packed row holding loss row k's sequence
    source_start: np.ndarray  # [R] int32: the column of its first completion token
    order: np.ndarray  # [R] int: loss row k is the padded batch's row order[k]


def rows_needed(lengths, units: int, length: int) -> int:
    """Packed rows per unit that `lengths` need (before rounding to a bucket)."""
    return max(len(b) for b in _plan(np.asarray(lengths), units, length)[1])


BUCKETS = 8  # packed row counts a run can compile: eighths of the padded row count


def bucket_rows(needed: int, per_unit_max: int) -> int:
    """Rows per unit rounded up to a multiple of per_unit_max / BUCKETS: at most BUCKETS compiled shapes,
    and at most 1/BUCKETS of the padded rows wasted (a power of two could waste half)."""
    step = -(-per_unit_max // BUCKETS)
    return min(-(-max(needed, 1) // step) * step, per_unit_max)


def _plan(lengths: np.ndarray, units: int, length: int):
    """(sequences of each unit, bins of each unit: lists of sequence ids) for sequences of `lengths`."""
    rows = len(lengths)
    if rows % units:
        raise ValueError(f"{rows} rows do not split into {units} packing units (devices x micro-batches)")
    if lengths.max(initial=0) > length:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit a packed row of {length}")
    per_unit = rows // units
    load, members = np.zeros(units), [[] for _ in range(units)]
    for seq in np.argsort(-lengths, kind="stable"):  # longest first, to the lightest unit with room
        open_units = [u for u in range(units) if len(members[u]) < per_unit]
        u = min(open_units, key=lambda x: (load[x], x))
        members[u].append(int(seq))
        load[u] += lengths[seq]
    bins = []
    for seqs in members:  # first-fit decreasing into rows of `length` tokens
        unit_bins, room = [], []
        for seq in seqs:
            fit = next((b for b, free in enumerate(room) if free >= lengths[seq]), None)
            if fit is None:
                unit_bins.append([]), room.append(length)
                fit = len(room) - 1
            unit_bins[fit].append(seq)
            room[fit] -= lengths[seq]
        bins.append(unit_bins)
    return members, bins


def pack(prompt_ids, prompt_mask, completion_ids, completion_mask, *, devices: int, micro_batches: int,
         length: int, rows_per_unit: int, pad_token_id: int = 0) -> PackedRows:
    """Pack left-padded prompts [R, P] + completions [R, N] (masks: real tokens) into rows of `length`.

    devices: this process's share of the mesh's data x fsdp devices (the row blocks of its arrays);
    micro_batches: the update's micro-batch count; rows_per_unit: packed rows per (device, micro-batch)
    unit, the same on every process (a bucket of `rows_needed`, agreed with the other processes).
    """
    prompt_ids, completion_ids = np.asarray(prompt_ids), np.asarray(completion_ids)
    prompt_mask, completion_mask = np.asarray(prompt_mask, bool), np.asarray(completion_mask, bool)
    rows = completion_ids.shape[0]
    prompt_len, completion_len = prompt_mask.sum(1), completion_mask.sum(1)
    units = devices * micro_batches
    members, bins = _plan(prompt_len + completion_len, units, length)
    if max(len(b) for b in bins) > rows_per_unit:
        raise ValueError(f"the sequences need {max(len(b) for b in bins)} packed rows per unit, more than "
                         f"rows_per_unit={rows_per_unit}")
    packed_rows = units * rows_per_unit
    tokens = np.full((packed_rows, length), pad_token_id, np.int32)
    positions = np.zeros((packed_rows, length), np.int32)
    segments = np.zeros((packed_rows, length), np.int32)
    source_row, source_start = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    order = np.zeros(rows, np.int64)
    per_unit, per_device_loss, per_device_packed = rows // units, rows // devices, packed_rows // devices
    for unit, (seqs, unit_bins) in enumerate(zip(members, bins)):
        device, micro = divmod(unit, micro_batches)
        slot_of = {seq: j for j, seq in enumerate(seqs)}
        for b, row_seqs in enumerate(unit_bins):
            packed = device * per_device_packed + b * micro_batches + micro
            col = 0
            for segment, seq in enumerate(row_seqs, start=1):
                p, c = int(prompt_len[seq]), int(completion_len[seq])
                piece = np.concatenate([prompt_ids[seq][prompt_mask[seq]], completion_ids[seq, :c]])
                tokens[packed, col:col + p + c] = piece
                positions[packed, col:col + p + c] = np.arange(p + c)
                segments[packed, col:col + p + c] = segment
                loss_row = device * per_device_loss + slot_of[seq] * micro_batches + micro
                order[loss_row], source_row[loss_row], source_start[loss_row] = seq, packed, col + p
                col += p + c
        assert len(seqs) == per_unit
    return PackedRows(tokens, positions, segments > 0, segments, source_row, source_start, order)


def pack_over_mesh(prompt_ids, prompt_mask, completion_ids, completion_mask, *, devices: int, micro_batches: int,
                   length: int, pad_token_id: int, global_max=max) -> PackedRows:
    """`pack` this process's rows for `devices` local data-parallel devices x `micro_batches`.

    Rows per (device, micro-batch) unit must be the same on every process: the most any needs
    (global_max: `distributed.global_max` in a run), rounded up to a bucket (`bucket_rows`), so a
    run compiles a few packed shapes. length: tokens per packed row."""
    lengths = np.asarray(prompt_mask).sum(1) + np.asarray(completion_mask).sum(1)
    units = devices * micro_batches
    per_unit = bucket_rows(global_max(rows_needed(lengths, units, length)), len(lengths) // units)
    return pack(prompt_ids, prompt_mask, completion_ids, completion_mask, devices=devices,
                micro_batches=micro_batches, length=length, rows_per_unit=per_unit, pad_token_id=pad_token_id)
