"""What quantizing the teacher costs it, measured before training: `speckd-trl check-teacher`.

    speckd-trl check-teacher --config recipe.yaml                      # the recipe's teacher, as configured vs full
    speckd-trl check-teacher --config recipe.yaml --check_sensitivity  # + which decoder layers to keep in full precision

A student distils the teacher *as loaded*: an NF4 copy of a small teacher can be far worse than the teacher itself
(SmolLM2-135M tuned on sums: 59.8% exact match in float32, 44.0% in NF4; docs/one-gpu.md). This loads the recipe's
teacher twice, in full precision and as `teacher_quantization` / `teacher_load_in_4bit` say, runs both over a sample
of the recipe's dataset rows (collated as training collates them) and compares them at the completion positions:

- `teacher_price`: the forward KL from the full-precision teacher to the configured one per completion token
  (nats) and how often both rank the same token first (top-1 agreement);
- the weights' memory of each (`weights_bytes`: quantization constants included) and the peak above the start while loading it and running the
  sample (`PeakMemory`: CUDA's allocator, or the process's resident set on a CPU);
- `layer_sensitivity` (`--check_sensitivity`): the same KL with only one decoder layer's linear layers rounded to
  the 4-bit type (bitsandbytes' own quantize / dequantize, in a full-precision copy), layer by layer, largest first:
  the layers to keep in full precision with `teacher_quantization_skip_modules`.

The verdict's thresholds (`VERDICTS`) are rules of thumb from the measured SmolLM2 points (int8: KL 0.009, 58.0%;
NF4: KL 0.12, 44.0%), not guarantees: the teacher's task accuracy as loaded is the measure that counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


# (largest KL per completion token, verdict), first match wins
VERDICTS = (
    (0.02, "negligible: the configured teacher teaches what the full-precision one does"),
    (
        0.06,
        "noticeable: check the teacher's task accuracy as loaded; keep its most sensitive layers in full "
        "precision (--check_sensitivity) or use teacher_quantization='int8'",
    ),  # fmt: skip
    (
        float("inf"),
        "large: the student will learn a worse teacher. Prefer teacher_quantization='int8', a calibrated 4-bit "
        "teacher (transformers' GPTQConfig as teacher_quantization: docs/one-gpu.md), keep the most sensitive "
        "layers in full precision (--check_sensitivity), or a teacher cache built from the full-precision "
        "teacher (speckd-trl cache-teacher)",
    ),  # fmt: skip
)


@dataclass
class TeacherPrice:
    """The configured teacher against the full-precision one at `positions` completion tokens."""

    kl_per_token: float  # mean KL(full || configured), nats
    top1_agreement: float  # share of positions where both rank the same token first
    positions: int

    @property
    def verdict(self) -> str:
        return next(text for limit, text in VERDICTS if self.kl_per_token < limit)


def completion_batches(dataset: Any, tokenizer: Any, *, samples: int, batch_size: int, max_length: int | None) -> list:
    """The first `samples` rows of a training dataset, collated as `SpecKDTrainer` collates them (TRL's
    `DataCollatorForChatML` after `data.prepare_prompt_completion`): dicts of `input_ids`, `attention_mask`, `labels`
    (`-100` outside the completions), each `[batch_size, T]`."""
    from trl.experimental.utils import DataCollatorForChatML

    from .data import collator_max_length, prepare_prompt_completion

    if samples < 1:
        raise ValueError(f"samples={samples} must be at least 1 (dataset rows to compare the teachers on).")
    rows = prepare_prompt_completion(dataset, tokenizer, max_length)
    rows = rows.select(range(min(samples, len(rows))))
    collate = DataCollatorForChatML(tokenizer=tokenizer, max_length=collator_max_length(max_length, tokenizer))
    batches = []
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        batches.append({key: batch[key] for key in ("input_ids", "attention_mask", "labels")})
    return batches


def _completion_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 logits `[n, V]` that predict the completion tokens (the labels shifted by one)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
    mask = batch["labels"][:, 1:] != -100
    return logits[:, :-1][mask.to(logits.device)].float().cpu()


def completion_logits(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """`_completion_logits` of every batch (the reference teacher's, kept to compare others with)."""
    model.eval()
    return [_completion_logits(model, batch) for batch in batches]


def teacher_price(
    reference: list[torch.Tensor], candidate: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> TeacherPrice:
    """KL(reference || candidate) per completion token and top-1 agreement.

    Args:
        reference (`list[torch.Tensor]`, each `[n_b, V]`): the full-precision teacher's `completion_logits`.
        candidate (`nn.Module`): the teacher as configured.
        batches: the batches `reference` was computed on, in the same order.
    """
    candidate.eval()
    kl_sum, agree, positions = 0.0, 0, 0
    for ref, batch in zip(reference, batches, strict=True):
        logits = _completion_logits(candidate, batch)
        width = min(ref.shape[-1], logits.shape[-1])  # a padded embedding: compare the shared ids
        log_p, log_q = ref[:, :width].log_softmax(-1), logits[:, :width].log_softmax(-1)
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        positions += ref.shape[0]
    if positions == 0:
        raise ValueError("The sampled rows have no completion tokens to compare the teachers on.")
    return TeacherPrice(kl_per_token=kl_sum / positions, top1_agreement=agree / positions, positions=positions)


def fake_quantize_(linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64) -> torch.Tensor:
    """Round `linear.weight` in place to what bitsandbytes' 4-bit `quant_type` stores (its own quantize and dequantize,
    blocks of `blocksize`); returns the original weight, to restore."""
    import bitsandbytes.functional as F

    original = linear.weight.data
    packed, state = F.quantize_4bit(original.float(), blocksize=blocksize, quant_type=quant_type)
    linear.weight.data = F.dequantize_4bit(packed, state).to(original.dtype).view_as(original)
    return original


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (`model.model.layers` for Llama, Qwen, Mistral, ...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"--check_sensitivity needs the decoder layers of the {type(model).__name__} at model.model.layers "
            "(as Llama, Qwen and Mistral keep them); this model has none there."
        )
    return layers


def layer_sensitivity(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], *, quant_type: str = "nf4", reference=None
) -> list[tuple[str, float]]:
    """KL(full || full with one decoder layer's linear layers rounded to `quant_type`) per completion token, for every
    decoder layer, largest first: ``[("model.layers.3", 0.031), ...]``; the names are prefixes that
    `teacher_quantization_skip_modules` takes. `model` is a full-precision teacher, left as it was."""
    reference = reference if reference is not None else completion_logits(model, batches)
    prefix = next(name for name, module in model.named_modules() if module is decoder_layers(model))
    scores = []
    for index, layer in enumerate(decoder_layers(model)):
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        originals = [fake_quantize_(m, quant_type) for m in linears]
        try:
            scores.append((f"{prefix}.{index}", teacher_price(reference, model, batches).kl_per_token))
        finally:
            for module, weight in zip(linears, originals):
                module.weight.data = weight
    return sorted(scores, key=lambda item: -item[1])


def weights_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights as held in memory: `get_memory_footprint` (parameters and buffers) plus what it
    misses, the quantization constants bitsandbytes keeps beside its weights (4-bit: each block's absmax and, with
    double quantization, their own constants; 8-bit: the per-row scales)."""
    total = model.get_memory_footprint()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        extras = []
        if state is not None:
            extras += [state.absmax, getattr(state, "offset", None)]
            nested = getattr(state, "state2", None)
            extras += [nested.absmax] if nested is not None else []
        scales = getattr(weight, "SCB", None)
        if scales is not None and not any(scales is b for b in module.buffers()):
            extras.append(scales)
        total += sum(t.numel() * t.element_size() for t in extras if torch.is_tensor(t))
    return total


@dataclass
class LoadedTeacher:
    """A teacher loaded one way, with what it cost."""

    label: str
    model: nn.Module
    weights_mib: float
    peak_mib: float


def _status_kib(field: str) -> int:
    """A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory of a stretch of code above the level at `start()`, in MiB (`load_measured`, the benchmarks).

    On a CUDA device: `torch.cuda.max_memory_allocated` (peak stats reset at `start()`). On a CPU: the process's peak
    resident set (`VmHWM`, reset through `/proc/self/clear_refs`; Linux only). Run the process with
    `MALLOC_MMAP_THRESHOLD_=1048576` so that freed tensors leave the resident set at once.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            self.base = _status_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        # (a page or two may leave the resident set between the reset and the read of the base: never below 0)
        return max(0.0, (_status_kib("VmHWM") * 1024 - self.base) / 2**20)


def load_measured(label: str, load, device: torch.device | str, batch: dict[str, torch.Tensor]) -> LoadedTeacher:
    """`load()` and one forward pass over `batch` under `PeakMemory`: the peak counts the weights (a checkpoint
    mapped from disk is read in by the forward), any full-precision copy made while quantizing, and one batch's
    activations."""
    meter = PeakMemory(device)
    meter.start()
    model = load()
    _completion_logits(model.eval(), batch)
    return LoadedTeacher(label, model, weights_bytes(model) / 2**20, meter.peak_mib())


def check_teacher(
    teacher: str,
    args: Any,
    dataset: Any,
    tokenizer: Any,
    *,
    samples: int = 64,
    batch_size: int = 8,
    sensitivity: bool = False,
) -> dict[str, Any]:
    """Load `teacher` at full precision and as `args` configures it, compare them on `samples` rows of `dataset`.

    Returns a dict with ``price`` (`TeacherPrice`), ``full`` and ``configured`` (`LoadedTeacher`, models dropped)
    and, with `sensitivity`, ``sensitivity`` (`layer_sensitivity` of the full-precision teacher).

    A recipe that loads the teacher in full precision is compared with a second full-precision load: KL 0.

    Raises:
        ValueError: when the teacher cannot be loaded both ways (a checkpoint stored quantized, a load that fails).
    """
    import copy

    from .models import is_quantized, load_teacher

    method = args.teacher_quantization_method
    full_args = copy.copy(args)  # the same loading arguments, unquantized
    full_args.teacher_quantization, full_args.teacher_load_in_4bit = "none", False
    full_args.teacher_quantization_skip_modules = None
    batches = completion_batches(
        dataset, tokenizer, samples=samples, batch_size=batch_size, max_length=args.max_length
    )
    full = load_measured("full precision", lambda: load_teacher(teacher, full_args).to(args.device), args.device,
                         batches[0])  # fmt: skip
    if is_quantized(full.model):
        raise ValueError(
            f"The teacher at {teacher!r} is stored quantized (its config.json has a quantization_config), so it cannot "
            "be loaded in full precision to compare with: check the full-precision checkpoint it was made from."
        )
    reference = completion_logits(full.model, batches)
    report: dict[str, Any] = {}
    if sensitivity:
        quant_type = method if method in ("nf4", "fp4") else "nf4"
        report["sensitivity"] = layer_sensitivity(full.model, batches, quant_type=quant_type, reference=reference)
    full.model = None
    configured = load_measured(f"as configured ({method})", lambda: load_teacher(teacher, args), args.device,
                               batches[0])  # fmt: skip
    report["price"] = teacher_price(reference, configured.model, batches)
    configured.model = None
    rows = sum(batch["input_ids"].shape[0] for batch in batches)
    report.update(full=full, configured=configured, samples=rows, method=method)
    return report


def format_report(report: dict[str, Any], skip: list[str] | None = None, *, show_layers: int = 10) -> Iterator[str]:
    """The lines `speckd-trl check-teacher` prints (the `show_layers` most sensitive decoder layers)."""
    price: TeacherPrice = report["price"]
    kept = f", keeping {', '.join(skip)} in full precision" if skip else ""
    yield (
        f"the teacher as configured ({report['method']}{kept}) against its full-precision self, at "
        f"{price.positions} completion tokens of {report['samples']} dataset rows:"
    )
    yield f"  KL(full || configured) per token  {price.kl_per_token:.4f} nats"
    yield f"  top-1 agreement                   {100 * price.top1_agreement:.1f}%"
    for loaded in (report["full"], report["configured"]):
        yield (
            f"  {loaded.label:<33} weights {loaded.weights_mib:8.1f} MiB, peak (load + one batch) "
            f"{loaded.peak_mib:8.1f} MiB"
        )
    if "sensitivity" in report:
        scores = report["sensitivity"]
        yield "decoder layers by the KL of rounding that layer alone to 4 bits (largest first):"
        for name, kl in scores[:show_layers]:
            yield f"  {name:<24} {kl:.4f}"
        if len(scores) > show_layers:
            yield f"  ... {len(scores) - show_layers} more, each at most {scores[show_layers][1]:.4f}"
        top = [name for name, _ in scores[:4]]
        yield f"keep the most sensitive in full precision, e.g. --teacher_quantization_skip_modules {' '.join(top)}"
    yield f"verdict: {price.verdict}"
