"""Packed dataset micro-batches (`packing=True`): several dataset rows share one row of at most ``max_length`` tokens.

A dataset micro-batch comes from GKD's collator left-padded to its longest row. With ``packing=True``
`SpecKDTrainer` packs each dataset micro-batch (after its kind is drawn: on-policy and `seq_kd` micro-batches stay
padded) into rows of at most ``max_length`` tokens with TRL's best-fit-decreasing packer (`trl.pack_dataset`'s
``"bfd"``, through `compat.pack_bfd`). Each sequence keeps its tokens in order; ``position_ids`` restart at 0 at each
sequence, and the models are called with them and without a 2-D attention mask, so transformers builds the
block-diagonal causal mask (eager and sdpa: `masking_utils.find_packed_sequence_indices`; flash attention: varlen).

The causal shift by one never crosses a sequence: the label of each sequence's first token is -100 in the packed
row, so the position before it (the previous sequence's last token) is not in the loss, and its gate sees no
completion position there. (GKD's collator never labels a row's first token: every row has a prompt.)

`Packed` keeps the map from packed positions to the padded ones, so that what is per row stays per row: the
teacher cache finds each sequence by its own tokens (`Packed.sparse_teacher`), the reward statistics are per sequence
(`Packed.to_padded`) and the tests compare a packed micro-batch with the same rows padded, position by position.

Shapes: ``B`` padded rows, ``L`` their length, ``R`` packed rows, ``W`` their length; the shifted grids (one output
per next token) are ``[B, L - 1]`` and ``[R, W - 1]``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from .compat import pack_bfd


PACKED_KEY = "speckd_packed"  # batch key of a packed micro-batch's `Packed`
PACKED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class Packed:
    """The layout of a packed micro-batch: where each packed position came from.

    Attributes:
        index (`torch.LongTensor` of shape `[R, W]`): flat index into the padded `[B * L]` of each packed token, -1 on
            the packed rows' own trailing padding.
        position_ids (`torch.LongTensor` of shape `[R, W]`): 0, 1, ... within each sequence (the trailing padding is
            one more sequence, whose outputs are never read).
        padded (`dict`): the padded micro-batch's `input_ids`, `attention_mask` and `labels` `[B, L]`.
    """

    index: torch.Tensor
    position_ids: torch.Tensor
    padded: dict[str, torch.Tensor]

    @property
    def shifted_index(self) -> torch.Tensor:
        """Long `[R, W - 1]`: for each output position of a packed row, the padded output position (flat into
        `[B * (L - 1)]`) that predicts the same token from the same context; -1 where the token predicted is padding or
        a sequence's first token (no such output in the loss)."""
        length = self.padded["input_ids"].size(1)
        target = self.index[:, 1:]  # the token each output predicts
        starts = self.position_ids[:, 1:] == 0
        row, col = target.div(length, rounding_mode="floor"), target % length
        out = row * (length - 1) + col - 1
        return torch.where((target >= 0) & ~starts, out, -1)

    @property
    def sequence_ids(self) -> torch.Tensor:
        """Long `[R, W - 1]`: the padded row of the token each output predicts, -1 off the sequences."""
        length = self.padded["input_ids"].size(1)
        target = self.index[:, 1:]
        return torch.where(target >= 0, target.div(length, rounding_mode="floor"), -1)

    def to_padded(self, values: torch.Tensor, fill: Any = 0) -> torch.Tensor:
        """Values `[R, W - 1]` of the packed output positions in their padded places `[B, L - 1]` (`fill` elsewhere)."""
        B, L = self.padded["input_ids"].shape
        at = self.shifted_index.flatten()
        keep = at >= 0
        out = values.new_full((B * (L - 1),), fill)
        out[at[keep]] = values.flatten()[keep]
        return out.view(B, L - 1)

    def from_padded(self, values: torch.Tensor, fill: Any = 0) -> torch.Tensor:
        """Values `[B, L - 1, ...]` of the padded output positions in their packed places `[R, W - 1, ...]`."""
        at = self.shifted_index
        flat = values.flatten(0, 1)[at.clamp(min=0)]
        keep = (at >= 0).view(*at.shape, *([1] * (values.dim() - 2)))
        return torch.where(keep, flat, torch.as_tensor(fill, dtype=values.dtype, device=values.device))

    def sparse_teacher(self, cache: Any, completion: torch.Tensor) -> Any:
        """A teacher cache's rows for this micro-batch in the packed layout `[R, W - 1, K]`: each sequence is found by
        its own tokens (`TeacherCache.batch` on the padded rows), then moved to its packed places."""
        from .sparse_teacher import SparseTeacher

        padded = self.padded
        cached = cache.batch(padded["input_ids"], padded["attention_mask"], padded["labels"][:, 1:] != -100)
        ids = self.from_padded(cached.ids, 0)
        values = self.from_padded(cached.values, float(cached.values.min()) if cached.values.numel() else 0.0)
        log_tail = self.from_padded(cached.log_tail, float(cached.log_tail.min()) if cached.log_tail.numel() else 0.0)
        valid = None if cached.valid is None else self.from_padded(cached.valid, False)
        return SparseTeacher(ids, values, log_tail, cached.vocab_size, valid)


def pack_micro_batch(inputs: dict[str, Any], max_length: int, pad_token_id: int) -> dict[str, Any]:
    """A padded dataset micro-batch packed into rows of at most `max_length` tokens (best fit decreasing).

    `input_ids`, `attention_mask` and `labels` are replaced by their packed `[R, W]` forms (`attention_mask`: 1 on the
    sequences' tokens, for counting; the models are called without it, `model_inputs`); `position_ids` restart at
    each sequence; the layout is under `PACKED_KEY`. Other keys (the prompts) are kept as they are.
    """
    input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    B, L = input_ids.shape
    mask = attention_mask.bool().cpu()
    flat = torch.arange(B * L).view(B, L)
    rows = [flat[b][mask[b]] for b in range(B)]
    for row in rows:  # each row's tokens are contiguous (left or right padding)
        if row.numel() and int(row[-1] - row[0]) + 1 != row.numel():
            raise ValueError(
                "packing=True: a dataset row's attention_mask has holes (padding between its tokens); only left- "
                "or right-padded rows can be packed."
            )
    bins, seq_lengths = best_packing([row.tolist() for row in rows], max_length)
    width = max(len(b) for b in bins)
    index = torch.full((len(bins), width), -1, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    for r, (positions, lengths) in enumerate(zip(bins, seq_lengths)):
        index[r, : len(positions)] = torch.as_tensor(positions, dtype=torch.long)
        position_ids[r] = torch.cat(
            [torch.arange(n) for n in lengths] + [torch.arange(width - len(positions))]
        )  # the trailing padding: one more sequence
    device = input_ids.device
    index, position_ids = index.to(device), position_ids.to(device)
    valid = index >= 0
    at = index.clamp(min=0)
    packed_ids = torch.where(valid, input_ids.flatten()[at], pad_token_id)
    packed_labels = torch.where(valid & (position_ids > 0), labels.flatten()[at], -100)
    layout = Packed(index, position_ids, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return {
        **inputs,
        "input_ids": packed_ids,
        "attention_mask": valid.long(),
        "labels": packed_labels,
        "position_ids": position_ids,
        PACKED_KEY: layout,
    }


def best_packing(rows: list[list[int]], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """`rows` packed into bins by TRL's best fit decreasing (`compat.pack_bfd`), at the bin size of at most
    `max_length` that computes the fewest positions (bins times the longest bin; then the narrowest).

    A micro-batch's rows fill a few bins: at the bin size `max_length` the last bin is often nearly empty, yet
    computed at the width of the fullest. The sizes tried are the longest row (no bin wider than the padded batch:
    never more positions than padding) and the total split evenly over 1, 2, ... bins.

    Returns:
        The packed bins (the elements of `rows`, each row whole) and the lengths of the rows in each bin.
    """
    lengths = [len(row) for row in rows]
    longest, total = max(lengths), sum(lengths)
    if longest > max_length:  # the packer would cut it: never drop tokens silently
        raise ValueError(f"packing=True: a dataset row has {longest} tokens, more than max_length={max_length}.")
    even = {max(longest, -(-total // k)) for k in range(1, len(rows) + 1)}  # the total over k bins
    sizes = {min(size, max_length) for size in even | {longest}}
    table = pa.table({"index": pa.array(rows, type=pa.list_(pa.int64()))})
    best = None
    for size in sorted(sizes):
        packed = pack_bfd(table, size)
        bins = packed["index"].to_pylist()
        width = max(len(b) for b in bins)
        cost = (len(bins) * width, width)
        if best is None or cost < best[0]:
            best = cost, bins, packed["seq_lengths"].to_pylist()
    return best[1], best[2]


def model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a forward over the micro-batch: `input_ids` and `attention_mask`, or for a packed
    micro-batch `input_ids` and `position_ids` with no attention mask and no cache (so transformers builds the
    block-diagonal mask from the restarting positions)."""
    if PACKED_KEY in inputs:
        return {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"], "use_cache": False}
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def _base_model(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None)  # DDP, DeepSpeed
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if hasattr(model, "get_base_model"):  # PEFT
            base = model.get_base_model()
            if base is not model:
                model = base
                continue
        return model


def check_packable(model: nn.Module, role: str, *, vocab_size: int | None = None, probe: bool = True) -> None:
    """Raise a clear error unless `model` computes packed rows as separate sequences.

    Checks that its forward takes `position_ids`, that its attention implementation is one transformers builds the
    block-diagonal mask for (`PACKED_ATTENTION`), and then runs it once on a tiny packed row of two sequences: the
    second sequence's logits must equal those of the same tokens alone (a model that ignores `position_ids` or
    builds its own mask lets the second sequence attend to the first). `probe=False` skips that forward (sharded
    weights, where every process must run each forward together).
    """
    base = _base_model(model)
    remedy = "Train with packing=False (the default), or with a transformers model that supports packed sequences."
    if "position_ids" not in inspect.signature(base.forward).parameters:
        raise ValueError(f"packing=True: the {role} ({type(base).__name__}) does not take `position_ids`. {remedy}")
    attention = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if attention is not None and attention not in PACKED_ATTENTION:
        raise ValueError(
            f"packing=True: the {role}'s attention implementation {attention!r} is not one transformers builds the "
            f"block-diagonal mask of packed sequences for ({', '.join(PACKED_ATTENTION)}). {remedy}"
        )
    if not probe:
        return
    device = next(model.parameters()).device
    n = 4
    vocab = vocab_size or getattr(getattr(base, "config", None), "vocab_size", 16)
    first = torch.arange(1, n + 1, device=device) % vocab
    second = (torch.arange(n + 1, 2 * n + 1, device=device) * 7) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(
                input_ids=torch.cat([first, second])[None],
                position_ids=torch.cat([torch.arange(n), torch.arange(n)]).to(device)[None],
                use_cache=False,
            ).logits[0, n:]
            alone = model(
                input_ids=second[None], attention_mask=torch.ones_like(second)[None], use_cache=False
            ).logits[0]
    finally:
        model.train(was_training)
    packed, alone = packed.float(), alone.float()
    error = float((packed - alone).abs().max()) / max(float(alone.abs().max()), 1e-6)
    if not error <= 2e-2:
        raise ValueError(
            f"packing=True: the {role} ({type(base).__name__}) does not keep packed sequences apart: the second of two "
            f"sequences packed in one row gives other logits than alone (relative difference {error:.3g}), so it "
            f"attends across the sequence boundary (its forward ignores `position_ids` for the mask). {remedy}"
        )


def padding_share(attention_mask: torch.Tensor) -> float:
    """The share of a padded micro-batch's positions that are padding."""
    return 1.0 - float(attention_mask.float().mean())
