"""The chunk loop: a loss over a model's output layer, ``chunk_size`` rows of logits at a time, its gradient taken in
the forward pass.

The loop knows nothing of the loss (the way Liger-Kernel's ``LigerFusedLinearDistillationBase`` owns chunking and
gradient accumulation): for each chunk of rows it projects the hidden states through the output layer
(`OutputLayer.project`, then `OutputLayer.transform`: the logit scale and softcap, differentiated by autograd), hands
the chunk's logits to a per-chunk function (`ChunkLoss`), which returns the rows' losses and their gradient with
respect to those logits (`ChunkOutput`), and accumulates the gradient with respect to the hidden states, the output
weight and the bias in float32, so that the chunk's logits are freed before the next one starts. The backward pass
only scales the accumulated gradients. `losses.chunked_weighted_jsd` is its one loss: the gated divergence of a chunk.

Shapes: ``N`` rows (flattened positions), ``n`` the rows of a chunk, ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class OutputLayer(Protocol):
    """What the chunked losses read of a model's output layer: ``logits = transform(project(h))``.
    `models.OutputHead` is the one implementation (`models.output_head` reads it from a model)."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    logit_scale: float
    softcap: float | None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ W.T + b`` in float32, shape `[n, V]`."""
        ...

    @property
    def transforms(self) -> bool:
        """Whether `transform` changes the logits."""
        ...

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The logit scale and softcap, applied to projected logits (differentiable)."""
        ...


@dataclass
class ChunkOutput:
    """What a per-chunk function returns for a chunk of ``n`` rows.

    Attributes:
        loss (`torch.Tensor` of shape `[n]`): each row's loss; the loop sums them.
        grad_logits (`torch.Tensor` of shape `[n, V]`, *optional*): the gradient of ``loss.sum()`` with respect to
            the chunk's logits (after `OutputLayer.transform`); `None` when no gradient was asked for.
        values (`torch.Tensor` of shape `[n]`): per-row values handed back to the caller in row order, not
            differentiable (e.g. the gate's verdicts).
    """

    loss: torch.Tensor
    grad_logits: torch.Tensor | None
    values: torch.Tensor


class ChunkLoss(Protocol):
    """A per-chunk loss: a function of a chunk's logits (and which rows they are), with its gradient in closed form."""

    def __call__(self, logits: torch.Tensor, rows: slice, *, grad: bool) -> ChunkOutput:
        """The chunk's `ChunkOutput` from its logits `[n, V]` (detached) at the positions `rows` of the `[N]` rows;
        ``grad_logits`` only when `grad`."""
        ...


def chunked_linear_loss(
    hidden: torch.Tensor, head: OutputLayer, chunk_loss: ChunkLoss, *, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_rows chunk_loss(head(hidden))`` a chunk of rows at a time, never holding more than ``chunk_size`` rows of
    logits; the gradient with respect to `hidden` and `head`'s weight and bias (when they require it and gradients
    are enabled) is accumulated in float32 in the forward pass.

    Peak extra memory: the chunk's ``[chunk_size, V]`` tensors, plus the ``[N, H]`` gradient (and a ``[V, H]`` one
    when the output layer is trained).

    Args:
        hidden (`torch.Tensor` of shape `[N, H]`): final hidden states (after the last norm).
        head (`OutputLayer`): the output layer; its weight and bias get gradients if they require them.
        chunk_loss (`ChunkLoss`): the loss of a chunk of rows.
        chunk_size (`int`): rows of logits projected at a time.

    Returns:
        A float32 scalar: the sum of the rows' losses (differentiable), and the chunks' ``values`` of shape `[N]`,
        in row order (not differentiable; float32 and empty when ``N = 0``).
    """
    return _ChunkedLinearLoss.apply(
        hidden, head.weight, head.bias, head, chunk_loss, chunk_size, torch.is_grad_enabled()
    )


class _ChunkedLinearLoss(torch.autograd.Function):
    """`chunked_linear_loss`: the gradients are made chunk by chunk in the forward pass and scaled in the backward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [N, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        head: OutputLayer,
        chunk_loss: ChunkLoss,
        chunk_size: int,
        grad_enabled: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # `needs_input_grad` follows `requires_grad` even under `torch.no_grad()` (evaluation): no gradient work there
        needs_hidden, needs_weight, needs_bias = (grad_enabled and needs for needs in ctx.needs_input_grad[:3])
        needs_grad = needs_hidden or needs_weight or needs_bias
        n_rows, device = hidden.size(0), hidden.device
        total = torch.zeros((), device=device, dtype=torch.float32)
        values = []  # the chunks' values, [n] each
        grad_hidden = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, device=device, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, device=device, dtype=torch.float32) if needs_bias else None
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, min(start + chunk_size, n_rows))
            chunk_hidden = hidden[rows]
            raw = head.project(chunk_hidden)
            transforms = needs_grad and head.transforms
            with torch.set_grad_enabled(transforms):  # autograd only through the logit scale / softcap
                logits = head.transform(raw.requires_grad_(transforms))
            out = chunk_loss(logits.detach(), rows, grad=needs_grad)
            values.append(out.values)
            total += out.loss.sum()
            if not needs_grad:
                continue
            grad_logits = out.grad_logits
            if transforms:
                (grad_logits,) = torch.autograd.grad(logits, raw, grad_logits)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), chunk_hidden.float())
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
            del raw, logits, out, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        values = torch.cat(values) if values else torch.zeros(0, device=device, dtype=torch.float32)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_values: torch.Tensor | None):
        grads = [
            None if grad is None else (grad * grad_total).to(dtype)
            for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)
        ]
        return (*grads, None, None, None, None)
