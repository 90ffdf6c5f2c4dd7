"""Memory planner: will a teacher / student pair fit a GPU with given settings? No weights needed, only configs.

`estimate_memory(PlanConfig(...))` returns a `MemoryPlan`: the peak memory of a SpecKD training step broken down
into terms, `fits(budget)`, and `suggestions(budget)`: concrete changes of the settings, each re-estimated, that
would make it fit. `speckd-trl plan ...` prints the same from the shell (`format_plan`).

What is estimated: the peak of what PyTorch allocates (`torch.cuda.max_memory_allocated` on a GPU; on a CPU the
growth of the resident set), not the CUDA context (~0.5 GiB) nor the allocator's cached-but-free blocks. `fits`
therefore keeps a reserve (`DEFAULT_RESERVE_GIB`, 2 GiB) free.

The model, term by term (``b`` = bytes per element of the compute dtype: 4 float32, 2 bfloat16 / float16;
``P`` parameters; ``h`` hidden size, ``i`` intermediate size, ``q = heads * head_dim``, ``kv = kv_heads * head_dim``,
``L`` layers, ``V`` vocabulary, ``B`` batch, ``T`` tokens of a training sequence, ``N`` completion tokens):

- **Parameter counts** are exact: each config is instantiated on the `meta` device
  (``AutoModelForCausalLM.from_config``, no memory) and its parameters counted, split into the linear layers of the
  decoder (what bitsandbytes quantizes and LoRA adapts), the input embedding, the output layer (0 when tied) and the
  rest (norms).
- **Teacher weights**: ``P * b`` unquantized; 8-bit: 1 B per linear weight plus a float32 scale per output row;
  NF4 with double quantization (our default): 4 bits + an 8-bit absmax per 64-block + a float32 constant per 256
  absmax = 0.5159 B per linear parameter; the embeddings, output layer and norms stay in the compute dtype (this
  reproduces the 5.32 GiB measured on an H100 for the 8B-shaped NF4 teacher: 5.31 GiB); biases stay unquantized;
  FP4 the same; without double
  quantization (``teacher_double_quant=False``) a float32 absmax per 64-block: 0.5625 B. ``teacher_full_layers``
  decoder layers kept in full precision (`SpecKDConfig.teacher_quantization_skip_modules`, as `speckd-trl
  check-teacher --check_sensitivity` suggests) count ``b`` per linear parameter (every layer of a model has the same
  size). The bf16 copy of one weight that bitsandbytes dequantizes during the forward pass is not counted. GPTQ
  (``teacher_quant="gptq"``: 4 bits, groups of 64, as transformers' `GPTQConfig(bits=4, group_size=64)` packs it): 4
  bits + a float16 scale and a 4-bit zero per group = 0.5391 B per linear parameter, plus an int32 group index per
  input feature of every linear layer (the 163.3 MiB measured for the SmolLM2-135M teacher on CPU, to 0.1 MiB).
- **Student weights**: ``P * b`` (full and LoRA); QLoRA: as the NF4 teacher.
- **Trainable state**: full: gradients ``P * b`` and AdamW's two moments ``2 * P * b`` (`torch.optim.AdamW` keeps
  them in the parameter's dtype; 8 B per parameter in float32); LoRA / QLoRA: rank ``r`` on every linear layer of
  the decoder (PEFT's ``all-linear``: ``r * (in + out)`` each), adapters in float32 (PEFT upcasts them): 4 B weight
  + 4 B gradient + 8 B AdamW states per LoRA parameter. ``adamw_8bit`` (bitsandbytes): 2 B of states per trainable
  parameter; ``sgd`` (no momentum): none.
- **Activations** kept for the backward pass, per token per decoder layer: ``A_layer = c_act * b * (10 h + 3 kv +
  4 i)`` (counted from Llama/Qwen2's forward: norms, q/k/v, RoPE'd q/k, attention output, residuals, the MLP's gate,
  up, activation and product); with gradient checkpointing only each layer's input ``b * h`` is kept, plus one
  layer's ``A_layer`` while it is recomputed. Plus ``3 h b`` per token outside the layers (embedding output, final
  norm). The teacher's forward runs without gradient, while the student's activations are alive: one layer's
  intermediates at a time, ``(2 i_t + 4 h_t) b`` per token, counted in the activations term.
- **Logits of both models**. Eager loss path: both models' ``[B, T, V]`` logits in the compute dtype (``2 b``)
  plus ``k_eager`` float32 ``[B, T, V]`` temporaries of the gate, the generalized JSD (log-softmaxes, the mixture,
  the KL terms) and its backward. Chunked loss path: ``m_chunk`` float32 ``[chunk, V]`` tiles (``chunk =
  min(loss_chunk_size, N)``) plus, per completion token, the gathered hidden states of both models and the float32
  gradient of the student's (``(h_s + h_t) b + 4 h_s``), plus a float32 ``[V, h_s]`` gradient of the student's
  output layer when it is trained (full fine-tuning), computed in the forward pass before the parameter's own
  gradient (counted with the gradients) exists.
- **Generation KV cache** (on-policy steps, ``lmbda > 0``): ``2 * L * kv * (prompt + max_new_tokens) * B * b`` for
  the student (and the teacher too with SKD-style speculative generation), plus the prefill's transient of one
  layer. Generation happens before the training forward pass and its cache is freed before it, so the KV cache and
  the activations / logits are never alive at once.

- **Teacher cache** (``teacher_cache_top_k = K > 0``, `SpecKDConfig.teacher_cache`): dataset batches read the
  teacher's top-K log-probabilities from disk instead of running it: the off-policy step has no teacher forward
  pass and no teacher hidden states; per completion token it holds the cached rows (``12 K + 4`` B: int64 ids,
  float32 values, the tail); the eager path's teacher logits become the float32 sparse view (``4`` B instead of
  ``b`` per ``[B, T, V]`` element) and its log-probabilities the tail-bucket target (one of the ``k_eager``
  temporaries); the chunked path's tiles are as many. With ``lmbda = 0`` no teacher is loaded: teacher weights 0.

Peak = teacher weights + student weights + trainable state (weights, moments) + the largest phase: the training
step of an off-policy batch (``T = seq_len``, ``N = seq_len - prompt_len`` per row), that of an on-policy batch
(``T = prompt_len + max_new_tokens``, ``N = max_new_tokens``), or on-policy generation. Gradients are counted in the
training phase (conservative: some are produced only after activations are freed). Packed dataset batches
(`SpecKDConfig.packing`) need no setting here: the off-policy step is planned for rows of ``seq_len`` tokens, the worst
micro-batch, which packs to the same rows (packing never computes more positions than padding).

**Several processes** (``num_processes`` GPUs, one process each; the plan is per process, i.e. per GPU). ``engine``:

- ``"ddp"``: every process holds everything (both models, gradients, optimizer states), plus DDP's gradient
  buckets: a flat copy of the trainable gradients (``gradient_as_bucket_view`` is off in accelerate's defaults).
- ``"fsdp2"``: the student's parameters (the frozen LoRA / QLoRA base too), gradients and optimizer states, and the
  unquantized teacher's parameters (`models.prepare_teacher_for_fsdp` shards it like the student; a quantized teacher
  is left whole on every process) are split ``num_processes`` ways. On top ("all-gathered units", ``(1 - 1/n)`` of
  each unit gathered): accelerate's FSDP2 wraps each decoder layer and the model itself; the root units (embedding,
  output layer, norms) of both models stay gathered after their forward (FSDP2 does not reshard the root), two
  decoder layers are gathered at once (the running one and the prefetched next), and with full fine-tuning the root's
  whole gradient exists before its reduce-scatter.
- ``"zero3"``: modelled as FSDP2 (DeepSpeed ZeRO-3 partitions parameters, gradients and optimizer states; TRL's
  ``prepare_deepspeed`` partitions the teacher); an estimate, its memory not measured (the trainers are tested under
  ZeRO-3 in ``tests/test_zero3.py``; ``benchmarks/plan_check.py --sharded`` measures DDP and FSDP2). A quantized
  teacher is refused under ZeRO-3, as the trainers refuse it (``validation.check_zero3_quantized_teacher``).

Activations, logits and the KV cache are per process (each process runs its own ``batch_size`` rows): unchanged.
``teacher_offload``: the teacher's weights stay in host memory and are streamed to the GPU for each forward pass
(its root unit and two decoder layers on the GPU at a time, "teacher streamed from host"); the plan's notes say the
host memory and the host-to-device traffic it costs (the whole teacher per forward pass). Not measured.

Measured (``python benchmarks/plan_check.py --sharded``, CPU processes over gloo, FSDP2 through accelerate's own
FSDP2 path as `tests/fsdp_worker.py` does it): 57M-parameter teacher, 38M student, full fine-tuning and LoRA, 1, 2
DDP and 2 FSDP2 processes: estimate / measured per process 0.82-1.07 (docs/one-gpu.md, "Will it fit?"). Nothing was fitted for
the sharded terms: the DDP bucket term came from PyTorch's documentation and the measurement confirmed it (2 DDP
processes held 146 MiB more each than one process; the gradients are 147 MiB).

**Calibration.** ``c_act = 0.7``, ``k_eager = 13`` (float32) and ``m_chunk = 6`` were measured, not guessed:
`benchmarks/plan_check.py` runs SpecKD optimizer steps of small Qwen2 models (tens of millions of parameters,
vocabulary 32000, float32) on a CPU in a fresh process each and measures the peak resident memory above the level
after the imports (with glibc mapping every allocation above 1 MiB separately, so that freed tensors leave the
resident set). ``m_chunk`` is the slope of the measured peak over ``loss_chunk_size`` (64, 128, 256 and 512:
0.764 / 0.758 MiB per chunk row in ``full-chunked-off`` / ``lora-chunked-off``, 6.3 / 6.2 float32 rows of the
vocabulary; refitted 2026-12-07 from 10 after the chunked loss stopped keeping up to seven ``[n, V]`` buffers at its
peak, 2026-11-29 from 15 after it moved to a closed-form divergence and gradient; before that it came from the
difference between 64 and 256), ``c_act`` from the
growth with the batch (1, 2, 4 rows of 512 tokens), ``k_eager`` from the eager steps' remainder once weights,
optimizer states and activations are taken out: about 15 float32 ``[rows, V]`` tensors on both paths, the two
models' logits included (17 before the gate shared the divergence's log-probabilities and the temperature-1
division was dropped, which removed two; the same change took ``m_chunk`` from 17 to 15). ``k_eager = 16`` for
bfloat16 / float16 was fitted to the earlier H100 measurements of `benchmarks/one_gpu_memory.py` (8B NF4 teacher,
1B LoRA student, dataset steps at batch 2 and 4 x 512; bf16 logits, most temporaries float32 under autocast), before
the divergence cast half-precision logits to float32 and before that change; it has not been measured since (no
GPU), nor have the chunked path and ``c_act`` been checked on a GPU. The
docs/one-gpu.md has the measured tables (CPU: estimate / measured 0.86-1.09 over 13 configurations).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


GIB = 2**30
DEFAULT_RESERVE_GIB = 2.0  # CUDA context, allocator fragmentation: kept free by `fits`
TEACHER_QUANTS = (
    "none",
    "8bit",
    "int8",
    "nf4",
    "fp4",
    "gptq",
)  # "int8" is "8bit": SpecKDConfig.teacher_quantization's
STUDENT_MODES = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
LOSS_PATHS = ("eager", "chunked")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ENGINES = ("ddp", "fsdp2", "zero3")

NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 per 256 absmax
NF4_SINGLE_BYTES_PER_PARAM = 0.5 + 4 / 64  # 4-bit codes, float32 absmax per 64 (no double quantization)
INT8_BYTES_PER_PARAM = 1.0
GPTQ_BYTES_PER_PARAM = 0.5 + (2 + 0.5) / 64  # 4-bit codes; per group of 64 a float16 scale and a 4-bit zero point

# Calibrated constants (see the module docstring).
C_ACT = 0.7  # multiplier of the counted per-layer activations (CPU, Qwen2, sdpa)
K_EAGER = {4: 13.0, 2: 16.0}  # float32 [B, T, V] temporaries of the eager loss, by compute-dtype bytes
M_CHUNK = 6.0  # float32 [chunk, V] tiles alive at once in the chunked loss (both logits + temporaries)


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a causal LM that the planner needs, with exact parameter counts."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_parameters: int  # unique parameters (a tied output layer counted once)
    linear_parameters: int  # weights and biases of the decoder layers' nn.Linear modules
    embedding_parameters: int
    output_parameters: int  # 0 when tied to the embedding
    lora_parameters_per_rank: int  # sum of (in + out) over the decoder's linear layers
    linear_biases: int = 0  # the biases among `linear_parameters` (bitsandbytes keeps them unquantized)
    linear_rows: int = 0  # sum of out_features over the decoder's linear layers (LLM.int8() keeps a scale per row)

    @property
    def other_parameters(self) -> int:
        return self.num_parameters - self.linear_parameters - self.embedding_parameters - self.output_parameters


def load_model_config(source: Any):
    """A `transformers.PretrainedConfig` from a config object, a dict, a `config.json` path or a model directory."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{source}: no config.json in this directory.")
            return AutoConfig.from_pretrained(str(path))
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file or directory (give a model directory or a config.json).")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not a JSON config ({err}).") from err
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" and the like
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{source if not isinstance(source, dict) else 'config'}: no 'model_type' key.")
    data.pop("architectures", None)
    return AutoConfig.for_model(model_type, **data)


def model_shape(source: Any, name: str | None = None) -> ModelShape:
    """`ModelShape` of a config (see `load_model_config`), parameters counted on the `meta` device."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    config = load_model_config(source)
    if name is None and isinstance(source, (str, Path)):
        path = Path(source)
        name = path.name if path.is_dir() else path.stem if path.name != "config.json" else path.parent.name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    output_parameters = 0 if output is None or tied else sum(p.numel() for p in output.parameters())
    linear = lora_per_rank = biases = rows = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not output:
            linear += sum(p.numel() for p in module.parameters())
            lora_per_rank += module.in_features + module.out_features
            biases += 0 if module.bias is None else module.bias.numel()
            rows += module.out_features
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        name=name or getattr(config, "_name_or_path", "") or config.model_type,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=text.intermediate_size,
        vocab_size=text.vocab_size,
        tie_word_embeddings=tied,
        num_parameters=sum(p.numel() for p in model.parameters()),
        linear_parameters=linear,
        embedding_parameters=embedding.numel(),
        output_parameters=output_parameters,
        lora_parameters_per_rank=lora_per_rank,
        linear_biases=biases,
        linear_rows=rows,
    )


@dataclass
class PlanConfig:
    """The settings of a SpecKD run that decide its peak memory.

    `teacher` / `student`: a model directory, a `config.json` path, a dict or a `PretrainedConfig` (or an already
    computed `ModelShape`). `seq_len` is the length of a dataset sequence (prompt + completion), `prompt_len` its
    prompt part (default `seq_len // 4`); on-policy sequences are `prompt_len + max_new_tokens` long. `lmbda` as in
    GKD: 0 plans dataset batches only, 1 on-policy batches only, anything between the larger of the two.
    `speculative_generation`: on-policy sequences come from SKD-style gated generation (the teacher keeps a KV cache
    too). `dtype`: the compute dtype of both models' unquantized weights.
    """

    teacher: Any
    student: Any
    teacher_quant: str = "none"
    teacher_double_quant: bool = True
    teacher_full_layers: int = 0
    student_mode: str = "lora"
    lora_r: int = 16
    batch_size: int = 2
    seq_len: int = 512
    prompt_len: int | None = None
    max_new_tokens: int = 128
    lmbda: float = 0.5
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    loss_path: str = "chunked"
    loss_chunk_size: int = 256
    dtype: str = "bfloat16"
    speculative_generation: bool = False
    num_processes: int = 1
    engine: str = "ddp"
    teacher_offload: bool = False
    teacher_cache_top_k: int = 0

    def __post_init__(self):
        for name, allowed in (
            ("engine", ENGINES),
            ("teacher_quant", TEACHER_QUANTS),
            ("student_mode", STUDENT_MODES),
            ("optimizer", OPTIMIZERS),
            ("loss_path", LOSS_PATHS),
            ("dtype", tuple(DTYPE_BYTES)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"PlanConfig: {name}={getattr(self, name)!r} is not valid; use one of {allowed}.")
        if self.teacher_quant == "int8":
            self.teacher_quant = "8bit"
        if not isinstance(self.teacher_full_layers, int) or self.teacher_full_layers < 0:
            raise ValueError(f"PlanConfig: teacher_full_layers={self.teacher_full_layers!r} must be an integer >= 0.")
        if self.teacher_full_layers and self.teacher_quant == "none":
            raise ValueError(
                f"PlanConfig: teacher_full_layers={self.teacher_full_layers} keeps layers of a quantized teacher in full "
                "precision, but teacher_quant='none'."
            )
        if self.teacher_cache_top_k < 0:
            raise ValueError(f"PlanConfig: teacher_cache_top_k={self.teacher_cache_top_k} must be >= 0 (0: no cache).")
        if self.engine == "zero3" and self.teacher_quant != "none":
            raise ValueError(
                f"PlanConfig: teacher_quant={self.teacher_quant!r} with engine='zero3': the trainers refuse a quantized "
                "teacher under DeepSpeed ZeRO-3 (it does not survive ZeRO-3's partitioning); plan engine 'fsdp2' or "
                "'ddp' (ZeRO-2 keeps the teacher whole, as DDP), or teacher_quant='none'."
            )
        for name in ("lora_r", "batch_size", "seq_len", "max_new_tokens", "loss_chunk_size", "num_processes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PlanConfig: {name}={value!r} must be an integer >= 1.")
        if self.prompt_len is not None and not 0 < self.prompt_len < self.seq_len:
            raise ValueError(f"PlanConfig: prompt_len={self.prompt_len!r} must be in [1, seq_len).")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"PlanConfig: lmbda={self.lmbda!r} must be in [0, 1].")

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_len if self.prompt_len is not None else max(1, self.seq_len // 4)

    @property
    def shards(self) -> int:
        """Processes that parameters, gradients and optimizer states are split over: `num_processes` under FSDP2 /
        ZeRO-3, 1 under DDP (every process holds everything)."""
        return self.num_processes if self.engine in ("fsdp2", "zero3") else 1

    @property
    def is_default_layout(self) -> bool:
        """One process, no teacher offload: the single-GPU plan (printed as before the sharding options)."""
        return self.num_processes == 1 and self.engine == "ddp" and not self.teacher_offload


@dataclass
class MemoryPlan:
    """The estimated peak memory of a SpecKD training step, in bytes, term by term.

    `terms` maps a term's name to its bytes at the peak; `phase` names the phase that peaks (`"off-policy step"`,
    `"on-policy step"` or `"generation"`); `phases` gives every phase's total; `kv_cache` is the generation KV cache
    (reported even when another phase peaks).
    """

    config: PlanConfig
    teacher: ModelShape
    student: ModelShape
    terms: dict[str, float]
    phase: str
    phases: dict[str, float]
    kv_cache: float
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def fits(self, budget_gib: float = 24.0, reserve_gib: float = DEFAULT_RESERVE_GIB) -> bool:
        """Whether the peak leaves `reserve_gib` free on a card of `budget_gib`."""
        return self.total <= (budget_gib - reserve_gib) * GIB

    def suggestions(self, budget_gib: float = 24.0, reserve_gib: float = DEFAULT_RESERVE_GIB) -> list[Suggestion]:
        """Changes of the settings that make the plan fit, each re-estimated; empty when it already fits.

        First every single change that fits on its own (smallest peak first); if none does, the changes applied
        one after another, most saving first, until the plan fits (one cumulative suggestion).
        """
        if self.fits(budget_gib, reserve_gib):
            return []
        candidates = [(text, replace(self.config, **change)) for text, change in _changes(self.config)]
        estimated = [
            Suggestion(text, cfg, estimate_memory(cfg, teacher=self.teacher, student=self.student))
            for text, cfg in candidates
        ]
        fitting = sorted((s for s in estimated if s.plan.fits(budget_gib, reserve_gib)), key=lambda s: s.plan.total)
        if fitting:
            return fitting
        cfg, texts, plan = self.config, [], self
        for _ in range(8):
            options = [(text, replace(cfg, **change)) for text, change in _changes(cfg, self.config.batch_size)]
            if not options:
                break
            trials = [(text, c, estimate_memory(c, teacher=self.teacher, student=self.student)) for text, c in options]
            text, cfg, new_plan = min(trials, key=lambda t: t[2].total)
            if new_plan.total >= plan.total:
                break
            texts = [t for t in texts if t.split()[0] != text.split()[0]]  # a later --flag value replaces an earlier
            texts.append(text)
            plan = new_plan
            if plan.fits(budget_gib, reserve_gib):
                return [Suggestion(" + ".join(texts), cfg, plan)]
        return [Suggestion(" + ".join(texts) + " (still does not fit)", cfg, plan)] if texts else []


@dataclass
class Suggestion:
    """A change of the settings (`text`, e.g. ``--loss-path chunked``), the changed config and its plan."""

    text: str
    config: PlanConfig
    plan: MemoryPlan


def _changes(cfg: PlanConfig, base_batch: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Single changes that lower the peak memory, as (CLI text, PlanConfig fields); `base_batch` is the batch size the
    gradient accumulation in the text makes up for (default: `cfg.batch_size`)."""
    base_batch = base_batch or cfg.batch_size
    changes: list[tuple[str, dict[str, Any]]] = []
    if cfg.loss_path == "eager":
        changes.append(("--loss-path chunked", {"loss_path": "chunked"}))
    if not cfg.gradient_checkpointing:
        changes.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if cfg.teacher_quant not in ("nf4", "fp4", "gptq"):
        changes.append(("--teacher-quant nf4", {"teacher_quant": "nf4", "teacher_full_layers": 0}))
    if cfg.student_mode == "full":
        changes.append(("--student-mode lora", {"student_mode": "lora"}))
        if cfg.optimizer == "adamw":
            changes.append(("--optimizer adamw_8bit", {"optimizer": "adamw_8bit"}))
    elif cfg.student_mode == "lora":
        changes.append(("--student-mode qlora", {"student_mode": "qlora"}))
    if cfg.num_processes > 1 and cfg.engine == "ddp":
        changes.append(("--engine fsdp2", {"engine": "fsdp2"}))
    if cfg.batch_size > 1:
        half = cfg.batch_size // 2
        changes.append(
            (f"--batch-size {half} (x{base_batch // half} gradient_accumulation_steps)", {"batch_size": half})
        )
    return changes


def _weight_bytes(shape: ModelShape, quant: str, b: int, *, double_quant: bool = True, full_layers: int = 0) -> float:
    """Bytes of a model's weights: decoder linear layers quantized as `quant` (but `full_layers` of them), everything
    else in the dtype."""
    if quant == "none":
        return shape.num_parameters * b
    kept = min(full_layers, shape.num_layers) / shape.num_layers  # every decoder layer has the same size
    weights = shape.linear_parameters - shape.linear_biases
    quantized = weights * (1 - kept)
    rest = shape.num_parameters - quantized  # embeddings, norms, output layer, biases, kept layers
    if quant in ("nf4", "fp4"):
        return quantized * (NF4_BYTES_PER_PARAM if double_quant else NF4_SINGLE_BYTES_PER_PARAM) + rest * b
    if quant == "gptq":  # an int32 group index per input feature (sum of in_features: lora per rank - rows)
        columns = shape.lora_parameters_per_rank - shape.linear_rows
        return quantized * GPTQ_BYTES_PER_PARAM + columns * (1 - kept) * 4 + rest * b
    return quantized * INT8_BYTES_PER_PARAM + shape.linear_rows * (1 - kept) * 4 + rest * b  # float32 row scales


def _teacher_weight_bytes(cfg: PlanConfig, teacher: ModelShape, b: int) -> float:
    return _weight_bytes(teacher, cfg.teacher_quant, b, double_quant=cfg.teacher_double_quant,
                         full_layers=cfg.teacher_full_layers)  # fmt: skip


def layer_activation_bytes(shape: ModelShape, b: int) -> float:
    """Bytes one decoder layer keeps for the backward pass, per token (see the module docstring)."""
    h, kv, i = shape.hidden_size, shape.num_kv_heads * shape.head_dim, shape.intermediate_size
    return C_ACT * b * (10 * h + 3 * kv + 4 * i)


def _activations(shape: ModelShape, tokens: int, b: int, checkpointing: bool) -> float:
    outside = 3 * shape.hidden_size * b * tokens
    per_layer = layer_activation_bytes(shape, b) * tokens
    if checkpointing:
        return outside + shape.num_layers * shape.hidden_size * b * tokens + per_layer
    return outside + shape.num_layers * per_layer


def _teacher_transient(shape: ModelShape, tokens: int, b: int) -> float:
    """The teacher's no-grad forward pass: one layer's intermediates at a time, alive with the student's activations."""
    return (2 * shape.intermediate_size + 4 * shape.hidden_size) * b * tokens


def _logits(
    cfg: PlanConfig,
    teacher: ModelShape,
    student: ModelShape,
    rows: int,
    tokens: int,
    completion: int,
    cached: bool = False,
) -> float:
    b = DTYPE_BYTES[cfg.dtype]
    vocab = student.vocab_size
    cache_rows = rows * tokens * (12 * cfg.teacher_cache_top_k + 4) if cached else 0  # ids, values, tail
    if cfg.loss_path == "eager":
        teacher_logits = 4 if cached else b  # the cache's float32 sparse view stands where the teacher's logits were
        return rows * tokens * vocab * (b + teacher_logits + 4 * K_EAGER[b]) + cache_rows
    n = rows * completion
    chunk = min(cfg.loss_chunk_size, n)
    teacher_hidden = 0 if cached else teacher.hidden_size * b
    total = M_CHUNK * chunk * vocab * 4 + n * (student.hidden_size * b + teacher_hidden + 4 * student.hidden_size)
    total += cache_rows
    if cfg.student_mode == "full":  # the output layer's float32 gradient, made in the forward pass (see losses.py)
        total += 4 * vocab * student.hidden_size
    return total


LAYOUT_TERMS = ("all-gathered units", "DDP gradient buckets", "teacher streamed from host")


def unsharded_unit_bytes(shape: ModelShape, b: int, shards: int) -> tuple[float, float]:
    """FSDP2's extra bytes, beyond a process's shards, of (the root unit, one decoder layer) when gathered whole.

    accelerate's FSDP2 wraps every decoder layer as a unit and the model itself as the root unit (embedding, output
    layer, final norm): ``(1 - 1 / shards) * params * b`` each."""
    root = shape.num_parameters - shape.linear_parameters
    layer = shape.linear_parameters / shape.num_layers
    keep = 1.0 - 1.0 / shards
    return keep * root * b, keep * layer * b


def _apply_layout(
    cfg: PlanConfig,
    terms: dict[str, float],
    phases: dict[str, dict[str, float]],
    teacher: ModelShape,
    student: ModelShape,
    b: int,
    trainable_bytes: float,
    teacher_sharded: bool,
    notes: list[str],
) -> None:
    """Per-process terms of a multi-process layout (in place): sharding under FSDP2 / ZeRO-3, DDP's gradient buckets,
    the teacher's offload. See the module docstring, "Several processes"."""
    n = cfg.shards
    if n > 1:
        for name in ("student weights", "LoRA weights", "optimizer states"):
            terms[name] /= n
        if teacher_sharded:
            terms["teacher weights"] /= n
        for values in phases.values():
            if "gradients" in values:
                values["gradients"] /= n
        root_s, layer_s = unsharded_unit_bytes(student, b, n)
        sharded_on_device = teacher_sharded and not cfg.teacher_offload  # offloaded: counted as streamed below
        root_t, layer_t = unsharded_unit_bytes(teacher, b, n) if sharded_on_device else (0.0, 0.0)
        gathered = root_s + root_t + 2 * max(layer_s, layer_t)  # the root units stay gathered; a layer + prefetch
        if cfg.student_mode == "full":
            gathered += root_s  # the root's whole gradient (parameter dtype) before its reduce-scatter
        for values in phases.values():
            values["all-gathered units"] = gathered
        if cfg.engine == "zero3":
            notes.append("ZeRO-3: sharding modelled as FSDP2's (parameters, gradients, optimizer states split over the "
                         "processes); its memory not measured.")  # fmt: skip
        if not teacher_sharded:
            notes.append(f"The {cfg.teacher_quant} teacher is not sharded: every process holds all of it.")
    elif cfg.num_processes > 1 and trainable_bytes:  # DDP: a flat copy of every gradient in its buckets
        for values in phases.values():
            if "gradients" in values:
                values["DDP gradient buckets"] = trainable_bytes
    if cfg.teacher_offload:
        host = terms["teacher weights"]
        terms["teacher weights"] = 0.0
        streamed = _teacher_streamed_bytes(cfg, teacher, b)
        for values in phases.values():
            if "gradients" in values:  # the training steps run the teacher's forward pass
                values["teacher streamed from host"] = streamed
        whole = _teacher_weight_bytes(cfg, teacher, b)
        notes.append(f"Teacher offloaded: {host / GIB:.2f} GiB of its weights per process in host memory; every "
                     f"teacher forward pass copies all {whole / GIB:.2f} GiB of them to the GPU (about "
                     f"{whole / (25 * GIB):.2f} s at 25 GB/s PCIe, per step; more with speculative generation), "
                     "with its input/output layers and two decoder layers on the GPU at a time (not measured here).")  # fmt: skip


def _teacher_streamed_bytes(cfg: PlanConfig, teacher: ModelShape, b: int) -> float:
    """An offloaded teacher's weights on the GPU at once: its root unit (embedding, output layer, norms: held through
    the forward pass) and two decoder layers (the running one and the next, prefetched)."""
    root = (teacher.num_parameters - teacher.linear_parameters) * b
    layer = (_teacher_weight_bytes(cfg, teacher, b) - root) / teacher.num_layers
    return root + 2 * layer


def kv_cache_bytes(shape: ModelShape, rows: int, tokens: int, b: int) -> float:
    """``2 * L * kv_heads * head_dim * tokens * rows * b``: keys and values of every layer."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * tokens * rows * b


def estimate_memory(
    config: PlanConfig, *, teacher: ModelShape | None = None, student: ModelShape | None = None
) -> MemoryPlan:
    """The peak memory of a SpecKD training step with `config` (see the module docstring for every term)."""
    teacher = teacher or (config.teacher if isinstance(config.teacher, ModelShape) else model_shape(config.teacher))
    student = student or (config.student if isinstance(config.student, ModelShape) else model_shape(config.student))
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"The teacher's vocabulary ({teacher.vocab_size}) differs from the student's ({student.vocab_size}); "
            "SpecKD needs the same vocabulary."
        )
    b = DTYPE_BYTES[config.dtype]
    rows = config.batch_size
    notes: list[str] = []

    cached = config.teacher_cache_top_k > 0
    teacher_loaded = not (cached and config.lmbda == 0.0)  # the cache alone: no teacher in memory
    terms: dict[str, float] = {"teacher weights": _teacher_weight_bytes(config, teacher, b) if teacher_loaded else 0.0}
    if not teacher_loaded:
        notes.append(f"Teacher cache (K={config.teacher_cache_top_k}) and lmbda=0: no teacher is loaded.")
    student_quant = "nf4" if config.student_mode == "qlora" else "none"
    terms["student weights"] = _weight_bytes(student, student_quant, b)
    if config.student_mode == "full":
        trainable, param_bytes = student.num_parameters, b
        terms["LoRA weights"] = 0.0
    else:
        trainable, param_bytes = config.lora_r * student.lora_parameters_per_rank, 4
        terms["LoRA weights"] = trainable * 4.0
    state_bytes = {"adamw": 2 * param_bytes, "adamw_8bit": 2, "sgd": 0}[config.optimizer]
    terms["optimizer states"] = float(trainable * state_bytes)
    gradients = float(trainable * param_bytes)

    prompt = config.prompt_tokens
    phases: dict[str, dict[str, float]] = {}
    if config.lmbda < 1.0:
        t = config.seq_len
        phases["off-policy step"] = {
            "gradients": gradients,
            "activations": _activations(student, rows * t, b, config.gradient_checkpointing)
            + (0.0 if cached else _teacher_transient(teacher, rows * t, b)),
            "logits (both models)": _logits(config, teacher, student, rows, t, t - prompt, cached),
        }
    kv = 0.0
    if config.lmbda > 0.0:
        t = prompt + config.max_new_tokens
        phases["on-policy step"] = {
            "gradients": gradients,
            "activations": _activations(student, rows * t, b, config.gradient_checkpointing)
            + _teacher_transient(teacher, rows * t, b),
            "logits (both models)": _logits(config, teacher, student, rows, t, config.max_new_tokens),
        }
        kv = kv_cache_bytes(student, rows, t, b)
        if config.speculative_generation:
            kv += kv_cache_bytes(teacher, rows, t, b)
        prefill = rows * prompt * (2 * student.intermediate_size + 4 * student.hidden_size) * b
        phases["generation"] = {"generation KV cache": kv, "activations": float(prefill)}
    teacher_sharded = config.teacher_quant == "none"  # prepare_teacher_for_fsdp leaves a quantized teacher whole
    _apply_layout(config, terms, phases, teacher, student, b, trainable * param_bytes, teacher_sharded, notes)
    phase = max(phases, key=lambda name: sum(phases[name].values()))
    for name in ("gradients", "activations", "logits (both models)", "generation KV cache", *LAYOUT_TERMS):
        if name in LAYOUT_TERMS and all(name not in values for values in phases.values()):
            continue
        terms[name] = phases[phase].get(name, 0.0)
    persistent = sum(v for k, v in terms.items() if k not in phases[phase])
    phase_totals = {name: persistent + sum(values.values()) for name, values in phases.items()}
    return MemoryPlan(
        config=config,
        teacher=teacher,
        student=student,
        terms=terms,
        phase=phase,
        phases=phase_totals,
        kv_cache=kv,
        trainable_parameters=trainable,
        notes=notes,
    )


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def format_plan(plan: MemoryPlan, budget_gib: float = 24.0, reserve_gib: float = DEFAULT_RESERVE_GIB) -> str:
    """A text table of the plan, the verdict for `budget_gib`, and the suggestions when it does not fit."""
    cfg, t, s = plan.config, plan.teacher, plan.student
    student_mode = cfg.student_mode if cfg.student_mode == "full" else f"{cfg.student_mode} r={cfg.lora_r}"
    lines = [
        f"teacher: {t.name}: {t.num_parameters / 1e9:.2f}B parameters, {t.num_layers} layers, hidden {t.hidden_size}, "
        f"vocab {t.vocab_size}, {cfg.teacher_quant}"
        + (" (no double quantization)" if cfg.teacher_quant in ("nf4", "fp4") and not cfg.teacher_double_quant else "")
        + (f", {cfg.teacher_full_layers} layers in full precision" if cfg.teacher_full_layers else "")
        + (
            f", dataset batches from a teacher cache of K={cfg.teacher_cache_top_k}" if cfg.teacher_cache_top_k else ""
        ),
        f"student: {s.name}: {s.num_parameters / 1e9:.2f}B parameters, {s.num_layers} layers, hidden {s.hidden_size}, "
        f"{student_mode} ({plan.trainable_parameters / 1e6:.1f}M trainable), {cfg.optimizer}",
        f"batch {cfg.batch_size} x {cfg.seq_len} tokens (prompt {cfg.prompt_tokens}), max_new_tokens "
        f"{cfg.max_new_tokens}, lmbda {cfg.lmbda}, {cfg.dtype}, loss path {cfg.loss_path}"
        + (f" (chunk {cfg.loss_chunk_size})" if cfg.loss_path == "chunked" else "")
        + f", gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}",
    ]
    if not cfg.is_default_layout:
        sharded = "" if cfg.shards == 1 else f", weights / gradients / optimizer states split {cfg.shards} ways"
        lines.append(f"{cfg.num_processes} process(es), {cfg.engine}{sharded}, teacher offload "
                     f"{'on' if cfg.teacher_offload else 'off'}: memory PER PROCESS (GPU)")  # fmt: skip
    lines += ["", f"{'term':<26}{'GiB':>8}"]
    for name, value in plan.terms.items():
        if name == "generation KV cache" and plan.phase != "generation":
            continue
        lines.append(f"{name:<26}{_gib(value)}")
    lines.append(f"{'PEAK: ' + plan.phase:<26}{_gib(plan.total)}")
    others = [name for name in plan.phases if name != plan.phase]
    if others:
        lines.append("other phases, total:")
    for name in others:
        extra = f"   (KV cache {plan.kv_cache / GIB:.2f})" if name == "generation" else ""
        lines.append(f"{'  ' + name:<26}{_gib(plan.phases[name])}{extra}")
    lines += [f"note: {note}" for note in plan.notes]
    usable = budget_gib - reserve_gib
    if plan.fits(budget_gib, reserve_gib):
        lines.append(f"\nFITS a {budget_gib:g} GiB GPU ({plan.total / GIB:.2f} <= {usable:g} GiB: {reserve_gib:g} "
                     "GiB kept for the CUDA context and fragmentation).")  # fmt: skip
    else:
        lines.append(f"\nDOES NOT FIT a {budget_gib:g} GiB GPU ({plan.total / GIB:.2f} > {usable:g} GiB: "
                     f"{reserve_gib:g} GiB kept for the CUDA context and fragmentation).")  # fmt: skip
        suggestions = plan.suggestions(budget_gib, reserve_gib)
        if suggestions:
            lines.append("Changes that make it fit (each re-estimated):")
            for suggestion in suggestions:
                lines.append(f"  {suggestion.text:<60} -> {suggestion.plan.total / GIB:6.2f} GiB")
        else:
            lines.append("No change of these settings makes it fit: use a smaller model or a larger GPU.")
    return "\n".join(lines)


def gib(value: float) -> float:
    """Bytes to GiB."""
    return value / GIB


__all__ = [
    "MemoryPlan",
    "ModelShape",
    "PlanConfig",
    "Suggestion",
    "estimate_memory",
    "format_plan",
    "kv_cache_bytes",
    "load_model_config",
    "model_shape",
]
