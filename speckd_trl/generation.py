"""Student sampling and SKD-style speculative draft/verify generation.

`speculative_generate` gates the on-policy sequences themselves (SKD, Xu et al. 2024), verifying like speculative
decoding: the student drafts up to ``draft_len`` tokens, the teacher scores the whole draft in **one** forward pass,
the first token the teacher rejects (the gate rule's `GateRule.accept`) is replaced by a teacher token
(`GateRule.replacement_probs`), and drafting resumes
after it. Teacher forward passes per sequence are about ``length / accepted-run-length`` instead of ``length``.
`student_generate` is the plain one-model sampler with the same draw order (the ``gate="none"`` reference).

Randomness: row ``b`` of a batch draws every uniform from its own CPU `torch.Generator`, seeded with ``seeds[b]``
(by default drawn from the caller's ``generator``, see `row_seeds`), and how many uniforms it draws depends only on
its own prompt and tokens. A row's output therefore does not depend on its batch neighbours, its padding or the
batch's draft lengths: the same prompt with the same row seed gives the same sequence alone or in any batch (up to
float round-off of padded batched matmuls). Sampling is inverse-CDF (one uniform per sampled token), like
`rules.propose`. `OnPolicyGeneration` is `SpecKDConfig.on_policy_generation` resolved: student sampling or this.

Shapes: ``B`` batch, ``P`` (left-padded) prompt length, ``N`` generated length, ``K`` draft length, ``V`` vocabulary.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import DynamicCache, GenerationConfig

from .rules import GateRule, get_rule


@dataclass(frozen=True)
class OnPolicyGeneration:
    """How `SpecKDTrainer` generates on-policy sequences (`SpecKDConfig.on_policy_generation`), resolved from its name
    (`ON_POLICY_GENERATION_MODES`); the trainer and its checks ask it instead of comparing the name.

    Attributes:
        name (`str`): the value of `on_policy_generation` that selects it.
        speculative (`bool`): the student drafts and the teacher verifies (`speculative_generate`, through
            `batches.SpeculativeSampler`); each process then runs its own number of forwards. Else the student samples
            alone with transformers' `generate` (as GKD), which keeps processes in step.
    """

    name: str
    speculative: bool


ON_POLICY_GENERATION_MODES: dict[str, OnPolicyGeneration] = {
    g.name: g
    for g in (OnPolicyGeneration("student", speculative=False), OnPolicyGeneration("speculative", speculative=True))
}


@contextmanager
def sampling_only_from(model: torch.nn.Module, generation_config: GenerationConfig) -> Iterator[None]:
    """While the context runs, `model.generate(..., generation_config=generation_config)` samples with the settings of
    `generation_config` and nothing else.

    transformers 5 fills every setting a `generation_config` leaves unset (``None``) from the model's own
    `generation_config` (from its checkpoint): a `repetition_penalty`, `min_p`, `typical_p`, `top_h`, `sequence_bias`
    or `bad_words_ids` that the trainer never asked for would then change the distribution on-policy tokens are drawn
    from, and the `spec` gate, which takes it to be ``softmax(logits / temperature)``, would score them against the
    wrong ``q`` without any error (measured: mass on the prompt's tokens 0.021 sampled vs 0.094 assumed with a
    checkpoint's `repetition_penalty=3.0`). Here the model's own config is replaced by a copy of `generation_config`
    (on the base model of a PEFT model, as TRL's `_override_model_generation_config` does for transformers 4), so the
    only settings besides the trainer's are transformers' global defaults. The model's config is restored after.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = target.generation_config
    target.generation_config = copy.deepcopy(generation_config)
    try:
        yield
    finally:
        target.generation_config = original


@dataclass
class GenerationStats:
    """Counts of one `speculative_generate` call (or several, after `merge`).

    Attributes:
        teacher_calls: teacher forward passes that verified a draft block (the prompt prefill is not counted).
        row_blocks: draft blocks summed over rows: how many verify passes each sequence took part in. Teacher
            forwards per generated token of a sequence = ``row_blocks / generated_tokens``.
        generated_tokens: completion tokens generated, EOS included, padding excluded.
        accepted_runs: per (row, block), how many drafted tokens the teacher accepted before the first rejection.
        replaced_tokens: drafted tokens the teacher rejected and replaced by its own token.
        proposals: `torch.LongTensor` of shape `[B, P + N]`, the layout of the returned sequences: at every
            completion position the token the student drafted there (the emitted token where the teacher accepted
            it, the rejected draft where the teacher replaced it); the prompts and padding as in the sequences.
            These are the student's own samples, the actions a gate or a reward must score: a teacher replacement
            was never sampled by the student. `None` until `speculative_generate` fills it.
    """

    teacher_calls: int = 0
    row_blocks: int = 0
    generated_tokens: int = 0
    accepted_runs: list[int] = field(default_factory=list)
    replaced_tokens: int = 0
    proposals: torch.Tensor | None = None

    @property
    def teacher_forwards_per_token(self) -> float:
        return self.row_blocks / max(self.generated_tokens, 1)

    @property
    def mean_accepted_run(self) -> float:
        return sum(self.accepted_runs) / max(len(self.accepted_runs), 1)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over verified drafts (each block is verified up to and including its first rejection)."""
        accepted = sum(self.accepted_runs)
        return accepted / max(accepted + self.replaced_tokens, 1)

    @property
    def replaced_fraction(self) -> float:
        return self.replaced_tokens / max(self.generated_tokens, 1)

    def as_dict(self) -> dict[str, float]:
        return {
            "teacher_calls": self.teacher_calls,
            "row_blocks": self.row_blocks,
            "generated_tokens": self.generated_tokens,
            "replaced_tokens": self.replaced_tokens,
            "teacher_forwards_per_token": self.teacher_forwards_per_token,
            "mean_accepted_run": self.mean_accepted_run,
            "acceptance_rate": self.acceptance_rate,
            "replaced_fraction": self.replaced_fraction,
        }


def row_seeds(generator: torch.Generator | None, batch_size: int) -> list[int]:
    """One seed per row, drawn from ``generator`` (the global RNG when ``None``): ``batch_size`` int64 draws."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (batch_size,), generator=generator, device=device).tolist()


def _row_generators(seeds: list[int]) -> list[torch.Generator]:
    generators = []
    for seed in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(seed))
        generators.append(g)
    return generators


def _uniforms(generators: list[torch.Generator], counts: list[int], width: int, device) -> torch.Tensor:
    """`[B, width]` float64 uniforms: row ``b`` draws ``counts[b]`` from its own generator, the rest is 1."""
    u = torch.ones(len(generators), width, dtype=torch.float64)
    for b, count in enumerate(counts):
        if count:
            u[b, :count] = torch.rand(count, generator=generators[b], dtype=torch.float64)
    return u.to(device)


def _sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws `[B]` from ``probs`` `[B, V]` (need not be normalized) with uniforms ``u`` `[B]`."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    # first index whose cumulative probability exceeds u (never a zero-probability token); the clamp guards round-off
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.size(-1) - 1)


def _eos_set(eos_token_id: int | list[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}


class _Batch:
    """Both models' KV caches over a shared token layout, left-padded prompt first, then committed tokens.

    The caches hold every committed token of every row except its last one (``pending``), whose logits are computed
    by the next forward. Rows advance by different amounts per block: the layout keeps the same length for all rows
    and marks the positions a row did not keep as holes (``mask == 0``); positions are counted over real tokens only,
    so a hole changes no row's logits. The layout grows by the longest kept run of each block, so by at most
    ``min(B, draft_len) * max_new_tokens`` positions (``max_new_tokens`` when every row keeps the same amount).
    """

    def __init__(
        self,
        models: list[torch.nn.Module],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vocab_size: int | None = None,
    ):
        self.models = models
        self.vocab_size = vocab_size  # logits are cut to this many ids (models with padded embeddings)
        self.device = input_ids.device
        self.caches = [DynamicCache(config=m.config) for m in models]
        self.mask = attention_mask[:, :-1].long()  # [B, C]: cache positions that hold real tokens
        self.pending = input_ids[:, -1].clone()  # [B]
        self.positions = self.mask.sum(dim=-1)  # [B]: position id of the pending token
        if input_ids.size(1) > 1:
            prefix_positions = (self.mask.cumsum(dim=-1) - 1).clamp(min=0)
            for index, (model, cache) in enumerate(zip(models, self.caches)):
                model(
                    input_ids=input_ids[:, :-1],
                    attention_mask=self.mask,
                    position_ids=prefix_positions,
                    past_key_values=cache,
                    use_cache=True,
                )
                self._check_cache(index, self.mask.size(1))  # before a forward reads a cache that is not there

    def forward(self, index: int, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        """Logits `[B, n, V]` of model ``index`` for ``tokens`` `[B, n]` placed ``offset`` positions after pending.

        The block's positions count as real while the block runs; `commit` decides what is kept.
        """
        n = tokens.size(1)
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.size(0), offset + n)], dim=1)
        position_ids = self.positions[:, None] + offset + torch.arange(n, device=self.device)
        out = self.models[index](
            input_ids=tokens,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=self.caches[index],
            use_cache=True,
        )
        self._check_cache(index, mask.size(1))
        return out.logits[..., : self.vocab_size].float()

    def _check_cache(self, index: int, length: int) -> None:
        """Raise unless model ``index``'s cache holds ``length`` positions (a model may drop it: e.g. older
        transformers turned ``use_cache`` off under gradient checkpointing in training mode)."""
        if self.caches[index].get_seq_length() != length:
            raise RuntimeError(
                f"speculative generation needs the KV cache of {type(self.models[index]).__name__}, which did not "
                "fill it; disable gradient checkpointing (and any use_cache=False override) while generating."
            )

    def commit(self, fed: int, kept: torch.Tensor, last: torch.Tensor) -> None:
        """After a block that fed ``fed`` tokens (pending first), keep ``kept[b]`` of them per row; ``last`` is the
        new pending token `[B]` (ignored where ``kept == 0``)."""
        keep = int(kept.max())
        for cache in self.caches:
            if cache.get_seq_length() > self.mask.size(1) + keep:
                cache.crop(-(cache.get_seq_length() - self.mask.size(1) - keep))
        block_mask = (torch.arange(keep, device=self.device)[None, :] < kept[:, None]).long()
        self.mask = torch.cat([self.mask, block_mask], dim=1)
        self.positions = self.positions + kept
        self.pending = torch.where(kept > 0, last, self.pending)


def _assemble(input_ids: torch.Tensor, completions: list[list[int]], pad_token_id: int) -> torch.Tensor:
    """``model.generate``'s layout: the prompts `[B, P]`, then the completions right-padded with ``pad_token_id``."""
    width = max((len(c) for c in completions), default=0)
    out = input_ids.new_full((input_ids.size(0), width), pad_token_id)
    for b, tokens in enumerate(completions):
        if tokens:
            out[b, : len(tokens)] = torch.tensor(tokens, dtype=out.dtype)
    return torch.cat([input_ids, out], dim=1)


def _check_args(input_ids, attention_mask, max_new_tokens, temperature, pad_token_id):
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, P]."
        )
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("Prompts must be left-padded: attention_mask[:, -1] must be 1 for every row.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if pad_token_id is None:
        raise ValueError("pad_token_id is required: finished rows are padded with it.")


@torch.no_grad()
def student_generate(
    student: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    do_sample: bool = True,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    seeds: list[int] | None = None,
) -> torch.Tensor:
    """Plain ancestral sampling from ``softmax(student_logits / temperature)`` (argmax when not ``do_sample``).

    The one-model reference for `speculative_generate`: row ``b`` draws exactly one uniform from its generator per
    generated token, so ``speculative_generate(..., gate="none")`` returns the same sequences for the same seeds.

    Args:
        student (`PreTrainedModel`): a causal LM.
        input_ids (`torch.LongTensor` of shape `[B, P]`): left-padded prompts.
        attention_mask (`torch.LongTensor` of shape `[B, P]`): 1 on prompt tokens, 0 on left padding.
        max_new_tokens (`int`): generated tokens per row at most.
        temperature (`float`): sampling temperature.
        do_sample (`bool`): sample (``True``) or take the argmax.
        eos_token_id (`int` or `list[int]`, *optional*): a row stops after generating one of these.
        pad_token_id (`int`): fills a row after it stops.
        generator (`torch.Generator`, *optional*): source of the per-row seeds when ``seeds`` is not given.
        seeds (`list[int]`, *optional*): one seed per row (see the module docstring).

    Returns:
        `torch.LongTensor` of shape `[B, P + N]`: prompts then completions, as ``model.generate`` returns them.
    """
    _check_args(input_ids, attention_mask, max_new_tokens, temperature, pad_token_id)
    batch_size = input_ids.size(0)
    generators = _row_generators(seeds if seeds is not None else row_seeds(generator, batch_size))
    eos = _eos_set(eos_token_id)
    state = _Batch([student], input_ids, attention_mask)
    completions: list[list[int]] = [[] for _ in range(batch_size)]
    done = [False] * batch_size
    for _ in range(max_new_tokens):
        logits = state.forward(0, state.pending[:, None], 0)[:, -1]  # [B, V]
        if do_sample:
            u = _uniforms(generators, [0 if d else 1 for d in done], 1, logits.device)[:, 0]
            tokens = _sample(torch.softmax(logits / temperature, dim=-1), u).tolist()
        else:
            tokens = logits.argmax(dim=-1).tolist()
        kept = torch.zeros(batch_size, dtype=torch.long, device=input_ids.device)
        last = state.pending.clone()
        for b in range(batch_size):
            if done[b]:
                continue
            token = tokens[b]
            completions[b].append(token)
            done[b] = token in eos or len(completions[b]) >= max_new_tokens
            kept[b], last[b] = 1, token
        if all(done):
            break
        state.commit(1, kept, last)
    return _assemble(input_ids, completions, pad_token_id)


def _teacher_tokens(
    rule: GateRule,
    teacher_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    u: torch.Tensor,
    *,
    top_k: int,
    do_sample: bool,
) -> torch.Tensor:
    """The teacher's replacements `[R]` for rejected drafts, from logits `[R, V]` at the rejected positions: sampled
    with ``u`` `[R]` (one uniform per row) from the rule's `GateRule.replacement_probs`; greedy (``do_sample=False``):
    the teacher's argmax for every rule. ``draft_logits`` are the student's logits at its sampling temperature."""
    if not do_sample:
        return teacher_logits.argmax(dim=-1)
    return _sample(rule.replacement_probs(teacher_logits, draft_logits, top_k=top_k), u)


@torch.no_grad()
def speculative_generate(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    gate: str = "spec",
    top_k: int = 5,
    draft_len: int = 4,
    max_new_tokens: int,
    temperature: float = 1.0,
    do_sample: bool = True,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    seeds: list[int] | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """SKD-style gated generation: the student drafts, the teacher verifies each block in one forward pass.

    Per block and row: the student drafts ``L = min(draft_len, tokens left)`` tokens ``x_1..x_L`` (stopping early at
    EOS) from ``q = softmax(student_logits / temperature)``; one teacher forward over the block gives ``p`` (teacher
    at temperature 1) at every draft position; the drafts are accepted up to the first one the gate rejects, which is
    replaced by a teacher token (`_teacher_token`); the next block starts after the last emitted token. A fully
    accepted block emits its ``L`` drafts and no bonus token (the gate decides every token).

    The gate is the rule ``gate`` (`rules.GATE_RULES`) at each draft position (``q`` above for ``"spec"``):

    - ``"topk"``: accept iff the draft is among the teacher's ``top_k`` (ties toward the lower token id); a rejected
      one is replaced by a sample from the teacher's top-k renormalized. ``top_k=1`` with ``do_sample=False`` gives
      exactly the teacher's greedy decoding.
    - ``"spec"``: accept with probability ``min(1, p / q)``; a rejected one is replaced by a sample from
      ``max(0, p - q)`` normalized, so every emitted token is distributed exactly as the teacher's ``p``. With
      ``do_sample=False`` (``q`` a point mass) this is greedy speculative decoding: accept iff the draft is the
      teacher's argmax, which again returns the teacher's greedy decoding.
    - ``"none"``: never reject: the student's own sampling (same sequences as `student_generate`, same seeds).

    Per-row draw order (each row from its own generator, see the module docstring): one uniform per drafted token;
    for a rule that draws uniforms (``"spec"``) with sampling, one uniform per drafted token of the block for the accept
    test; one uniform for a sampled replacement. Greedy decoding draws nothing.

    Both models keep a `DynamicCache`; on rejection the caches are cropped to the longest kept run in the batch and
    the positions a row did not keep are masked.

    Args:
        student (`PreTrainedModel`): the drafter (causal LM).
        teacher (`PreTrainedModel`): the verifier; same vocabulary as the student.
        input_ids (`torch.LongTensor` of shape `[B, P]`): left-padded prompts.
        attention_mask (`torch.LongTensor` of shape `[B, P]`): 1 on prompt tokens, 0 on left padding.
        gate (`str`): the rule's name, a key of `rules.GATE_RULES` (``"topk"``, ``"spec"``, ``"none"``).
        top_k (`int`): ``k`` of a rule that uses it (``"topk"``).
        draft_len (`int`): drafted tokens per teacher forward, ``>= 1``.
        max_new_tokens (`int`): generated tokens per row at most.
        temperature (`float`): the student's sampling temperature (``q``); the teacher's ``p`` is at temperature 1.
        do_sample (`bool`): sample, or decode greedily (see above).
        eos_token_id (`int` or `list[int]`, *optional*): a row stops after emitting one of these.
        pad_token_id (`int`): fills a row after it stops.
        generator (`torch.Generator`, *optional*): source of the per-row seeds when ``seeds`` is not given.
        seeds (`list[int]`, *optional*): one seed per row.
        vocab_size (`int`, *optional*): compare and sample the logits of the first ``vocab_size`` ids only (models
            whose embeddings are padded past the tokenizer, to different sizes); None keeps all.

    Returns:
        `tuple`: the sequences, `torch.LongTensor` of shape `[B, P + N]` (prompts then completions right-padded with
        ``pad_token_id``, the layout of ``model.generate``), and the `GenerationStats` of the call, whose
        ``proposals`` hold the student's draft at every position of the sequences (it differs from the sequence
        exactly where the teacher replaced a rejected draft).
    """
    _check_args(input_ids, attention_mask, max_new_tokens, temperature, pad_token_id)
    rule = get_rule(gate, owner="speculative_generate")
    if draft_len < 1 or top_k < 1:
        raise ValueError(f"speculative_generate: draft_len={draft_len} and top_k={top_k} must be >= 1.")
    batch_size = input_ids.size(0)
    generators = _row_generators(seeds if seeds is not None else row_seeds(generator, batch_size))
    eos = _eos_set(eos_token_id)
    stats = GenerationStats()
    state = _Batch([student, teacher], input_ids, attention_mask, vocab_size)
    rows = _Rows.empty(batch_size)
    while not all(rows.done):
        budget = rows.budget(draft_len, max_new_tokens)
        block = _draft_block(
            state, generators, budget, eos=eos, temperature=temperature, do_sample=do_sample, pad_token_id=pad_token_id
        )
        verdicts = _verify_block(rule, state, block, generators, top_k=top_k, do_sample=do_sample)
        stats.teacher_calls += 1
        kept, last = rows.emit(state, block, verdicts, eos=eos, max_new_tokens=max_new_tokens, stats=stats)
        if not all(rows.done):
            state.commit(block.drafts.size(1), kept, last)
    stats.proposals = _assemble(input_ids, rows.proposals, pad_token_id)
    return _assemble(input_ids, rows.completions, pad_token_id), stats


@dataclass
class _Block:
    """A drafted block: the drafts `[B, K]` (``pad_token_id`` past a row's length), the student's logits at its
    sampling temperature `[B, K, V]`, and each row's draft length."""

    drafts: torch.Tensor
    logits: torch.Tensor
    lengths: list[int]
    pad_token_id: int


class _Verdicts(NamedTuple):
    """The teacher's verdicts on a block, per row: the accepted drafts before the first rejection, whether a draft
    was rejected, and the teacher's replacement for it (``pad_token_id`` where none was)."""

    runs: list[int]
    rejected: list[bool]
    replacements: list[int]


@dataclass
class _Rows:
    """What `speculative_generate` has emitted per row: the completion, the student's draft at each emitted position
    (the proposals) and whether the row has stopped."""

    completions: list[list[int]]
    proposals: list[list[int]]
    done: list[bool]

    @classmethod
    def empty(cls, batch_size: int) -> _Rows:
        return cls([[] for _ in range(batch_size)], [[] for _ in range(batch_size)], [False] * batch_size)

    def budget(self, draft_len: int, max_new_tokens: int) -> list[int]:
        """Tokens each row drafts next: ``draft_len``, or fewer near ``max_new_tokens``; 0 once it has stopped."""
        return [0 if d else min(draft_len, max_new_tokens - len(c)) for d, c in zip(self.done, self.completions)]

    def emit(
        self,
        state: _Batch,
        block: _Block,
        verdicts: _Verdicts,
        *,
        eos: set[int],
        max_new_tokens: int,
        stats: GenerationStats,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Emit a verified block: per row, its accepted drafts and the replacement of a rejected one, cut after an
        EOS; count them in `stats`.

        Returns:
            The tokens each row kept `[B]` and its new pending token `[B]`, for `_Batch.commit`.
        """
        lengths, (runs, rejected, replacements) = block.lengths, verdicts
        drafted = block.drafts.tolist()
        kept = torch.zeros(len(lengths), dtype=torch.long, device=state.device)
        last = state.pending.clone()
        for b in range(len(lengths)):
            if lengths[b] == 0:
                continue
            tokens = drafted[b][: runs[b]] + ([replacements[b]] if rejected[b] else [])
            stats.replaced_tokens += int(rejected[b])
            stats.row_blocks += 1
            stats.accepted_runs.append(runs[b])
            for i, token in enumerate(tokens):  # EOS can only be a draft's last token or the replacement
                if token in eos:
                    tokens = tokens[: i + 1]
                    break
            self.completions[b].extend(tokens)
            self.proposals[b].extend(drafted[b][: len(tokens)])  # every emitted token stands at a drafted position
            stats.generated_tokens += len(tokens)
            self.done[b] = tokens[-1] in eos or len(self.completions[b]) >= max_new_tokens
            kept[b], last[b] = len(tokens), tokens[-1]
        return kept, last


def _draft_block(
    state: _Batch,
    generators: list[torch.Generator],
    budget: list[int],
    *,
    eos: set[int],
    temperature: float,
    do_sample: bool,
    pad_token_id: int,
) -> _Block:
    """The student drafts a block: row ``b`` up to ``budget[b]`` tokens, fewer if it drafts EOS, one student forward
    per draft position; when sampling, one uniform per drafted token from the row's generator."""
    batch_size, width, device = len(budget), max(budget), state.device
    drafts = torch.full((batch_size, width), pad_token_id, dtype=torch.long, device=device)
    draft_logits = []  # width x [B, V], the student's logits at the sampling temperature
    lengths = [0] * batch_size
    last_drafted = [None] * batch_size
    fed = state.pending[:, None]
    for j in range(width):
        logits = state.forward(0, fed, j)[:, -1] / temperature
        draft_logits.append(logits)
        drafting = [lengths[b] == j < budget[b] and (j == 0 or last_drafted[b] not in eos) for b in range(batch_size)]
        if do_sample:
            u = _uniforms(generators, [int(d) for d in drafting], 1, device)[:, 0]
            tokens = _sample(torch.softmax(logits, dim=-1), u)
        else:
            tokens = logits.argmax(dim=-1)
        rows = torch.tensor(drafting, device=device)
        drafts[:, j] = torch.where(rows, tokens, drafts[:, j])
        last_drafted = tokens.tolist()
        lengths = [j + 1 if d else n for d, n in zip(drafting, lengths)]
        fed = drafts[:, j : j + 1]
    return _Block(drafts, torch.stack(draft_logits, dim=1), lengths, pad_token_id)


def _verify_block(
    rule: GateRule,
    state: _Batch,
    block: _Block,
    generators: list[torch.Generator],
    *,
    top_k: int,
    do_sample: bool,
) -> _Verdicts:
    """The teacher verifies a block: one teacher forward over the pending token and ``drafts[:, :-1]`` scores every
    draft position, the rule accepts the drafts up to the first one it rejects, and the teacher replaces that one
    (`_teacher_tokens`). When sampling, a rule that draws uniforms takes one per drafted token of the row, then a
    rejecting row one more for its replacement."""
    drafts, draft_logits, lengths = block.drafts, block.logits, block.lengths
    width, device = drafts.size(1), drafts.device
    fed = torch.cat([state.pending[:, None], drafts[:, :-1]], dim=1)  # [B, width]
    teacher_logits = state.forward(1, fed, 0)  # [B, width, V]
    valid = torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    if not do_sample:
        accepted = rule.accept_greedy_drafts(draft_logits, teacher_logits, drafts, top_k=top_k) & valid
    else:  # a rule that draws takes each row's uniforms from its own generator
        u = _uniforms(generators, lengths, width, device) if rule.draws_uniforms else None
        accepted = rule.accept(draft_logits, teacher_logits, drafts, top_k=top_k, uniforms=u) & valid
    runs = accepted.long().cumprod(dim=-1).sum(dim=-1)  # accepted drafts before the first rejection
    rejected = runs < torch.tensor(lengths, device=device)
    replacements = torch.full_like(runs, block.pad_token_id)
    if rejected.any():
        rows = rejected.nonzero().squeeze(-1)
        counts = rejected.long().tolist() if do_sample else [0] * len(lengths)
        u = _uniforms(generators, counts, 1, device)[:, 0]
        replacements[rows] = _teacher_tokens(
            rule,
            teacher_logits[rows, runs[rows]],
            draft_logits[rows, runs[rows]],
            u[rows],
            top_k=top_k,
            do_sample=do_sample,
        )
    return _Verdicts(runs.tolist(), rejected.tolist(), replacements.tolist())
