"""Teacher loading (optionally 4-bit with bitsandbytes), the student/teacher/tokenizer compatibility checks, and the
output layer the chunked loss reads (`OutputHead`, read from a model by `output_head`, checked by
`check_output_head`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .config import SpecKDConfig


try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed: nothing is ever sharded
    FSDPModule = DTensor = ()


EAGER_REMEDY = "use loss_path='eager'"  # what to do when the chunked loss cannot read a model's output layer
ZERO3_TRAINABLE_HEAD = (
    "loss_path='chunked' reads the {role}'s output layer directly, and under DeepSpeed ZeRO-3 a trainable output "
    "layer's gradient would not reach ZeRO-3's partitioned gradient. Freeze lm_head (train the student with LoRA, "
    "peft_config=LoraConfig(...), whose lm_head stays frozen) or use loss_path='eager'."
)


def is_quantized(model: Any) -> bool:
    """Whether a loaded model holds quantized (bitsandbytes, GPTQ, AWQ, ...) weights."""
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "hf_quantizer", None) is not None
        or getattr(model, "is_quantized", False)
    )


def teacher_quantization_config(args: SpecKDConfig) -> Any:
    """The `quantization_config` a teacher given by name is loaded with, or None for full precision.

    `args.teacher_quantization` (resolved by `SpecKDConfig.teacher_quantization_method`): ``"int8"`` is bitsandbytes'
    LLM.int8(), ``"nf4"`` / ``"fp4"`` bitsandbytes 4-bit with the `teacher_bnb_4bit_*` settings, a transformers
    `QuantizationConfig` object is returned as it is. `args.teacher_quantization_skip_modules` become bitsandbytes'
    `llm_int8_skip_modules`, with the output layer added: transformers keeps it unquantized only while that list is
    unset, and the chunked loss reads it as a plain linear layer.
    """
    method = args.teacher_quantization_method
    if not isinstance(args.teacher_quantization, str):
        return args.teacher_quantization
    if method == "none":
        return None
    skip = args.teacher_quantization_skip_modules
    skip = None if skip is None else sorted({"lm_head", *skip})
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method,
        bnb_4bit_compute_dtype=_compute_dtype(args),
        bnb_4bit_use_double_quant=args.teacher_bnb_4bit_use_double_quant,
        llm_int8_skip_modules=skip,
    )


class _OnceFilter(logging.Filter):
    """Let a log message that starts with `prefix` through once per process, drop its repeats."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def quiet_int8_casts() -> None:
    """bitsandbytes' LLM.int8() logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" at every
    matmul of a float32-compute teacher (thousands of lines per training run: the cast is how int8 matmuls work):
    keep its first line, drop the repeats. Idempotent."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in logger.filters):
        logger.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


def teacher_init_kwargs(args: SpecKDConfig) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for the teacher, from `args.teacher_model_init_kwargs`.

    Unlike `GKDTrainer`, a missing ``"dtype"`` key is fine (it defaults to ``"auto"``), and a quantized teacher
    (`args.teacher_quantization`, `args.teacher_load_in_4bit`) gets its `quantization_config` and a device map.
    """
    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype", "auto")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(
                f"teacher_model_init_kwargs['dtype']={dtype!r} is not a torch dtype; use e.g. 'float32', 'bfloat16' "
                "or 'auto'."
            )
        dtype = getattr(torch, dtype)
    kwargs["dtype"] = dtype
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    quantization = teacher_quantization_config(args)
    if quantization is not None:
        if "quantization_config" in kwargs:
            raise ValueError(
                f"teacher_model_init_kwargs has a quantization_config and teacher_quantization="
                f"{args.teacher_quantization_method!r} asks for another: keep one of the two."
            )
        kwargs["quantization_config"] = quantization
        # quantized weights cannot be moved after loading: place them on this process's training device now
        kwargs.setdefault("device_map", {"": args.device})
    return kwargs


def _compute_dtype(args: SpecKDConfig) -> torch.dtype:
    if args.teacher_bnb_4bit_compute_dtype != "auto":
        return getattr(torch, args.teacher_bnb_4bit_compute_dtype)
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


def load_teacher(name_or_path: str, args: SpecKDConfig) -> PreTrainedModel:
    """Load the teacher from a hub id or a local directory, quantized as `args.teacher_quantization` says.

    Raises:
        ValueError: when `name_or_path` cannot be loaded, with the path and the reason.
    """
    if args.teacher_quantization_method == "int8":
        quiet_int8_casts()
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **teacher_init_kwargs(args))
    except (OSError, ValueError) as err:
        raise ValueError(f"Could not load the teacher model from {name_or_path!r}: {err}") from err


def load_teacher_tokenizer(teacher: str | nn.Module, args: Any) -> Any:
    """The tokenizer saved with the teacher, to compare with the student's id by id (`check_vocab`).

    `teacher` is a name or path, or a loaded model, whose tokenizer is read from where it was loaded from (its
    `name_or_path`). None when there is none to read: a model built from a config (no `name_or_path`), or a directory
    without tokenizer files; then only the vocabulary sizes can be checked.
    """
    name_or_path = teacher if isinstance(teacher, str) else getattr(teacher, "name_or_path", None)
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path) and not any(
        os.path.isfile(os.path.join(name_or_path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None  # transformers would build an empty tokenizer from the model's config
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def prepare_teacher_for_fsdp(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """Under FSDP, the teacher sharded across the processes as the student is; otherwise `teacher` unchanged.

    TRL 1.16's `GKDTrainer` and `DistillationTrainer` prepare the teacher with
    `accelerator.prepare_model(teacher, evaluation_mode=True)`, which under FSDP neither wraps nor moves it (accelerate
    1.15 turns device placement off for FSDP, and wraps for FSDP only outside evaluation mode): every process keeps a
    whole teacher where it was loaded, the CPU for a teacher loaded by name while the student's shards are on the GPU,
    hence TRL issue #2580 ("Expected all tensors to be on the same device"). Here the teacher goes through accelerate's
    own FSDP2 preparation (`fsdp2_prepare_model`: one unit per decoder layer, moved to this process's device, weights
    broadcast from the first process with `fsdp_cpu_ram_efficient_loading`), with frozen parameters so that nothing is
    upcast for an optimizer; FSDP1 through TRL's `prepare_fsdp` (as TRL's reference models; not tested here). A
    quantized (4-bit) teacher is left as loaded (placed on each process's device, not sharded).
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or isinstance(teacher, FSDPModule) or is_quantized(teacher):
        return teacher
    teacher.requires_grad_(False)
    if plugin.fsdp_version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        # `fsdp2_prepare_model` resolves the plugin's wrap policy on the model it is given: keep it unresolved for the
        # student, which accelerate prepares later and may have other layer classes
        policy, names = plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap
        try:
            teacher = fsdp2_prepare_model(accelerator, teacher)
        finally:
            plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = policy, names
    else:
        from trl.models.utils import prepare_fsdp

        teacher = prepare_fsdp(teacher, accelerator)
    return teacher.eval()


def output_vocab_size(model: nn.Module) -> int:
    """Number of logits the model produces per position (the rows of its output embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    # a [V, H] matrix (under ZeRO-3 its full shape is `ds_shape`, the local one is empty); bitsandbytes' packed
    # 4-bit weights are [n, 1] and say nothing about V: use the config then
    shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", ())
    if len(shape) == 2 and shape[1] > 1:
        return int(shape[0])
    return int(model.config.get_text_config().vocab_size)


def unsharded_class(module: nn.Module) -> type:
    """The module's own class: FSDP2's `fully_shard` swaps a module's class for a subclass ``FSDP<Class>`` of
    `FSDPModule` and the original; this is the original."""
    cls = type(module)
    if isinstance(module, FSDPModule):
        cls = next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls


def full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """`tensor` whole: a sharded FSDP2 parameter (a `DTensor`) is all-gathered (`full_tensor`, as TRL's
    `DistillationTrainer` gathers its output layers), anything else is returned as it is."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def zero3_partitioned(param: torch.Tensor | None) -> bool:
    """Whether `param` is a DeepSpeed ZeRO-3 parameter that is partitioned now (its local data empty)."""
    if param is None or not hasattr(param, "ds_status"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status != ZeroParamStatus.AVAILABLE


def logit_scale(config: Any) -> float:
    """The multiplier of a model's logits before any softcap, by TRL 1.16's rules
    (`DistillationTrainer._compute_loss`): `logit_scale` (Cohere), else `output_multiplier`, else
    `lm_head_multiplier` (Falcon-H1), else `1 / logits_scaling` (Granite, MiniCPM3; HyperCLOVA X multiplies), else 1.
    A `None` reads as unscaled; a real 0.0 is kept."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    logits_scaling = getattr(config, "logits_scaling", None)
    if logits_scaling is not None:
        return float(logits_scaling) if config.model_type == "hyperclovax" else 1 / logits_scaling
    return 1.0


@dataclass
class OutputHead:
    """A model's output layer, read directly by the chunked loss: ``logits = softcap(scale * (h @ W.T + b))``.

    Args:
        weight (`torch.Tensor` of shape `[V, H]`): the output layer's weight (``lm_head.weight``).
        bias (`torch.Tensor` of shape `[V]`, *optional*): its bias.
        logit_scale (`float`): multiplier of the logits (Cohere-style ``logit_scale``), 1 for most models.
        softcap (`float`, *optional*): ``final_logit_softcapping`` (Gemma-style ``softcap * tanh(z / softcap)``).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ W.T + b`` in float32 (no scale or softcap), shape `[n, V]`."""
        if hidden.dtype == torch.float32 and self.weight.dtype == torch.float32:
            logits = hidden @ self.weight.t()
        else:  # half-precision matmul, float32 result: the weight is never copied to float32
            logits = (hidden.to(self.weight.dtype) @ self.weight.t()).float()
        return logits if self.bias is None else logits + self.bias.float()

    @property
    def transforms(self) -> bool:
        """Whether `transform` changes the logits (a logit scale other than 1, or a softcap)."""
        return self.logit_scale != 1.0 or self.softcap is not None

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The logit scale and softcap, applied to projected logits (differentiable)."""
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def output_head(
    model: nn.Module,
    role: str = "model",
    *,
    gathered: bool = True,
    dtype: torch.dtype | None = None,
    remedy: str = EAGER_REMEDY,
) -> OutputHead:
    """The model's output layer as an `OutputHead`: its weight and bias, and the logit scale (`logit_scale`, TRL's
    rules) and `final_logit_softcapping` of its text config. The one reader of output layers for every path that
    projects hidden states itself (the trainers' chunked losses, the gate's verdicts, the reward term's
    log-probabilities); `check_output_head` compares what it computes with the model's own logits once per run.

    Two ways to read a sharded layer:

    - `gathered=True` (`SpecKDTrainer`, which reads the layer after the model's own forward): under FSDP2 the layer is
      an `FSDPLinear` that the forward has gathered (accelerate 1.15 keeps `lm_head` gathered from the forward to the
      end of the backward) and whose gradient goes through FSDP2's own reduction. A weight that is still sharded (a
      `DTensor`) is gathered whole (`full_tensor`) when no gradient is taken (the teacher); a trainable one is refused:
      the gradient of `full_tensor` reaches this process's shard without FSDP2's reduction, so the processes' heads
      would drift apart (measured on 2 CPU processes: the loss 12% off a single process's after 4 steps). Under
      DeepSpeed ZeRO-3 the weight is partitioned outside its own forward (an empty local tensor): a frozen one (the
      teacher's, a LoRA student's) is gathered whole (TRL's `maybe_gather_lm_head_ctx`, collective) into a detached
      copy; a trainable one is refused (`validation.check_zero3_chunked` says so at the trainer's start).
    - `gathered=False` (`SpecKDDistillationTrainer`, which runs the backbones only, as TRL's `DistillationTrainer`):
      a sharded FSDP2 weight is gathered with a differentiable `full_tensor()` and cast to `dtype`, and a ZeRO-3
      weight is returned partitioned, for the caller to use inside `maybe_gather_lm_head_ctx`, both as TRL does.

    Raises:
        ValueError: when the output layer is not a plain `nn.Linear` (LoRA or `modules_to_save` on `lm_head`, a
            quantized head, a custom module), whose logits the weight alone would not reproduce.
        RuntimeError: with `gathered=True`, when a trainable output layer is still sharded (FSDP2, read before the
            forward; ZeRO-3).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # subclasses (bitsandbytes, PEFT wrappers) compute something else; FSDP2's FSDPLinear is a plain nn.Linear
    if head is None or unsharded_class(head) is not nn.Linear:
        raise ValueError(
            f"The chunked loss reads the {role}'s output layer directly, but it is a {type(head).__name__}, not a "
            "plain nn.Linear (e.g. LoRA or modules_to_save on lm_head, or a quantized head), whose logits its weight "
            f"alone would not reproduce. Keep lm_head out of the adapter's target modules and out of quantization, or "
            f"{remedy}."
        )
    weight, bias = head.weight, head.bias
    if not gathered:
        if isinstance(weight, DTensor):
            weight, bias = weight.full_tensor().to(dtype or weight.dtype), full_tensor(bias)
    else:
        if isinstance(weight, DTensor) and weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"The {role}'s output layer is still sharded by FSDP2 (a DTensor) where the chunked loss reads it: its "
                f"gradient would bypass FSDP2's reduction across processes. Read it after the model's forward, which "
                f"gathers it, or {remedy}."
            )
        if zero3_partitioned(weight):
            if weight.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(ZERO3_TRAINABLE_HEAD.format(role=role))
            with maybe_gather_lm_head_ctx(weight, bias):  # the copies outlive the gather
                weight, bias = (None if p is None else p.detach().clone() for p in (weight, bias))
        weight, bias = full_tensor(weight), full_tensor(bias)
    config = model.config.get_text_config()
    return OutputHead(
        weight=weight,
        bias=bias,
        logit_scale=logit_scale(config),
        softcap=getattr(config, "final_logit_softcapping", None),
    )


# Largest difference allowed between the logits an `OutputHead` computes and the model's own, relative to the largest
# of the model's logits: float32 logits agree to round-off (measured below 1e-6 on the tiny test models); half-precision
# models round their logits to 8 (bf16) or 11 (fp16) mantissa bits, about 0.4% at most
HEAD_CHECK_RTOL = {torch.float32: 1e-3, torch.float64: 1e-6}
HEAD_CHECK_RTOL_HALF = 3e-2


def check_output_head(
    model: nn.Module, role: str, head: OutputHead, hidden: torch.Tensor, logits: torch.Tensor, remedy: str
) -> None:
    """Stop when the logits `head` computes from the final hidden states differ from the model's own.

    The chunked paths never call the model's output layer: they project the final hidden states through the weight
    `output_head` reads and apply the logit scale and softcap of the model's config by TRL's rules. A model family
    whose forward does something else (a scale under a name no rule knows, a custom head) would train on a wrong
    loss without any error; this compares both at a few positions, once, before the first step trains on them.

    Args:
        model (`nn.Module`): the model (named in the error).
        role (`str`): ``"student"`` or ``"teacher"``.
        head (`OutputHead`): what `output_head` read from it.
        hidden (`torch.Tensor` of shape `[n, H]`): final hidden states from one of the model's forwards.
        logits (`torch.Tensor` of shape `[n, V]`): the logits the same forward returned at those positions.
        remedy (`str`): what the user can do instead (the error ends with it).

    Raises:
        ValueError: naming the model class, the largest difference and the remedy.
    """
    with torch.no_grad():
        computed = head.transform(head.project(hidden.detach())).float()
        expected = logits.detach().float()
        scale = expected.abs().max().clamp(min=1e-6)
        error = ((computed - expected).abs().max() / scale).item()
    rtol = HEAD_CHECK_RTOL.get(logits.dtype, HEAD_CHECK_RTOL_HALF)
    if not error <= rtol:  # NaN fails too
        name = type(getattr(model, "get_base_model", lambda: model)()).__name__
        raise ValueError(
            f"The {role} {name} computes its logits in a way the chunked loss does not reproduce: projecting its "
            f"final hidden states through its output layer (logit scale {head.logit_scale:g}, softcap "
            f"{head.softcap}) gives logits {error:.3g} (relative) away from the model's own forward, above the "
            f"{rtol:g} allowed. Training on them would give a wrong loss. {remedy[0].upper()}{remedy[1:]}, which "
            "reads the model's own logits."
        )


def decoder_of(model: nn.Module) -> nn.Module:
    """The backbone of a causal LM (`model.get_decoder()`), whose output is the final hidden state, after the norm.

    Raises:
        ValueError: when the model does not expose a separate backbone.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        raise ValueError(
            f"loss_path='chunked' needs the final hidden states of the {type(model).__name__}, but it does not expose "
            "its backbone through get_decoder(). Use loss_path='eager'."
        )
    return decoder


@contextmanager
def capture_last_hidden_state(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the backbone's output (the final hidden states `[B, T, H]`) under ``"hidden"`` while a forward pass runs.

    For a model that must be called through its wrappers (DDP, PEFT): call the wrapper inside the context, with
    ``logits_to_keep=1`` so that the model itself projects a single position.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured["hidden"] = output[0]

    handle = decoder_of(model).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
