"""`SpecKDConfig`: `GKDConfig` plus the speculative gate's settings.

The fields stay what users write in YAML or on the command line (strings for every mode), checked in `__post_init__`
with errors that name the field, its value and what is allowed. Each mode is then read as an object, never by its name:
`config.modes` (`GateModes`, `SpecKDModes`) resolves the schedules (`schedules.Schedule`), the normalization
(`reduction.Normalization`), the reject target (`divergence.RejectTarget`), the proposal (`rules.Proposal`), the loss
path (`losses.LossPath`), the mixing (`batch_kind.Mixing`) and the on-policy generation
(`generation.OnPolicyGeneration`), each defined where its job is done.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils import is_torch_bf16_gpu_available
from transformers.utils.import_utils import is_torch_bf16_available_on_device
from trl import DistillationConfig
from trl.experimental.gkd import GKDConfig
from trl.experimental.gold import GOLDConfig
from trl.experimental.server_distillation import ServerDistillationConfig

from .batch_kind import MIXING_MODES, Mixing
from .divergence import REJECT_TARGET_MODES, RejectTarget
from .generation import ON_POLICY_GENERATION_MODES, OnPolicyGeneration
from .losses import LOSS_PATH_MODES, LOSS_PATHS, LossPath
from .reduction import NORMALIZATION_MODES, NORMALIZATIONS, Normalization
from .rules import GATE_RULES, GATES, PROPOSALS, GateRule, Proposal, check_teacher_reads, get_rule
from .schedules import SCHEDULES as SCHEDULE_KINDS
from .schedules import Schedule


GATE_ON = ("both", "on_policy", "off_policy")
GATE_PROPOSALS = tuple(PROPOSALS)
SCHEDULES = tuple(SCHEDULE_KINDS)
REJECT_TARGETS = tuple(REJECT_TARGET_MODES)
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")
# how a teacher given as a name or path is loaded (`models.teacher_quantization_config`); "auto": the 4-bit setting
# with teacher_load_in_4bit=True, else none
TEACHER_QUANTIZATIONS = ("auto", "none", "int8", "nf4", "fp4")
BNB_COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
ON_POLICY_GENERATIONS = tuple(ON_POLICY_GENERATION_MODES)
MIXINGS = tuple(MIXING_MODES)


def bf16_unsupported_reason(use_cpu: bool) -> str | None:
    """Why bf16 cannot run on the device training will use, or None when it can."""
    if use_cpu:
        return None if is_torch_bf16_available_on_device("cpu") else "this torch build has no bfloat16 on the CPU"
    if torch.cuda.is_available():
        return (
            None if is_torch_bf16_gpu_available() else "the GPU does not support bfloat16 (it needs Ampere or newer)"
        )
    if is_torch_bf16_gpu_available():  # another accelerator (e.g. XPU) that transformers accepts
        return None
    return "no GPU is visible and use_cpu=False (transformers allows bf16 without a GPU only with use_cpu=True)"


def _check_choice(owner: str, name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {name}={value!r} is not valid; allowed values are {', '.join(allowed)}.")


def _check_range(owner: str, name: str, value: float, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{owner}: {name}={value!r} is out of range; it must be a number in [{low}, {high}].")


def _check_int(owner: str, name: str, value: object, low: int, why: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}: {name}={value!r} is not valid; it must be an integer >= {low}{why}.")


def _resolve(owner: str, name: str, value: str, modes: dict[str, Any]) -> Any:
    """The object a mode field's string names (`modes[value]`), with `_check_choice`'s error for another value."""
    _check_choice(owner, name, value, tuple(modes))
    return modes[value]


@dataclass(frozen=True)
class GateModes:
    """A SpecKD config's modes resolved from its string fields (`GateConfigMixin.modes`): the objects the trainers, the
    gate and the loss ask instead of comparing the fields' names.

    Attributes:
        top_k (`Schedule`): the gate's k over the run (`gate_top_k`, `gate_top_k_schedule`, `_start`, `_end`).
        reject_weight (`Schedule`): the weight of rejected positions over the run (`reject_weight` and its schedule).
        normalization (`Normalization`): the loss denominator (`gate_normalize`).
        reject_target (`RejectTarget`): what a rejected position is distilled toward (`reject_target`).
    """

    top_k: Schedule
    reject_weight: Schedule
    normalization: Normalization
    reject_target: RejectTarget


@dataclass(frozen=True)
class SpecKDModes(GateModes):
    """`SpecKDConfig`'s modes: `GateModes` plus those of `SpecKDTrainer` alone.

    Attributes:
        proposal (`Proposal`): the student's proposal on dataset and `seq_kd` positions (`gate_proposal`).
        loss_path (`LossPath`): eager or chunked (`loss_path`).
        mixing (`Mixing`): the batch-kind draw per micro-batch or per row (`mixing`).
        on_policy_generation (`OnPolicyGeneration`): student sampling or speculative generation
            (`on_policy_generation`).
    """

    proposal: Proposal
    loss_path: LossPath
    mixing: Mixing
    on_policy_generation: OnPolicyGeneration


def _resolve_bf16(args: Any) -> None:
    """Refuse `bf16=True` where it cannot run; an unset `bf16` means bf16 where the GPU supports it, else float32
    (TRL's configs default to `bf16=True`, which raises on a CPU)."""
    reason = bf16_unsupported_reason(args.use_cpu) if args.bf16 else None
    if reason is not None:
        raise ValueError(
            f"{type(args).__name__}: bf16=True is not supported here: {reason}. Set bf16=False (float32), fp16=True "
            "on an older GPU, use_cpu=True for bf16 on the CPU, or leave bf16 unset to use bf16 only where it runs."
        )
    if args.bf16 is None:
        args.bf16 = not args.fp16 and not args.use_cpu and is_torch_bf16_gpu_available()


def _check_temperature(owner: str, temperature: object) -> None:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{owner}: temperature={temperature!r} is not valid; the sampling temperature must be > 0.")


@dataclass
class GateConfigMixin:
    """
    The speculative gate's settings, shared by [`SpecKDConfig`] (on `GKDConfig`) and [`SpecKDDistillationConfig`]
    (on `DistillationConfig`). A dataclass mixin: it comes first among a config's bases, so that the TRL config's own
    fields keep their order (`output_dir` first).

    At each completion position the student proposes a token, the teacher verifies it (`gate`), and the generalized
    JSD is kept at weight 1 on accepted positions and `reject_weight` on rejected ones.

    Args:
        gate (`str`, *optional*, defaults to `"topk"`):
            `"topk"`: accept a proposal that is among the teacher's `gate_top_k` most likely tokens. `"spec"`: accept
            with probability `min(1, p_teacher / p_student)` (speculative sampling). `"none"`: accept everything
            (the trainer's plain loss).
        gate_top_k (`int`, *optional*, defaults to `5`):
            `k` of the `"topk"` gate.
        reject_weight (`float`, *optional*, defaults to `0.5`):
            Loss weight of rejected positions in `[0, 1]`: `0` masks them, `1` recovers the ungated loss. The default
            is the validation split's choice in the synthetic lab (`benchmarks/lab.py`: 0.5 over 0.1 in every
            setting tried; a gate removes learning signal exactly where the student is still wrong). Masking them
            completely collapsed the student in 5 of 6 runs of `benchmarks/quality.py` (nothing holds rejected
            positions in place, the acceptance falls and the loss goes to 0 with it), and `0` warns.
        gate_normalize (`str`, *optional*, defaults to `"tokens"`):
            Loss denominator: `"tokens"` divides by the number of completion tokens (as GKD and
            `DistillationTrainer`; exact under gradient accumulation, and the gate only removes terms), `"accepted"` by
            the sum of weights (each accepted token counts like an ungated token; louder when few are accepted).
        gate_top_k_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"`: k is `gate_top_k` throughout. `"linear"`: k goes from `gate_top_k_start` at step 0 to
            `gate_top_k_end` at the last step (rounded half up), e.g. a gate that starts lenient and tightens.
        gate_top_k_start (`int`, *optional*):
            k at step 0 with the linear schedule.
        gate_top_k_end (`int`, *optional*):
            k at the last step with the linear schedule.
        reject_target (`str`, *optional*, defaults to `"teacher"`):
            What a rejected position is distilled toward: `"teacher"` (the teacher's distribution) or `"top_k"` (the
            teacher's `gate_top_k` most likely tokens, renormalized; ties at the k-th value kept): *target filtering*,
            which drops the tail of the teacher's law where it rejects instead of (or as well as) down-weighting the
            position. Either way the position's weight is `reject_weight`. Measured in the synthetic lab with a
            noisy teacher (`benchmarks/lab_capacity.py --noise 0.3`): `"top_k"` with `reject_weight=1` beats GKD.
        reject_weight_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"` (`reject_weight` throughout) or `"linear"` (from `reject_weight_start` to
            `reject_weight_end`).
        reject_weight_start (`float`, *optional*):
            `reject_weight` at step 0 with the linear schedule.
        reject_weight_end (`float`, *optional*):
            `reject_weight` at the last step with the linear schedule.
        kd_coef (`float`, *optional*, defaults to `1.0`):
            Weight of the (gated) distillation loss. `0` with `reward_coef > 0` gives a pure binary-reward
            policy-gradient step (which needs gated on-policy tokens; else the loss would be zero and this raises).
        reward_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the REINFORCE term on the teacher's accept reward, on on-policy tokens:
            `-reward_coef * sum_t (r_t - b) log q(x_t) / N`, with `r_t` the accept bit, `b` the mean reward of the
            micro-batch's gated on-policy tokens, `q` the student at the sampling temperature and `N` the loss's
            token count (as `gate_normalize="tokens"`).
    """

    gate: str = field(
        default="topk",
        metadata={
            "help": "Teacher verification of the student's proposals: 'topk' (proposal among the teacher's top-k), "
            "'spec' (accept with probability min(1, p_teacher/p_student)) or 'none' (the plain, ungated loss).",
            "choices": list(GATES),
        },
    )
    gate_top_k: int = field(
        default=5,
        metadata={
            "help": "k of the 'topk' gate: a proposal is accepted if it is among the teacher's k best tokens (ties at "
            "the k-th place go to the lower token id); must be below the vocabulary size."
        },
    )
    reject_weight: float = field(
        default=0.5,
        metadata={
            "help": "Loss weight in [0, 1] of rejected positions: 0 masks them (measured to collapse the student; it "
            "warns), 1 recovers the ungated loss. 0.5: chosen on the synthetic lab's validation split."
        },
    )
    gate_normalize: str = field(
        default="tokens",
        metadata={
            "help": "Loss denominator: 'tokens' (completion tokens, as GKD; exact under gradient accumulation) or "
            "'accepted' (sum of the weights).",
            "choices": list(NORMALIZATIONS),
        },
    )
    gate_top_k_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant' (gate_top_k throughout) or 'linear' (from gate_top_k_start at step 0 to "
            "gate_top_k_end at the last step).",
            "choices": list(SCHEDULES),
        },
    )
    gate_top_k_start: int | None = field(default=None, metadata={"help": "k at step 0 of the linear schedule."})
    gate_top_k_end: int | None = field(default=None, metadata={"help": "k at the last step of the linear schedule."})
    reject_target: str = field(
        default="teacher",
        metadata={
            "help": "What a rejected position is distilled toward: 'teacher' (the teacher's distribution) or 'top_k' "
            "(the teacher's gate_top_k most likely tokens renormalized, ties at the k-th value kept: target "
            "filtering). The position's weight is reject_weight either way; 'top_k' with reject_weight=1 beat GKD "
            "with a noisy teacher in the synthetic lab. SpecKDTrainer only.",
            "choices": list(REJECT_TARGETS),
        },
    )
    reject_weight_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant' (reject_weight throughout) or 'linear' (from reject_weight_start to "
            "reject_weight_end).",
            "choices": list(SCHEDULES),
        },
    )
    reject_weight_start: float | None = field(
        default=None, metadata={"help": "reject_weight at step 0 of the linear schedule."}
    )
    reject_weight_end: float | None = field(
        default=None, metadata={"help": "reject_weight at the last step of the linear schedule."}
    )
    kd_coef: float = field(
        default=1.0,
        metadata={"help": "Weight of the gated distillation loss (0 with reward_coef > 0: pure policy gradient)."},
    )
    reward_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the REINFORCE term on the teacher's accept reward (on-policy tokens): "
            "-reward_coef * sum_t (r_t - b) log q(x_t) / N, b the micro-batch's mean reward. Needs gated on-policy "
            "tokens: where settings make the term identically zero it warns (raises with kd_coef=0)."
        },
    )

    def _check_gate_settings(self) -> None:
        """Validate the gate's fields; each error names the config, the field, its value and what is allowed."""
        owner = type(self).__name__
        _check_choice(owner, "gate", self.gate, tuple(GATE_RULES))
        _check_choice(owner, "gate_normalize", self.gate_normalize, NORMALIZATIONS)
        _check_int(owner, "gate_top_k", self.gate_top_k, 1)
        _check_range(owner, "reject_weight", self.reject_weight, 0.0, 1.0)
        if self._reject_target().filters and not self.gate_rule.rejects:
            raise ValueError(
                f"{owner}: reject_target={self.reject_target!r} changes the target of rejected positions, but "
                f"gate={self.gate!r} rejects nothing; use a gate that rejects (e.g. gate='topk'), or "
                "reject_target='teacher'."
            )
        self._check_schedule("gate_top_k", lambda name, v: _check_int(owner, name, v, 1))
        self._check_schedule("reject_weight", lambda name, v: _check_range(owner, name, v, 0.0, 1.0))
        self._warn_if_rejected_positions_are_masked()
        _check_range(owner, "kd_coef", self.kd_coef, 0.0, float("inf"))
        _check_range(owner, "reward_coef", self.reward_coef, 0.0, float("inf"))
        if self.kd_coef == 0 and self.reward_coef == 0:
            raise ValueError(
                f"{owner}: kd_coef=0 and reward_coef=0 leave nothing to train on; set kd_coef > 0 (distillation), "
                "reward_coef > 0 (binary-reward policy gradient) or both."
            )

    def _reward_term_is_dead(self) -> tuple[str, str] | None:
        """Why the reward term is identically zero with these settings, and the fix; `None` when it is not."""
        if not self.gate_rule.rejects:
            return (
                f"gate={self.gate!r} accepts every token (every reward is 1, so every advantage is 0)",
                "gate='topk'",
            )
        return None

    def _check_reward_term(self) -> None:
        """`reward_coef > 0` where the reward term is identically zero: an error when it is the whole loss."""
        dead = self._reward_term_is_dead() if self.reward_coef != 0 else None
        if dead is None:
            return
        why, fix = dead
        message = f"{type(self).__name__}: reward_coef={self.reward_coef!r} has no effect: {why}."
        if self.kd_coef == 0:
            raise ValueError(
                f"{message} With kd_coef=0 the loss would be identically zero. Set {fix}, or kd_coef > 0 to distill."
            )
        # stack: here, __post_init__, the dataclass __init__, the caller
        warnings.warn(f"{message} Set {fix} to train on the reward, or reward_coef=0.", UserWarning, stacklevel=4)

    def _warn_if_rejected_positions_are_masked(self) -> None:
        if not self.gate_rule.rejects:
            return
        if self._schedule("reject_weight").min == 0:
            warnings.warn(
                f"{type(self).__name__}: a reject weight of 0 masks rejected positions completely, which can collapse "
                "the student: nothing holds the rejected positions in place, so the acceptance rate falls and the "
                "training loss goes to 0 with it. Keep a weight on them, e.g. reject_weight=0.5 (the default), or "
                "watch gate/acceptance_rate.",
                UserWarning,
                stacklevel=5,  # here, _check_gate_settings, __post_init__, the dataclass __init__, the caller
            )

    def _check_schedule(self, name: str, check: Callable[[str, Any], None]) -> None:
        owner = type(self).__name__
        schedule = getattr(self, f"{name}_schedule")
        reads_ends = _resolve(owner, f"{name}_schedule", schedule, SCHEDULE_KINDS).reads_ends
        for end in ("start", "end"):
            value = getattr(self, f"{name}_{end}")
            if reads_ends and value is None:
                raise ValueError(
                    f"{owner}: {name}_schedule={schedule!r} needs {name}_start and {name}_end; {name}_{end} is not set."
                )
            if not reads_ends and value is not None:
                raise ValueError(
                    f"{owner}: {name}_{end}={value!r} is set but {name}_schedule={schedule!r}; set "
                    f"{name}_schedule='linear' to use it, or set {name} instead."
                )
            if value is not None:
                check(f"{name}_{end}", value)

    @property
    def gate_rule(self) -> GateRule:
        """The rule selected by `gate` (`rules.GATE_RULES`)."""
        return get_rule(self.gate, owner=type(self).__name__)

    @property
    def modes(self) -> GateModes:
        """The gate's modes resolved from their string fields (`GateModes`). Built from the fields on every read, so it
        is never saved with the config (`to_dict`, pickling) and follows a field changed after construction."""
        return GateModes(**self._gate_modes())

    def _gate_modes(self) -> dict[str, Any]:
        owner = type(self).__name__
        return {
            "top_k": self._schedule("gate_top_k", rounded=True),
            "reject_weight": self._schedule("reject_weight"),
            "normalization": _resolve(owner, "gate_normalize", self.gate_normalize, NORMALIZATION_MODES),
            "reject_target": self._reject_target(),
        }

    def _schedule(self, name: str, *, rounded: bool = False) -> Schedule:
        """The schedule of the setting `name` (``"gate_top_k"``, ``"reject_weight"``) from its fields; `rounded` for a
        count (k: rounded half up, at least 1)."""
        schedule = getattr(self, f"{name}_schedule")
        kind = _resolve(type(self).__name__, f"{name}_schedule", schedule, SCHEDULE_KINDS)
        start, end = getattr(self, f"{name}_start"), getattr(self, f"{name}_end")
        return kind.from_fields(getattr(self, name), start, end, rounded=rounded)

    def _reject_target(self) -> RejectTarget:
        return _resolve(type(self).__name__, "reject_target", self.reject_target, REJECT_TARGET_MODES)

    @property
    def largest_top_k(self) -> int | None:
        """The largest k the run reads from the teacher's top tokens (the gate's k over its schedule, which target
        filtering reads too); None when nothing reads it."""
        if not (self.gate_rule.uses_top_k or self._reject_target().filters):
            return None
        return self._schedule("gate_top_k", rounded=True).max

    def gate_top_k_at(self, step: int, max_steps: int) -> int:
        """The `topk` gate's k at optimizer step `step` of `max_steps` (see `gate_top_k_schedule`)."""
        return self.modes.top_k.at(step, max_steps)

    def reject_weight_at(self, step: int, max_steps: int) -> float:
        """The weight of rejected positions at optimizer step `step` of `max_steps` (see `reject_weight_schedule`)."""
        return self.modes.reject_weight.at(step, max_steps)

    @property
    def gates_on_policy(self) -> bool:
        """Whether student-generated sequences go through the gate."""
        return True

    @property
    def gates_off_policy(self) -> bool:
        """Whether dataset and `seq_kd` sequences go through the gate."""
        return True


@dataclass
class SpecKDConfig(GateConfigMixin, GKDConfig):
    """
    Configuration class for [`SpecKDTrainer`].

    Every [`~trl.experimental.gkd.GKDConfig`] field keeps its meaning (`lmbda`, `beta`, `temperature`,
    `max_new_tokens`, `seq_kd`, ...); this class adds the speculative accept/reject gate. At each completion position
    the student proposes a token (the token it sampled for on-policy sequences, its own prediction for dataset and
    `seq_kd` sequences), the teacher verifies it, and the generalized JSD is kept at weight 1 on accepted positions and
    `reject_weight` on rejected ones.

    The gate's own fields (`gate`, `gate_top_k`, `reject_weight`, `gate_normalize`, their schedules, `kd_coef` and
    `reward_coef`) are those of [`GateConfigMixin`], documented there and shared with [`SpecKDDistillationConfig`].
    With `gate="none"` the loss is GKD's. `reward_coef > 0` needs gated on-policy tokens: `lmbda > 0`, a gate other
    than `"none"` and `gate_on` other than `"off_policy"`.

    One default differs from TRL: an unset `bf16` means bf16 where the GPU supports it and float32 elsewhere (TRL's
    `bf16=True` default raises on CPU).

    Args:
        gate_on (`str`, *optional*, defaults to `"both"`):
            Which sequences go through the gate: `"both"`, `"on_policy"` (student-generated) or `"off_policy"`
            (dataset and `seq_kd`). Ungated sequences are fully accepted.
        gate_proposal (`str`, *optional*, defaults to `"greedy"`):
            The student's proposal on dataset and `seq_kd` sequences: `"greedy"` (argmax) or `"sample"` (drawn from
            the temperature-1 student with the trainer's seeded generator).
        loss_path (`str`, *optional*, defaults to `"chunked"`):
            How the loss is computed: `"chunked"` from both models' final hidden states and output layers,
            `loss_chunk_size` completion tokens at a time, so that neither model's full logits ever exist (the same
            loss and gradients as `"eager"` to float round-off; far less time and memory at large vocabularies), or
            `"eager"` from both models' full `[B, T, V]` logits, as GKD does (bit-for-bit GKD's numbers with
            `gate="none"`). `"chunked"` needs a plain `nn.Linear` output layer on both models (no LoRA or
            `modules_to_save` on `lm_head`, no quantized head) and, under DeepSpeed ZeRO-3, a frozen student
            `lm_head` (LoRA); pick `"eager"` otherwise.
        loss_chunk_size (`int`, *optional*, defaults to `256`):
            Tokens per chunk of the `"chunked"` loss path.
        on_policy_generation (`str`, *optional*, defaults to `"student"`):
            How on-policy sequences are generated: `"student"` (the student samples alone, as GKD) or
            `"speculative"` (SKD-style gated generation: the student drafts `gate_draft_len` tokens, the teacher
            verifies the draft in one forward pass with the `gate` rule and replaces the first rejected token by its
            own; see `speckd_trl.generation.speculative_generate`). Logged as `gen/teacher_forwards_per_token`,
            `gen/mean_accepted_run` and `gen/replaced_fraction`.
        gate_draft_len (`int`, *optional*, defaults to `4`):
            Tokens the student drafts per teacher forward pass with `on_policy_generation="speculative"`.
        mixing (`str`, *optional*, defaults to `"batch"`):
            How `lmbda` mixes on-policy and off-policy data. `"batch"` (as GKD): each micro-batch is on-policy with
            probability `lmbda`, else `seq_kd` / dataset. `"sample"`: in every micro-batch of `B` rows,
            `floor(lmbda * B + 0.5)` rows (rounded half up; lmbda 0.25 and B = 8 give 2) are generated on-policy and
            the rest keep their `seq_kd` / dataset completions. Both draws come from a generator seeded with `seed`
            that advances identically on every process.
        teacher_load_in_4bit (`bool`, *optional*, defaults to `False`):
            Load a teacher given as a name or path in 4-bit with bitsandbytes (`teacher_quantization="nf4"`, or
            `teacher_bnb_4bit_quant_type`). `speckd-trl check-teacher` measures what it costs the teacher first.
        teacher_quantization (`str`, *optional*, defaults to `"auto"`):
            How a teacher given as a name or path is loaded: `"none"` (its own dtype), `"int8"` (bitsandbytes 8-bit),
            `"nf4"` / `"fp4"` (bitsandbytes 4-bit, with the `teacher_bnb_4bit_*` settings), or `"auto"`: 4-bit as
            `teacher_load_in_4bit` says, else none. A `transformers` `QuantizationConfig` object (HQQ, torchao, GPTQ,
            ...) is used as it is (Python API only).
        teacher_quantization_skip_modules (`list[str]` or `None`, *optional*, defaults to `None`):
            Teacher modules kept in full precision when it is quantized, as module-name prefixes (e.g.
            `["model.layers.0", "model.layers.29.mlp"]`; transformers' `llm_int8_skip_modules`, output layer always
            kept). `speckd-trl check-teacher --check_sensitivity` ranks the decoder layers by what quantizing each costs.
        teacher_bnb_4bit_quant_type (`str`, *optional*, defaults to `"nf4"`):
            4-bit data type of the teacher: `"nf4"` or `"fp4"`.
        teacher_bnb_4bit_compute_dtype (`str`, *optional*, defaults to `"auto"`):
            Compute dtype of the 4-bit teacher: `"auto"` (bfloat16 with `bf16=True`, float16 with `fp16=True`, else
            float32), `"float32"`, `"bfloat16"` or `"float16"`.
        teacher_bnb_4bit_use_double_quant (`bool`, *optional*, defaults to `True`):
            Quantize the 4-bit teacher's quantization constants too (about 0.4 bits per parameter saved).
        teacher_cache (`str` or `None`, *optional*, defaults to `None`):
            A teacher cache (`speckd-trl cache-teacher`): dataset micro-batches in training read the teacher's cached
            top-K log-probabilities instead of running it, and the divergence runs over the top-K support plus a tail
            bucket (`sparse_teacher.tail_bucket_target`, TRL's server-teacher approximation). With `lmbda=0` no
            teacher is loaded at all; with `lmbda > 0` on-policy batches (and a `mixing="sample"` micro-batch with
            on-policy rows, and evaluation) use the live teacher, which must then be given, cut to the same top-K +
            tail bucket, so that every batch is on one loss scale. The `topk` gate is exact for
            `gate_top_k <= K`; `gate="spec"` needs the teacher's probability of every proposal and `seq_kd` the
            teacher's own completions, so neither works with a cache.
        teacher_cache_top_k (`int`, *optional*, defaults to `32`):
            `speckd-trl cache-teacher`: tokens K kept per position.
        teacher_cache_dtype (`str`, *optional*, defaults to `"float16"`):
            `speckd-trl cache-teacher`: storage type of the cached log-probabilities, `"float16"` or `"float32"`.
        teacher_cache_check_teacher (`bool`, *optional*, defaults to `True`):
            Check that `teacher_cache` was made by this run's teacher: a fingerprint of its weights (embeddings,
            norms, output layer; the same in any precision, so a cache of the float32 teacher serves its NF4 copy)
            against the loaded teacher, or, when none is loaded (`lmbda=0`), its name or path against
            `teacher_model_name_or_path`. Set `False` after moving or renaming the teacher on purpose.
    """

    gate_on: str = field(
        default="both",
        metadata={
            "help": "Sequences that go through the gate: 'both', 'on_policy' (student-generated) or 'off_policy' "
            "(dataset and seq_kd). Ungated sequences are fully accepted.",
            "choices": list(GATE_ON),
        },
    )
    gate_proposal: str = field(
        default="greedy",
        metadata={
            "help": "Student proposal on dataset and seq_kd sequences: 'greedy' (argmax) or 'sample' (drawn from the "
            "temperature-1 student).",
            "choices": list(GATE_PROPOSALS),
        },
    )
    loss_path: str = field(
        default="chunked",
        metadata={
            "help": "'chunked' (from hidden states, loss_chunk_size tokens at a time: the same loss and gradients as "
            "'eager', far less time and memory) or 'eager' (both models' full logits, as GKD: bit-for-bit GKD).",
            "choices": list(LOSS_PATHS),
        },
    )
    loss_chunk_size: int = field(
        default=256,
        metadata={"help": "Tokens per chunk of the 'chunked' loss path."},
    )
    on_policy_generation: str = field(
        default="student",
        metadata={
            "help": "How on-policy sequences are generated: 'student' (the student samples alone, as GKD) or "
            "'speculative' (the student drafts gate_draft_len tokens, the teacher verifies them in one forward pass "
            "with the gate rule and replaces the first rejected token by its own).",
            "choices": list(ON_POLICY_GENERATIONS),
        },
    )
    gate_draft_len: int = field(
        default=4,
        metadata={"help": "Tokens the student drafts per teacher forward with on_policy_generation='speculative'."},
    )
    mixing: str = field(
        default="batch",
        metadata={
            "help": "How lmbda mixes on- and off-policy data: 'batch' (each micro-batch is on-policy with probability "
            "lmbda, as GKD) or 'sample' (round-half-up(lmbda * batch size) rows of every micro-batch are on-policy: "
            "lmbda 0.25 and 8 rows give 2).",
            "choices": list(MIXINGS),
        },
    )
    teacher_load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load a teacher given as a name or path in 4-bit (bitsandbytes)."},
    )
    teacher_quantization: str = field(
        default="auto",
        metadata={
            "help": "How a teacher given as a name or path is loaded: 'none', 'int8' (bitsandbytes 8-bit), 'nf4' or "
            "'fp4' (bitsandbytes 4-bit), or 'auto' (4-bit as teacher_load_in_4bit says, else none). "
            "`speckd-trl check-teacher` measures what a setting costs the teacher.",
            "choices": list(TEACHER_QUANTIZATIONS),
        },
    )
    teacher_quantization_skip_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Teacher modules kept in full precision when it is quantized, as name prefixes (e.g. "
            "model.layers.0); the output layer is always kept. `speckd-trl check-teacher --check_sensitivity` ranks "
            "the layers."
        },
    )
    teacher_bnb_4bit_quant_type: str = field(
        default="nf4",
        metadata={"help": "4-bit data type of the teacher: 'nf4' or 'fp4'.", "choices": list(BNB_4BIT_QUANT_TYPES)},
    )
    teacher_bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "Compute dtype of the 4-bit teacher: 'auto' (bfloat16 with bf16, float16 with fp16, else "
            "float32), 'float32', 'bfloat16' or 'float16'.",
            "choices": list(BNB_COMPUTE_DTYPES),
        },
    )
    teacher_bnb_4bit_use_double_quant: bool = field(
        default=True,
        metadata={"help": "Also quantize the 4-bit teacher's quantization constants (nested quantization)."},
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "A teacher cache directory (`speckd-trl cache-teacher`): dataset batches read the teacher's top-K "
            "log-probabilities from it (top-K + tail-bucket divergence; on-policy batches cut the live teacher the "
            "same way); with lmbda=0 no teacher is loaded."
        },
    )
    teacher_cache_top_k: int = field(
        default=32,
        metadata={"help": "`speckd-trl cache-teacher`: teacher tokens K kept per completion position."},
    )
    teacher_cache_dtype: str = field(
        default="float16",
        metadata={
            "help": "`speckd-trl cache-teacher`: storage type of the cached log-probabilities.",
            "choices": ["float16", "float32"],
        },
    )
    teacher_cache_check_teacher: bool = field(
        default=True,
        metadata={
            "help": "Check that teacher_cache was made by this run's teacher (a fingerprint of its weights when one "
            "is loaded, else its name or path against teacher_model_name_or_path). False after moving or renaming "
            "the teacher on purpose."
        },
    )
    # SFTConfig's field, with what it does here (GKD's trainer ignores it)
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack each dataset micro-batch: its rows share rows of at most max_length tokens (TRL's 'bfd' "
            "packer, position_ids restarting at each sequence, no padding computed), and both models, the gate, the "
            "loss and a teacher cache read them there; same loss and gradients as padded. On-policy micro-batches and "
            "evaluation stay padded. Needs packing_strategy='bfd', a model that takes packed position_ids (eager, "
            "sdpa, flash attention), and dataset micro-batches: not with seq_kd, lmbda=1 or mixing='sample' with "
            "lmbda > 0. padding_free alone is refused.",
        },
    )

    def __post_init__(self):
        # Our checks run first so that a bad value is reported with its name, value and range.
        owner = type(self).__name__
        self._check_gate_settings()
        _check_choice(owner, "gate_on", self.gate_on, GATE_ON)
        _check_choice(owner, "gate_proposal", self.gate_proposal, GATE_PROPOSALS)
        _check_choice(owner, "loss_path", self.loss_path, LOSS_PATHS)
        _check_choice(owner, "teacher_bnb_4bit_quant_type", self.teacher_bnb_4bit_quant_type, BNB_4BIT_QUANT_TYPES)
        _check_choice(owner, "teacher_bnb_4bit_compute_dtype", self.teacher_bnb_4bit_compute_dtype, BNB_COMPUTE_DTYPES)
        self._check_teacher_quantization()
        _check_int(owner, "loss_chunk_size", self.loss_chunk_size, 1)
        _check_choice(owner, "on_policy_generation", self.on_policy_generation, ON_POLICY_GENERATIONS)
        _check_int(
            owner, "gate_draft_len", self.gate_draft_len, 1, " (tokens the student drafts per teacher forward pass)"
        )
        _check_range(owner, "lmbda", self.lmbda, 0.0, 1.0)
        _check_range(owner, "beta", self.beta, 0.0, 1.0)
        self._check_reward_term()
        _check_temperature(owner, self.temperature)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"{owner}: max_new_tokens={self.max_new_tokens!r} is not valid; it must be an integer >= 1."
            )
        _check_choice(owner, "mixing", self.mixing, MIXINGS)
        self._check_teacher_cache()
        self._check_packing()
        _resolve_bf16(self)
        super().__post_init__()

    def _check_packing(self) -> None:
        """`packing` and `padding_free` come with `SFTConfig`. `packing=True` packs dataset micro-batches
        (`packing.py`); what it cannot pack is refused, never accepted and ignored: `padding_free` alone (one row per
        micro-batch), another `packing_strategy` than "bfd", and settings with no micro-batch of dataset rows to pack
        (`seq_kd=True`, `lmbda=1`) or with rows of both kinds in one micro-batch (`mixing="sample"`)."""
        owner = type(self).__name__
        if self.padding_free and not self.packing:
            raise ValueError(
                f"{owner}: padding_free=True is not supported: SpecKDTrainer does not flatten a micro-batch into one "
                "row (on CPU and without varlen attention one long row costs more in attention than it saves). Use "
                "packing=True instead, which packs dataset micro-batches into rows of at most max_length tokens."
            )
        if not self.packing:
            return
        why = None
        if self.packing_strategy != "bfd":
            why = f'packing_strategy={self.packing_strategy!r}: only "bfd" keeps every sequence whole (set "bfd")'
        elif self.seq_kd:
            why = (
                "seq_kd=True: every off-policy micro-batch is generated by the teacher, none is a dataset micro-batch"
            )
        elif self.lmbda >= 1:
            why = f"lmbda={self.lmbda}: every micro-batch is on-policy, none is a dataset micro-batch"
        elif self.modes.mixing.per_row and self.lmbda > 0:
            why = (
                f'mixing="sample" with lmbda={self.lmbda}: on-policy and dataset rows share a micro-batch (use '
                'mixing="batch": each micro-batch is then on-policy or dataset, and the dataset ones are packed)'
            )
        elif self.eval_packing:
            why = "eval_packing=True: evaluation micro-batches stay padded (leave eval_packing None or False)"
        if why is not None:
            raise ValueError(
                f"{owner}: packing=True packs dataset micro-batches only, and is not supported with {why}. Remove "
                "packing=True, or change the setting."
            )

    def _check_teacher_quantization(self) -> None:
        owner, value = type(self).__name__, self.teacher_quantization
        if not isinstance(value, str):
            from transformers.utils.quantization_config import QuantizationConfigMixin

            if not isinstance(value, QuantizationConfigMixin):
                raise ValueError(
                    f"{owner}: teacher_quantization={value!r} is neither one of {', '.join(TEACHER_QUANTIZATIONS)} "
                    "nor a transformers QuantizationConfig (e.g. BitsAndBytesConfig, HqqConfig, TorchAoConfig)."
                )
        else:
            _check_choice(owner, "teacher_quantization", value, TEACHER_QUANTIZATIONS)
        if self.teacher_load_in_4bit and self.teacher_quantization_method not in ("nf4", "fp4"):
            raise ValueError(
                f"{owner}: teacher_load_in_4bit=True with teacher_quantization={value!r}: the two disagree. Drop "
                f"teacher_load_in_4bit, or set teacher_quantization to 'nf4' / 'fp4' / 'auto'."
            )
        skip = self.teacher_quantization_skip_modules
        if skip is not None:
            if isinstance(skip, str) or not all(isinstance(name, str) and name for name in skip):
                raise ValueError(
                    f"{owner}: teacher_quantization_skip_modules={skip!r} must be a list of module names, e.g. "
                    "['model.layers.0', 'model.layers.29']."
                )
            if self.teacher_quantization_method == "none":
                raise ValueError(
                    f"{owner}: teacher_quantization_skip_modules={skip!r} keeps modules of a quantized teacher in full "
                    "precision, but the teacher is not quantized (teacher_quantization='none', or 'auto' without "
                    "teacher_load_in_4bit). Set teacher_quantization, or drop the list."
                )

    def to_dict(self) -> dict[str, Any]:
        """`TrainingArguments.to_dict`, with a `QuantizationConfig` object in `teacher_quantization` as its own dict
        (the config is saved and logged as JSON)."""
        data = super().to_dict()
        if not isinstance(self.teacher_quantization, str):
            data["teacher_quantization"] = self.teacher_quantization.to_dict()
        return data

    @property
    def teacher_quantization_method(self) -> str:
        """How a teacher given by name is loaded: "none", "int8", "nf4", "fp4", or a QuantizationConfig's
        `quant_method` (e.g. "hqq") for an object; "auto" resolved."""
        value = self.teacher_quantization
        if not isinstance(value, str):
            method = getattr(value, "quant_method", "custom")
            return str(getattr(method, "value", method))
        if value == "auto":
            return self.teacher_bnb_4bit_quant_type if self.teacher_load_in_4bit else "none"
        return value

    def _check_teacher_cache(self) -> None:
        owner = type(self).__name__
        _check_int(owner, "teacher_cache_top_k", self.teacher_cache_top_k, 1)
        _check_choice(owner, "teacher_cache_dtype", self.teacher_cache_dtype, ("float16", "float32"))
        if self.teacher_cache is None:
            return
        check_teacher_reads(
            get_rule(self.gate, owner),
            frozenset({"top_k"}),
            owner=owner,
            teacher=f"teacher_cache={self.teacher_cache!r} (the teacher's top-K tokens only)",
        )
        if self.seq_kd:
            raise ValueError(
                f"{owner}: seq_kd=True with teacher_cache={self.teacher_cache!r}: seq_kd replaces the dataset's "
                "completions with the teacher's own, which the cache does not hold. Drop one of the two."
            )

    def _reward_term_is_dead(self) -> tuple[str, str] | None:
        dead = super()._reward_term_is_dead()
        if dead is None and not self.gates_on_policy:
            dead = "gate_on='off_policy' gates no on-policy token, and only those get rewards", "gate_on='both'"
        if dead is None and self.lmbda == 0:
            dead = "lmbda=0 generates no on-policy token, and only those get rewards", "lmbda > 0"
        return dead

    @property
    def modes(self) -> SpecKDModes:
        """Every mode resolved from its string field (`SpecKDModes`), as `GateConfigMixin.modes`."""
        owner = type(self).__name__
        return SpecKDModes(
            **self._gate_modes(),
            proposal=_resolve(owner, "gate_proposal", self.gate_proposal, PROPOSALS),
            loss_path=_resolve(owner, "loss_path", self.loss_path, LOSS_PATH_MODES),
            mixing=_resolve(owner, "mixing", self.mixing, MIXING_MODES),
            on_policy_generation=_resolve(
                owner, "on_policy_generation", self.on_policy_generation, ON_POLICY_GENERATION_MODES
            ),
        )

    @property
    def gates_on_policy(self) -> bool:
        """Whether student-generated sequences go through the gate."""
        return self.gate_on in ("both", "on_policy")

    @property
    def gates_off_policy(self) -> bool:
        """Whether dataset and `seq_kd` sequences go through the gate."""
        return self.gate_on in ("both", "off_policy")


@dataclass
class SpecKDDistillationConfig(GateConfigMixin, DistillationConfig):
    """
    Configuration class for [`SpecKDDistillationTrainer`]: TRL's [`~trl.DistillationConfig`] plus the speculative
    gate's fields of [`GateConfigMixin`] (`gate`, `gate_top_k`, `reject_weight`, `gate_normalize`, their schedules,
    `kd_coef`, `reward_coef`), with the same meanings, defaults and checks as in [`SpecKDConfig`].

    Every `DistillationConfig` field keeps its meaning (`beta`, `temperature`, `max_completion_length`, `use_vllm`,
    ...). `DistillationTrainer` is on-policy only: every completion is sampled by the student, so every completion
    token is gated and its proposal is the sampled token (`SpecKDConfig`'s `gate_on`, `gate_proposal`, `lmbda` and
    `mixing` have no counterpart here). With `gate="none"` (and `kd_coef=1`, `reward_coef=0`) the loss is
    `DistillationTrainer`'s.

    The `"spec"` rule takes the student's proposal distribution to be `softmax(logits / temperature)`, which is what
    the student samples from when `top_p=1`, `top_k=0`, `min_p=None` and `repetition_penalty=1` (the defaults); other
    values (or sampling settings in `generation_kwargs`, see `NEUTRAL_SAMPLING`) change the sampling distribution and
    bias the acceptance rate, and warn. Settings in the student's own `generation_config` (from its checkpoint) are
    never applied: the trainer samples with its own settings only (`generation.sampling_only_from`). The teacher
    verifies at temperature 1; the divergence itself uses `temperature`, as in `DistillationTrainer`.

    One default differs from TRL: an unset `bf16` means bf16 where the GPU supports it and float32 elsewhere.
    """

    def __post_init__(self):
        owner = type(self).__name__
        self._check_gate_settings()
        if self.modes.reject_target.filters:
            raise ValueError(
                f"{owner}: reject_target={self.reject_target!r} is supported by SpecKDTrainer only; use "
                "reject_target='teacher' here, or SpecKDTrainer (SpecKDConfig) for target filtering."
            )
        _check_range(owner, "beta", self.beta, 0.0, 1.0)
        _check_temperature(owner, self.temperature)
        if self.max_completion_length is not None:
            _check_int(owner, "max_completion_length", self.max_completion_length, 1)
        self._check_reward_term()
        self._warn_if_spec_reads_a_filtered_sampler()
        _resolve_bf16(self)
        super().__post_init__()

    def _warn_if_spec_reads_a_filtered_sampler(self) -> None:
        if not self.gate_rule.reads_student:
            return
        settings = {
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            **(self.generation_kwargs or {}),
        }
        changed = [f"{name}={value!r}" for name, value in settings.items() if not _leaves_sampling_alone(name, value)]
        if settings.get("temperature", self.temperature) != self.temperature:
            changed.append(
                f"temperature={settings['temperature']!r} (generation_kwargs; temperature={self.temperature!r})"
            )
        if changed:
            warnings.warn(
                f"{type(self).__name__}: gate={self.gate!r} takes the student's proposal distribution q to be "
                f"softmax(logits / temperature), but {', '.join(changed)} change the distribution the student samples "
                "from, which biases the acceptance rate. Leave them at their defaults, or use gate='topk' (which "
                "reads only the teacher's ranks).",
                UserWarning,
                stacklevel=4,  # here, __post_init__, the dataclass __init__, the caller
            )


# `GenerationConfig` settings that change the distribution tokens are sampled from, and the values at which they leave
# ``softmax(logits / temperature)`` as it is. (`None` is unset: transformers then uses its global default, which is
# neutral for all of these except `top_k`, whose default is 50.)
NEUTRAL_SAMPLING: dict[str, tuple[Any, ...]] = {
    "do_sample": (True,),
    "top_k": (0,),
    "top_p": (None, 1.0),
    "min_p": (None, 0, 0.0),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "top_h": (None,),
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "guidance_scale": (None, 1.0),
    "exponential_decay_length_penalty": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "begin_suppress_tokens": (None,),
    "watermarking_config": (None,),
}


def _leaves_sampling_alone(name: str, value: Any) -> bool:
    """Whether the generation setting `name=value` leaves the sampling distribution as it is (any setting that is not
    a sampling option, e.g. `max_new_tokens`, does)."""
    return name not in NEUTRAL_SAMPLING or value in NEUTRAL_SAMPLING[name]


@dataclass
class SpecKDServerDistillationConfig(SpecKDDistillationConfig, ServerDistillationConfig):
    """
    Configuration class for [`SpecKDServerDistillationTrainer`]: TRL's
    [`~trl.experimental.server_distillation.ServerDistillationConfig`] (the teacher on a vLLM server,
    `teacher_model_server_url`, `loss_top_k`, `loss_add_tail`) plus the gate's fields, as [`SpecKDDistillationConfig`].

    The server returns the teacher's top `loss_top_k` tokens at every completion position and its log-probability of
    the sampled token; the gated loss is the forward KL over that top-k plus a tail bucket (TRL's server loss for
    `beta=0`, `loss_add_tail=True`, the only setting gated here). The `topk` gate needs `gate_top_k <= loss_top_k`;
    the `spec` rule reads the teacher's probability of the sampled token, which the server returns, at the
    divergence's `temperature`, so it needs `temperature=1` (where it is the teacher's own). Two defaults differ from
    TRL's server config, for the gated loss: `beta=0.0` (TRL: 1.0) and `loss_top_k=20` (TRL: 1; vLLM returns at
    most 20 log-probabilities per token unless the server raises its `max_logprobs`).
    """

    # ServerDistillationConfig's own default (the student's vLLM server stays off the teacher server's port 8000);
    # restated because SpecKDDistillationConfig, first among the bases, carries DistillationConfig's 8000
    vllm_server_port: int = field(
        default=8001,
        metadata={"help": "Port of the student vLLM server (the teacher server commonly runs on 8000)."},
    )

    # the gated server loss: forward KL (TRL's default is 1.0, reverse KL, a top-1 estimator on a server teacher)
    beta: float = field(
        default=0.0,
        metadata={
            "help": "0 (forward KL over the teacher's top-k plus tail): the only value gated on a server teacher."
        },
    )
    # the gate reads the teacher's top gate_top_k (5 by default) tokens; TRL's default returns only the top 1. 20 is
    # the most a vLLM server returns by default (its `max_logprobs`)
    loss_top_k: int = field(
        default=20,
        metadata={"help": "Teacher tokens the server returns per position (>= gate_top_k; vLLM's default cap is 20)."},
    )

    def __post_init__(self):
        owner = type(self).__name__
        if self.beta != 0:
            raise ValueError(
                f"{owner}: beta={self.beta} is not gated on a server teacher: TRL's server loss for beta > 0 is a "
                "top-1 estimator, and the gate here weights the forward KL over the top-k plus tail. Use beta=0."
            )
        if not self.loss_add_tail:
            raise ValueError(
                f"{owner}: loss_add_tail=False is not gated on a server teacher: the gated loss keeps the tail bucket "
                "(the teacher's mass outside its top-k). Use loss_add_tail=True."
            )
        check_teacher_reads(
            self.gate_rule,
            frozenset({"top_k", "proposal"}),
            owner=owner,
            teacher="a teacher server (its top loss_top_k tokens and the sampled token's log-probability only)",
        )
        # The server cuts its top-k with torch.topk, which keeps an arbitrary subset of the tokens tied at the cut: a
        # tie at the gate's k-th place is resolved toward the lower id only inside the returned set, so k must stay
        # below loss_top_k (see `server_teacher.server_sparse_teacher`).
        k = self.largest_top_k
        if k is not None and k >= self.loss_top_k:
            raise ValueError(
                f"{owner}: the gate reads the teacher's top {k} tokens (gate_top_k) but the server returns only its top "
                f"loss_top_k={self.loss_top_k}, cut at an arbitrary token where several tie (common in bf16/fp16), so "
                f"ties at the k-th place could not go to the lower id as the topk rule says. Set loss_top_k >= {k + 1}, "
                "or a smaller gate_top_k."
            )
        if self.gate_rule.reads_student and self.temperature != 1.0:
            raise ValueError(
                f"{owner}: gate={self.gate!r} with temperature={self.temperature}: the server scores the sampled token "
                "at the divergence's temperature, and the rule needs the teacher's own probability (temperature 1). "
                "Use temperature=1, or gate='topk'."
            )
        super().__post_init__()


@dataclass
class SpecKDGOLDConfig(GateConfigMixin, GOLDConfig):
    """
    Configuration class for [`SpecKDGOLDTrainer`]: TRL's [`~trl.experimental.gold.GOLDConfig`] (distillation across
    tokenizers: `use_uld_loss`, `uld_use_hybrid_loss`, `use_extended_uld`, `teacher_tokenizer_name_or_path`, `lmbda`,
    ...) plus the gate's fields of [`GateConfigMixin`], with the same meanings and defaults as in [`SpecKDConfig`].

    The gate verifies each of GOLD's aligned spans at its first student token against the teacher's distribution at
    the span's first teacher token, and weights the span's ULD term (see `cross_tokenizer`); with `gate="none"` (and
    `kd_coef=1`) the loss is `GOLDTrainer`'s. A gate that rejects needs what the byte alignment gives:
    `use_uld_loss=True` and `use_extended_uld=True` (positional ULD pairs tokens that follow different texts). The
    student proposes its greedy token on dataset rows and its sample on on-policy rows (at `temperature`, `top_p`,
    `top_k`: the `spec` rule warns when these filter the sampler, GOLD's default `top_p=0.95` does). Not served here:
    `reject_target="top_k"` (the ULD loss has no per-token target) and `reward_coef > 0`.

    One default differs from TRL: an unset `bf16` means bf16 where the GPU supports it and float32 elsewhere.
    """

    def __post_init__(self):
        owner = type(self).__name__
        self._check_gate_settings()
        if self.modes.reject_target.filters:
            raise ValueError(
                f"{owner}: reject_target={self.reject_target!r} is not served across tokenizers: GOLD's ULD loss "
                "compares sorted distributions, it has no per-token target to filter. Use reject_target='teacher'."
            )
        if self.reward_coef != 0:
            raise ValueError(
                f"{owner}: reward_coef={self.reward_coef!r} is not served by SpecKDGOLDTrainer (the REINFORCE term on "
                "the gate's reward is implemented on the same-tokenizer trainers only). Use reward_coef=0."
            )
        if self.gate_rule.rejects and not self.use_uld_loss:
            raise ValueError(
                f"{owner}: gate={self.gate!r} with use_uld_loss=False: without ULD, GOLD distils with GKD's JSD over a "
                "shared tokenizer, which SpecKDTrainer gates (with more options). Set use_uld_loss=True to distil "
                "across tokenizers, or use SpecKDTrainer."
            )
        if self.gate_rule.rejects and not self.use_extended_uld:
            raise ValueError(
                f"{owner}: gate={self.gate!r} with use_extended_uld=False: positional ULD pairs the k-th student token "
                "with the k-th teacher token, which follow different texts, so the teacher has no distribution at the "
                "student's proposal. Set use_extended_uld=True (alignment by byte offsets), or gate='none'."
            )
        _check_temperature(owner, self.temperature)
        if self.gate_rule.reads_student and self.lmbda > 0 and (self.top_p != 1.0 or self.top_k not in (0, None)):
            warnings.warn(
                f"{owner}: gate={self.gate!r} takes the student's on-policy proposal distribution q to be "
                f"softmax(logits / temperature), but top_p={self.top_p!r}, top_k={self.top_k!r} filter the "
                "distribution the student samples from, which biases the acceptance rate. Set top_p=1.0 and top_k=0, "
                "or use gate='topk' (which reads only the teacher's ranks).",
                UserWarning,
                stacklevel=3,
            )
        _resolve_bf16(self)
        super().__post_init__()
