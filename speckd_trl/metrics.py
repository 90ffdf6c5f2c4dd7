"""The gate's statistics over a logging window: the `gate/*`, `reward/*` and `gen/*` metrics.

A window is a dict of summed counts (`new_window`), filled by every training micro-batch (`record_verdicts`) and
every speculative generation (`record_generation`), summed over processes and turned into rates when the trainer logs
(`gate_metrics`). Counts, not rates, are kept so that the sum over processes and over the window's micro-batches is
exact.

Shapes: ``B`` batch, ``T`` positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch


WINDOW_KEYS = ("accepted_on", "gated_on", "accepted_off", "gated_off", "reward_sum", "reward_sq_sum", "sequences") + (
    "gen_row_blocks",
    "gen_tokens",
    "gen_runs",
    "gen_run_sum",
    "gen_replaced",
)


def new_window() -> dict[str, float]:
    """The summed counts of a logging window, all zero."""
    return dict.fromkeys(WINDOW_KEYS, 0.0)


def sequence_rewards(accepted: torch.Tensor, gated: torch.Tensor) -> torch.Tensor:
    """Per-sequence binary-reward mean: the share of gated positions the teacher accepted.

    Args:
        accepted (`torch.BoolTensor` of shape `[B, T]`): ``a_t``.
        gated (`torch.BoolTensor` of shape `[B, T]`): positions that went through the gate.

    Returns:
        `torch.Tensor` of shape `[B']`: mean reward of each sequence that has at least one gated position.
    """
    counts = gated.sum(dim=-1)
    rewards = (accepted & gated).sum(dim=-1).float() / counts.clamp(min=1)
    return rewards[counts > 0]


def record_verdicts(
    window: dict[str, float], accepted: torch.Tensor, gated: torch.Tensor, on_policy: torch.Tensor
) -> None:
    """Add a micro-batch's verdicts to `window`.

    Args:
        accepted (`torch.BoolTensor` of shape `[B, T]`): the accept mask.
        gated (`torch.BoolTensor` of shape `[B, T]`): the positions that went through the gate.
        on_policy (`torch.BoolTensor` of shape `[B, T]`): the positions of on-policy rows.
    """
    for suffix, rows in (("on", gated & on_policy), ("off", gated & ~on_policy)):
        window[f"accepted_{suffix}"] += (accepted & rows).sum().item()
        window[f"gated_{suffix}"] += rows.sum().item()
    rewards = sequence_rewards(accepted, gated)
    window["reward_sum"] += rewards.sum().item()
    window["reward_sq_sum"] += rewards.square().sum().item()
    window["sequences"] += rewards.numel()


def record_generation(window: dict[str, float], stats: Any) -> None:
    """Add the statistics of a speculative generation (`generation.GenerationStats`) to `window`."""
    window["gen_row_blocks"] += stats.row_blocks
    window["gen_tokens"] += stats.generated_tokens
    window["gen_runs"] += len(stats.accepted_runs)
    window["gen_run_sum"] += sum(stats.accepted_runs)
    window["gen_replaced"] += stats.replaced_tokens


def gate_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Acceptance rates and reward statistics from a window's summed counts; a kind with no gated token is omitted."""
    metrics = {}
    gated = totals["gated_on"] + totals["gated_off"]
    if gated > 0:
        metrics["gate/acceptance_rate"] = (totals["accepted_on"] + totals["accepted_off"]) / gated
    if totals["gated_on"] > 0:
        metrics["gate/acceptance_rate_on_policy"] = totals["accepted_on"] / totals["gated_on"]
    if totals["gated_off"] > 0:
        metrics["gate/acceptance_rate_off_policy"] = totals["accepted_off"] / totals["gated_off"]
    if totals["sequences"] > 0:
        mean = totals["reward_sum"] / totals["sequences"]
        metrics["reward/mean"] = mean
        metrics["reward/std"] = math.sqrt(max(totals["reward_sq_sum"] / totals["sequences"] - mean**2, 0.0))
    if totals.get("gen_tokens", 0) > 0:  # speculative on-policy generation ran in this window
        metrics["gen/teacher_forwards_per_token"] = totals["gen_row_blocks"] / totals["gen_tokens"]
        metrics["gen/mean_accepted_run"] = totals["gen_run_sum"] / max(totals["gen_runs"], 1)
        metrics["gen/replaced_fraction"] = totals["gen_replaced"] / totals["gen_tokens"]
    return metrics
