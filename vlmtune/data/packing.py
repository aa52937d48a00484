"""Padding-free packing (`train.packing`): whole examples into bins of up to `data.max_length` tokens, one
flattened row per bin, with no attention across examples.

How the model keeps examples apart: the row has no attention mask and its position ids restart at 0 for
each example; transformers then finds the boundaries from the positions (`find_packed_sequence_indices`) and
builds a block-diagonal causal mask for SDPA / eager, or runs flash-attention varlen. Flash-attention finds
them only in a batch of one row, so under it a batch's bins become one row. Both happen only without a KV
cache, so a packed batch carries `use_cache=False` (a cache, made whenever the config's use_cache is on, would
silently give the whole row one causal block). Families with their own multi-row positions
(`Family.position_ids`, M-RoPE) get the layout transformers reads for packed rows: a text row (each example's
0..n-1) on top of the family's rows, which are each example's own unpacked positions.

The loss stays the unpacked one: each example's first token loses its label (unpacked, nothing predicts it;
packed, the previous example's last token would), so a pack's supervised tokens, and the token counts that
gradient accumulation and multi-GPU weight the loss by, are those of its examples unpacked.
"""

from __future__ import annotations

import random

import torch

from .collator import concat_padded, encoder_outputs
from .formatting import IGNORE_INDEX


def pack_bins(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Indices of examples grouped into bins of at most `capacity` tokens, first-fit-decreasing.

    Equal lengths are ordered by a shuffle drawn from `seed` (same seed, same bins); an example longer than
    the capacity gets a bin of its own (it is never split). Each bin lists its examples in placement order."""
    rng = random.Random(seed)
    tiebreak = list(range(len(lengths)))
    rng.shuffle(tiebreak)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tiebreak[i]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of the tokens of right-padded batches (each row padded to its batch's longest) that are padding."""
    total = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches if batch)
    return 1 - sum(lengths) / total if total else 0.0


def packed_dataset(rows, bins: list[list[int]]):
    """A `datasets.Dataset` (what TRL's trainer takes) with one item per bin: `{"pack": [the rows of its examples,
    as `rows` gives them]}`, fetched on access (in the DataLoader workers, like `rows` itself). `.bins` and
    `.rows` stay readable on it in this process."""
    import datasets

    table = datasets.Dataset.from_dict({"bin": bins}).with_transform(_FetchPack(rows))
    table.bins, table.rows = bins, rows
    return table


class _FetchPack:
    def __init__(self, rows):
        self.rows = rows

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {"pack": [[self.rows[i] for i in b] for b in batch["bin"]]}


class PackingCollator:
    """Bins -> a batch with one flattened row per bin, no attention mask, per-example positions (see the module
    doc). Vision tensors of all examples concatenate as in an unpadded batch (`concat_keys`); per-token inputs
    (`token_keys`) follow their tokens. Rows shorter than the batch's longest are filled with a padding block
    that supervises nothing and is positioned as a sequence of its own."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None,
                 concat_keys: tuple[str, ...] = ("pixel_values",), token_keys: tuple[str, ...] = (),
                 multirow_positions: bool = False, unpacked=None, one_row: bool = False, combine=None):
        self.combine = combine  # Family.combine_encoder_outputs: examples with cached vision features
        # flash-attention finds packed examples only in a batch of one row (transformers' _is_packed_sequence):
        # one_row puts all bins of the batch into a single row (the loss is the same token-weighted mean)
        self.one_row = one_row
        self.unpacked = unpacked  # the collator of batches of plain rows (eval), if any
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.concat_keys = concat_keys
        self.token_keys = token_keys
        self.multirow_positions = multirow_positions

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.unpacked is not None and features and "pack" not in features[0]:
            return self.unpacked(features)
        packs = [[r for r in f["pack"] if not r.get("bad_sample")] for f in features]
        bad = [r["bad_sample"] for f in features for r in f["pack"] if r.get("bad_sample")]
        packs = [p for p in packs if p] or [[self._placeholder()]]
        if self.one_row:
            packs = [[e for p in packs for e in p]]
        rows = [self._flatten(p) for p in packs]
        length = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        batch = {"input_ids": torch.stack([_fill(r["input_ids"], length, self.pad_token_id) for r in rows]),
                 "labels": torch.stack([_fill(r["labels"], length, IGNORE_INDEX) for r in rows])}
        batch["position_ids"] = torch.stack([_fill_positions(r["position_ids"], length) for r in rows], dim=-2)
        for key in self.token_keys:
            if any(key in r for r in rows):
                batch[key] = torch.stack([_fill(r.get(key, torch.zeros(0, dtype=torch.long)), length, 0)
                                          for r in rows])
        examples = [e for p in packs for e in p]
        for key in self.concat_keys:
            parts = [e[key] for e in examples if e.get(key) is not None]
            if parts:
                batch[key] = concat_padded(parts)
        cached = [e["encoder_outputs"] for e in examples if e.get("encoder_outputs")]
        if cached:  # in the order of the examples, as the vision tensors above
            batch["mm_encoder_outputs"] = encoder_outputs(cached, self.combine)
        # with a cache the model skips finding the examples from the positions (one causal block for the row)
        batch["use_cache"] = False
        if bad:
            batch["bad_samples"] = bad
        return batch

    def _flatten(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """One bin's examples as one row: ids, labels (first token of each unlabelled), positions, token keys."""
        labels = []
        for e in examples:
            own = e["labels"].clone()
            own[:1] = IGNORE_INDEX
            labels.append(own)
        text = [torch.arange(len(e["input_ids"])) for e in examples]
        if self.multirow_positions:
            positions = torch.cat([torch.cat([t[None], e["position_ids"]]) for t, e in zip(text, examples, strict=True)], dim=1)
        else:
            positions = torch.cat(text)
        row = {"input_ids": torch.cat([e["input_ids"] for e in examples]), "labels": torch.cat(labels),
               "position_ids": positions}
        for key in self.token_keys:
            if any(e.get(key) is not None for e in examples):
                row[key] = torch.cat([e[key] if e.get(key) is not None else torch.zeros_like(e["input_ids"])
                                      for e in examples])
        return row

    def _placeholder(self) -> dict[str, torch.Tensor]:
        """A one-token example that supervises nothing: the stand-in for a batch whose every row failed."""
        one = {"input_ids": torch.tensor([self.pad_token_id]), "labels": torch.tensor([IGNORE_INDEX])}
        if self.multirow_positions:
            one["position_ids"] = torch.zeros((3, 1), dtype=torch.long)
        return one


def _fill(values: torch.Tensor, length: int, value: int) -> torch.Tensor:
    out = torch.full((length,), value, dtype=torch.long)
    out[:len(values)] = values
    return out


def _fill_positions(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Positions grown to `length`; the padding block counts from 0, so the model sees it as a sequence apart."""
    n = positions.shape[-1]
    tail = torch.arange(length - n).expand(*positions.shape[:-1], -1)
    return torch.cat([positions, tail], dim=-1)


def packing_collator_for(family, pad_token_id: int, pad_to_multiple_of: int | None = None,
                         unpacked=None, attention: str = "sdpa") -> PackingCollator:
    """The packing collator for one family's examples; batches of plain rows go to `unpacked` (eval's)."""
    return PackingCollator(pad_token_id, pad_to_multiple_of, family.concat_keys, family.token_keys,
                           multirow_positions=family.position_ids is not None, unpacked=unpacked,
                           one_row=attention.startswith("flash"), combine=family.combine_encoder_outputs)


def pack_dataset(rows, lengths: list[int], capacity: int, seed: int, log=print):
    """`rows` (one per example) as packed rows of up to `capacity` tokens, with a line on what packing saved."""
    bins = pack_bins(lengths, capacity, seed)
    log(f"packing: {len(lengths)} examples into {len(bins)} rows of up to {capacity} tokens")
    return packed_dataset(rows, bins)
