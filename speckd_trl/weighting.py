"""How a position is weighted: the gate's gated positions, proposals, verdicts and loss weights.

A trainer owns one `TokenGate` (its rule, its seeded random draws, the schedules' values at a step, its logging
window) and, per micro-batch, asks it for a `GatedBatch` (`TokenGate.batch`), which answers for that micro-batch:

- which positions are gated (`GatedBatch.gated`) and which are the student's own samples (`GatedBatch.sampled`);
- the teacher's verdicts, from both models' log-probabilities: `GatedBatch.verdicts`, the one entry point, for the
  whole batch or for any positions of it (a chunk of completion rows); `GatedBatch.verdicts_from_hidden` projects
  hidden states a chunk at a time and calls it;
- the loss weight of each position (`GatedBatch.weights`: 1 where accepted, the reject weight where rejected);
- the loss (`GatedBatch.reduce`, over `reduction.gated_loss`) and the logging window's counts (`GatedBatch.record`).

The rule itself (`rules.py`) decides each verdict; this module gives it its inputs: the proposal (the sampled token
on on-policy positions, the student's own greedy or sampled prediction elsewhere), ``q`` at the right temperature, the
uniforms and ``k``.

Shapes: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``N`` completion positions (flattened), ``n`` some of them,
``H`` hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from .batch_kind import BatchKind
from .config import GateConfigMixin
from .divergence import RejectTarget, jsd_log_probs
from .metrics import gate_metrics, new_window, record_generation, record_verdicts
from .models import OutputHead
from .reduction import LossTerms, Normalization, gated_loss
from .rules import GREEDY, GateRule, Proposal, get_rule, uniform


GATE_CHUNK_ELEMENTS = 1 << 22  # logits per model held at once when verdicts are made from hidden states


class TokenGate:
    """The speculative gate of one trainer: its rule, its settings at a step, its random draws and its logging window.

    Args:
        args (`GateConfigMixin`): the trainer's config (`gate`, its resolved `modes`: the schedules of `gate_top_k` and
            `reject_weight`, the normalization and the reject target; `kd_coef`, `reward_coef`, `gates_on_policy`,
            `gates_off_policy`).
        temperature (`float`): the student's sampling temperature: the ``q`` of a rule that reads the student is the
            student at this temperature on on-policy tokens.
        device (`torch.device`): where the gate's generators and draws live (the trainer's device).
        seed (`int`): the run's seed; the training draws come from ``seed + process_index``.
        process_index (`int`): this process's index (each process draws its own uniforms).
        proposal (`Proposal`): the student's proposal on dataset and `seq_kd` positions (`rules.PROPOSALS`).
    """

    def __init__(
        self,
        args: GateConfigMixin,
        *,
        temperature: float,
        device: torch.device,
        seed: int,
        process_index: int = 0,
        proposal: Proposal = GREEDY,
    ):
        self.args = args
        self.rule: GateRule = get_rule(args.gate, owner=type(args).__name__)
        self.temperature = temperature
        self.proposal = proposal
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed + process_index)
        # Evaluation draws its uniforms from a stream of its own, re-seeded by every `evaluate`
        # (`reset_eval_generator`): it never moves the training draws, and the same model evaluates to the same loss.
        self.eval_generator = torch.Generator(device=device)
        self._eval_seed = seed + process_index
        self.window = new_window()

    # ------------------------------------------------------------------ settings at a step

    def top_k(self, step: int, max_steps: int) -> int:
        """k of the rule at optimizer step `step` of `max_steps` (`gate_top_k_schedule`)."""
        return self.args.modes.top_k.at(step, max_steps)

    def reject_weight(self, step: int, max_steps: int) -> float:
        """Weight of rejected positions at optimizer step `step` of `max_steps` (`reject_weight_schedule`)."""
        return self.args.modes.reject_weight.at(step, max_steps)

    # ------------------------------------------------------------------ a micro-batch

    def batch(
        self,
        kind: BatchKind,
        completion: torch.Tensor,
        sampled_ids: torch.Tensor,
        *,
        training: bool,
        step: int,
        max_steps: int,
    ) -> GatedBatch:
        """The gate's view of one micro-batch: its gated positions, random draws and the settings at `step`.

        Args:
            kind (`BatchKind`): how the completions were made: which rows are on-policy.
            completion (`torch.BoolTensor` of shape `[B, T]`): the completion positions (those in the loss).
            sampled_ids (`torch.LongTensor` of shape `[B, T]`): the tokens the student sampled (the proposals at
                on-policy positions, the reward term's actions); read nowhere else.
            training (`bool`): draw from the training stream (else the evaluation one) and record the verdicts.
            step (`int`), max_steps (`int`): the optimizer step, for the schedules.
        """
        gated = completion & self.is_gated(kind, completion)
        generator = self.generator if training else self.eval_generator
        modes = self.args.modes
        return GatedBatch(
            gate=self,
            kind=kind,
            completion=completion,
            gated=gated,
            sampled_ids=sampled_ids,
            uniforms=self.draw_uniforms(kind, gated, generator),
            top_k=modes.top_k.at(step, max_steps),
            reject_weight=modes.reject_weight.at(step, max_steps),
            reject_target=modes.reject_target,
            normalization=modes.normalization,
            training=training,
        )

    def is_gated(self, kind: BatchKind, like: torch.Tensor) -> torch.Tensor:
        """Bool like `like` `[B, T]`: whether each position's row goes through the gate (`gates_on_policy` on
        on-policy rows, `gates_off_policy` on the others)."""
        on_policy = kind.positions(like)
        return (on_policy & self.args.gates_on_policy) | (~on_policy & self.args.gates_off_policy)

    def reset_eval_generator(self) -> None:
        """Restart the evaluation draws from the run's seed (every `evaluate` does)."""
        self.eval_generator.manual_seed(self._eval_seed)

    def draw_uniforms(
        self, kind: BatchKind, gated: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The gate's U(0, 1) draws for the micro-batch, `[B, T]` each, from `generator` (the training or the
        evaluation stream), made once so every loss path uses them: ``"proposal"`` for sampled proposals on gated
        dataset / `seq_kd` positions, then ``"accept"`` for a rule that draws."""
        uniforms = {}
        if not gated.any() or not self.rule.rejects:
            return uniforms
        if self.proposal.draws_uniforms and bool((gated & ~kind.positions(gated)).any()):
            uniforms["proposal"] = uniform(gated.shape, self.device, generator)
        if self.rule.draws_uniforms:
            uniforms["accept"] = uniform(gated.shape, self.device, generator)
        return uniforms

    def sampling_log_probs(self, student_log_probs: torch.Tensor) -> torch.Tensor:
        """The student's log-probabilities at the sampling temperature, from those at temperature 1: ``q`` of sampled
        tokens for a rule that reads it (left as they are for a rule that does not)."""
        if self.temperature == 1.0 or not self.rule.reads_student:
            return student_log_probs
        return jsd_log_probs(student_log_probs, self.temperature)

    def reads_student(self, kind: BatchKind) -> bool:
        """Whether the verdicts on a batch of this kind read the student's distribution: a rule that reads ``q`` does,
        and so do the student's own proposals on dataset / `seq_kd` positions."""
        return self.rule.reads_student or not kind.all_on_policy

    # ------------------------------------------------------------------ statistics

    def record_generation(self, stats: Any) -> None:
        """Add the statistics of a speculative generation (`generation.GenerationStats`) to the logging window."""
        record_generation(self.window, stats)

    def pop_metrics(
        self, reduce: Callable[[torch.Tensor], torch.Tensor], *, device: torch.device, step: int, max_steps: int
    ) -> dict[str, float]:
        """The window's `gate/*`, `reward/*` and `gen/*` metrics over all processes; starts a new window.

        Args:
            reduce (`Callable`): sums a float64 tensor of counts over the processes (e.g. `accelerator.reduce` with
                ``reduction="sum"``); every process must call this together.
            device (`torch.device`): where to put the counts for `reduce`.
            step (`int`), max_steps (`int`): the step whose `gate/top_k` and `gate/reject_weight` are logged.
        """
        keys = list(self.window)
        totals = torch.tensor([self.window[k] for k in keys], dtype=torch.float64, device=device)
        totals = dict(zip(keys, reduce(totals).tolist()))
        self.window = new_window()
        metrics = gate_metrics(totals)
        if self.rule.uses_top_k:
            metrics["gate/top_k"] = self.top_k(step, max_steps)
        if self.rule.rejects:
            metrics["gate/reject_weight"] = self.reject_weight(step, max_steps)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The training generator's state and the logging window, for checkpoints."""
        return {"gate": self.generator.get_state(), "gate_window": dict(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["gate"].cpu())
        self.window = {**new_window(), **state["gate_window"]}


@dataclass
class GatedBatch:
    """The gate on one micro-batch (made by `TokenGate.batch`): positions, verdicts, weights, loss and records.

    Attributes:
        gate (`TokenGate`): the trainer's gate.
        kind (`BatchKind`): how the completions were made: which rows are on-policy.
        completion (`torch.BoolTensor` of shape `[B, T]`): the completion positions (in the loss).
        gated (`torch.BoolTensor` of shape `[B, T]`): the completion positions that go through the gate.
        sampled_ids (`torch.LongTensor` of shape `[B, T]`): the tokens the student sampled.
        uniforms (`dict[str, torch.Tensor]`): the gate's random draws, `[B, T]` each.
        top_k (`int`): the rule's k at this step.
        reject_weight (`float`): the weight of rejected positions at this step.
        reject_target (`RejectTarget`): what a rejected position is distilled toward.
        normalization (`Normalization`): the loss denominator.
        training (`bool`): whether the verdicts are recorded for the logs.
    """

    gate: TokenGate
    kind: BatchKind
    completion: torch.Tensor
    gated: torch.Tensor
    sampled_ids: torch.Tensor
    uniforms: dict[str, torch.Tensor]
    top_k: int
    reject_weight: float
    reject_target: RejectTarget
    normalization: Normalization
    training: bool
    packed: Any = None  # a packed micro-batch's `packing.Packed`: the statistics are per sequence, not per row

    @property
    def sampled(self) -> torch.Tensor:
        """Bool `[B, T]`: the gated positions whose tokens the student sampled (the reward term's positions)."""
        return self.gated & self.kind.positions(self.gated)

    @cached_property
    def rows(self) -> torch.Tensor:
        """Long `[N]`: the completion positions as flat indices into `[B * T]`, in row-major order (the rows of the
        chunked paths)."""
        return self.completion.flatten().nonzero().squeeze(-1)

    # ------------------------------------------------------------------ verdicts

    @torch.no_grad()
    def verdicts(
        self,
        student_log_probs: torch.Tensor,
        teacher_log_probs: torch.Tensor,
        at: torch.Tensor | None = None,
        *,
        to_teacher: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The accept bits: the teacher's verdicts where gated, True on the other completion positions, False off the
        completion.

        Args:
            student_log_probs (`torch.Tensor`), teacher_log_probs (`torch.Tensor`): both models' log-probabilities at
                temperature 1 (the divergence's own), `[B, T, V]` each, or `[n, V]` at the positions `at`.
            at (`torch.LongTensor` of shape `[n]`, *optional*): flat indices into `[B * T]` of the positions the
                log-probabilities are for (e.g. a chunk of `rows`); `None`: the whole batch.
            to_teacher (`torch.LongTensor` of shape `[V_s]`, *optional*): across tokenizers, the teacher's token for
                each student token (-1: none); the student's log-probabilities are then over its own vocabulary
                ``V_s`` and the teacher's over its own. The rule reads the teacher's distribution at the proposal's
                teacher token and the student's probability of the proposal itself; a proposal without a teacher
                token is accepted (`cross_tokenizer.student_to_teacher_ids`).

        Returns:
            `torch.BoolTensor`: `[B, T]`, or `[n]` with `at`.
        """
        if at is not None:
            gated = self.gated.flatten()[at]
            verdict = self._rule_verdicts(student_log_probs, teacher_log_probs, at, gated, to_teacher)
            return verdict | (self.completion.flatten()[at] & ~gated)
        if to_teacher is not None:
            raise ValueError("GatedBatch.verdicts: `to_teacher` needs the positions `at`.")
        gated = self.gated.flatten()
        if 2 * int(gated.sum()) > gated.numel():  # mostly gated: the whole batch through the rule
            verdict = self._rule_verdicts(
                student_log_probs.flatten(0, -2), teacher_log_probs.flatten(0, -2), None, gated
            )
        else:  # an on-policy batch is mostly prompt and padding: copy the gated positions out
            at = gated.nonzero().squeeze(-1)
            verdict = torch.zeros_like(gated)
            verdict[at] = self._rule_verdicts(
                student_log_probs.flatten(0, -2)[at], teacher_log_probs.flatten(0, -2)[at], at, gated[at]
            )
        return verdict.view_as(self.gated) | (self.completion & ~self.gated)

    def _rule_verdicts(
        self,
        student_log_probs: torch.Tensor,
        teacher_log_probs: torch.Tensor,
        at: torch.Tensor | None,
        gated: torch.Tensor,
        to_teacher: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The rule's verdicts `[n]` at the flat positions `at` (`None`: all of them) from `[n, V]` log-probabilities,
        False where not `gated` `[n]` (`to_teacher`: see `verdicts`)."""
        gate, rule = self.gate, self.gate.rule
        if not gated.any():
            return torch.zeros_like(gated)
        if not rule.rejects:
            return gated.clone()

        def pick(values: torch.Tensor) -> torch.Tensor:
            return values.flatten() if at is None else values.flatten()[at]

        uniforms = {name: pick(u) for name, u in self.uniforms.items()}
        sampled_ids = pick(self.sampled_ids)
        student_log_probs = student_log_probs.detach()

        def own_proposals() -> torch.Tensor:  # the student's greedy or sampled prediction
            # `draw_uniforms` drew the "proposal" uniforms iff a dataset / seq_kd position is gated; without them
            # none is, and `propose` would draw from torch's global generator (shifting every later draw of the run)
            if not gate.proposal.draws_uniforms or "proposal" in uniforms:
                return gate.proposal.propose(student_log_probs, uniforms=uniforms.get("proposal"))
            return sampled_ids

        # On an on-policy row the proposal is the sampled token, drawn from the student at the sampling temperature
        # (GKD and DistillationTrainer sample without top-k / top-p filtering by default), so that is the rule's q;
        # on the others it is the student's own prediction, at temperature 1.
        on_policy = pick(self.kind.positions(self.gated))
        proposals = self.kind.where(on_policy, lambda: sampled_ids, own_proposals)
        proposal_log_probs = self.kind.where(
            on_policy[..., None], lambda: gate.sampling_log_probs(student_log_probs), lambda: student_log_probs
        )
        proposals = proposals.long()
        unmapped = torch.zeros_like(gated)
        if to_teacher is not None:  # the rule sees the teacher's vocabulary, the student only at its proposal
            log_q = proposal_log_probs.gather(-1, proposals[..., None])
            proposals = to_teacher.to(proposals.device)[proposals]
            unmapped = proposals < 0
            proposals = proposals.clamp(min=0)
            proposal_log_probs = torch.full_like(teacher_log_probs, float("-inf")).scatter(
                -1, proposals[..., None], log_q.to(teacher_log_probs.dtype)
            )
        accepted = rule.accept(
            proposal_log_probs,
            teacher_log_probs,
            proposals,
            top_k=self.top_k,
            uniforms=uniforms.get("accept"),
            normalized=True,
        )
        return (accepted | unmapped) & gated

    @torch.no_grad()
    def verdicts_from_hidden(
        self,
        student_hidden: torch.Tensor,
        student_head: OutputHead,
        teacher_hidden: torch.Tensor,
        teacher_head: OutputHead,
        *,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """`verdicts` from both models' final hidden states at the `rows`, projecting a chunk of rows at a time.

        For a loss that never holds log-probabilities itself (TRL's `ChunkedDivergenceFunction`), this is one extra
        projection of the completion rows through the output layers, without gradient. Nothing is projected when no
        row is gated or the rule never rejects, and the student is not projected when the verdicts do not read it
        (a rule that reads only the teacher, on sampled tokens).

        Args:
            student_hidden (`torch.Tensor` of shape `[N, H_s]`), teacher_hidden (`torch.Tensor` of shape `[N, H_t]`):
                the final hidden states at the `rows`.
            student_head (`OutputHead`), teacher_head (`OutputHead`): the output layers (same vocabulary ``V``).
            chunk_size (`int`, *optional*): rows per chunk; by default as many as keep each model's logits of a chunk
                at `GATE_CHUNK_ELEMENTS`.

        Returns:
            `torch.BoolTensor` of shape `[B, T]`: the accept mask, as `verdicts`.
        """
        gate = self.gate
        if not gate.rule.rejects or not bool(self.gated.any()):
            return self.completion.clone()
        rows = self.rows
        chunk_size = chunk_size or max(1, GATE_CHUNK_ELEMENTS // teacher_head.weight.size(0))
        reads_student = gate.reads_student(self.kind)
        row_verdicts = []
        for start in range(0, rows.numel(), chunk_size):
            chunk = slice(start, min(start + chunk_size, rows.numel()))
            teacher_log_probs = jsd_log_probs(teacher_head.transform(teacher_head.project(teacher_hidden[chunk])))
            student_log_probs = teacher_log_probs  # read by no rule when `reads_student` is False
            if reads_student:
                student_log_probs = jsd_log_probs(student_head.transform(student_head.project(student_hidden[chunk])))
            row_verdicts.append(self.verdicts(student_log_probs, teacher_log_probs, at=rows[chunk]))
        return self.positions(torch.cat(row_verdicts))

    # ------------------------------------------------------------------ weights, rows, loss

    def weights(self, accepted: torch.Tensor) -> torch.Tensor:
        """``w_t`` `[B, T]`: 1 where accepted, `reject_weight` where rejected, 0 off the completion."""
        return self.position_weights(accepted) * self.completion

    def position_weights(self, accepted: torch.Tensor) -> torch.Tensor:
        """``w_t`` of accept bits of any shape, without the completion mask: 1 where accepted, `reject_weight` where
        rejected."""
        return torch.where(accepted, 1.0, self.reject_weight)

    @property
    def filters_targets(self) -> bool:
        """Whether rejected positions are distilled toward a filtered target (`reject_target` other than teacher)."""
        return self.reject_target.filters

    def targets(
        self, teacher_log_probs: torch.Tensor, accepted: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The divergence's target log-probabilities `[..., V]` given the verdicts `[...]` (any leading shape):
        `target` (default: the teacher's log-probabilities; a sparse teacher's tail-bucket target), except at
        rejected positions with ``reject_target="top_k"``, where it is the teacher's top-k (this step's k)
        renormalized (`divergence.top_k_log_probs`)."""
        target = teacher_log_probs if target is None else target
        return self.reject_target.targets(teacher_log_probs, accepted, target, self.top_k)

    def chunk_verdicts(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, rows: slice
    ) -> torch.Tensor:
        """`verdicts` `[n]` of a chunk of the completion positions `self.rows` from its `[n, V]` log-probabilities:
        with `position_weights` and `targets`, what `losses.chunked_weighted_jsd` asks of its gate (`ChunkGate`)."""
        return self.verdicts(student_log_probs, teacher_log_probs, at=self.rows[rows])

    def positions(self, row_values: torch.Tensor) -> torch.Tensor:
        """Accept bits `[N]` of the `rows` in their places of a `[B, T]` mask, False off the completion."""
        accepted = torch.zeros_like(self.completion).flatten()
        accepted[self.rows] = row_values.bool()  # (no rows: an empty float tensor)
        return accepted.view_as(self.completion)

    def scatter(self, row_values: torch.Tensor) -> torch.Tensor:
        """`[N]` values of the `rows` (differentiable) in their places of a `[B, T]` tensor, 0 off the completion."""
        out = torch.zeros(self.completion.numel(), device=row_values.device, dtype=row_values.dtype)
        return out.index_put((self.rows,), row_values).view_as(self.completion)

    def reduce(self, terms: LossTerms, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
        """The micro-batch's loss from its terms (`reduction.gated_loss` with the gate's settings), normalized for the
        accumulation window of `num_items_in_batch` completion tokens (`None`: this micro-batch's)."""
        args = self.gate.args
        return gated_loss(
            terms,
            weights=self.weights(terms.accepted),
            completion=self.completion,
            sampled=self.sampled,
            kd_coef=args.kd_coef,
            reward_coef=args.reward_coef,
            normalize=self.normalization,
            num_items_in_batch=num_items_in_batch,
        )

    def record(self, accepted: torch.Tensor) -> None:
        """Add the verdicts `[B, T]` to the gate's logging window (training batches only)."""
        if not self.training:
            return
        gated, on_policy = self.gated, self.kind.positions(self.gated)
        if self.packed is not None:  # per-sequence rewards: each sequence back in its own row
            accepted, gated, on_policy = (self.packed.to_padded(x, False) for x in (accepted, gated, on_policy))
        record_verdicts(self.gate.window, accepted, gated, on_policy)
