"""The teacher as it really teaches: the demo's tuned SmolLM2-135M teacher loaded each way, side by side, in one run.

    python benchmarks/teacher_quant.py --heldout test --threads 1             # every setting that runs here
    python benchmarks/teacher_quant.py --settings float32,nf4,nf4-skip4 --heldout validation --items 200

A student distils the teacher as it is loaded, not the teacher in the model card. For each setting this loads the
tuned teacher of the quality benchmark (`benchmarks/quality.py`: the demo's SmolLM2-135M-Instruct tuned 60 steps on
reasoning-gym sums) and measures, on the held-out split (`quality.heldout_rows`: `test` is the 500 items the quality
tables report on):

- `exact match`: greedy answers equal to the reference (8 new tokens, as the quality benchmark);
- `KL`: the forward KL from the float32 teacher per answer token, teacher-forced on the reference answers (nats);
- `top-1`: the share of those positions where both rank the same token first;
- `weights MiB`: `model.get_memory_footprint()` (parameters and buffers, quantization constants included);
- `peak MiB`: the process's peak above the start while loading the setting and running the first held-out item's
  answer pass (`PeakMemory`; resident set on a CPU: run with `MALLOC_MMAP_THRESHOLD_=1048576`; a full-precision
  copy made while quantizing counts).

Settings (`SETTINGS`; every 4-bit setting runs with float32 compute):

- `float32`, `int8` (bitsandbytes LLM.int8()), `nf4` (single quantization), `nf4-double` (NF4 with double
  quantization: what `teacher_load_in_4bit=True` loaded before this benchmark), `fp4`;
- `nf4-skipN`: NF4 with the N decoder layers kept in float32 that a measured per-layer sensitivity ranks first
  (`speckd_trl.teacher_check.layer_sensitivity`: KL when only that layer is rounded to NF4, on the first
  `--calibration` *train* rows, never the held-out ones), i.e. `teacher_quantization_skip_modules`;
- `nf4-first-last`: NF4 with the first 2 and last 2 layers in float32 (the hand-picked choice, for comparison);
- `qlora`: a teacher tuned in NF4 with LoRA (QLoRA: the skill lives in full-precision adapters; same data, steps and
  batch as the demo's teacher tune, LoRA r=16 on every linear layer, learning rate `--qlora-lr`), used as NF4 + LoRA;
  `qlora-float32-base`: the same adapters on the float32 base (what the QLoRA tune taught, without NF4's rounding);
- 4-bit outside bitsandbytes, each when its package is installed (a missing package is a SKIP line):
  `hqq4` (HQQ, group 64, its optimizer; through HQQ's own `AutoHQQHFModel`: transformers 5.24's `HqqConfig` raises
  "not available yet" when it would quantize), `hqq4-g32-rtn` (HQQ, group 32, plain min-max rounding with a float
  zero point: the grid of the GGUF Q4_1 file the base model was dequantized from), `gptq4` (GPTQ through
  `GPTQConfig`, group 64, calibrated on the first 32 train conversations; `gptqmodel` declares torch >= 2.14.1, so
  it is installed with `--no-deps` plus its pure-Python requirements), `torchao-int4` (torchao's
  `IntxWeightOnlyConfig`, int4 weights per group of 64, through `TorchAoConfig`; its `Int4WeightOnlyConfig` has no
  CPU path in 0.18), `quanto-int4` (`QuantoConfig(weights="int4")`). `get_memory_footprint` does not see inside
  torchao's and quanto's tensor types: their `weights MiB` counts the bytes of every parameter's stored tensors.

Prints a table, one `ROW` JSON line per setting, a final JSON line, and saves a plot. `--delta-only` prints one
`DELTA` line instead: the size of the teacher's tune against NF4's rounding error (`tuning_delta`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # quality.py: held-out rows and answer positions

FIRST_LAST = ["model.layers.0", "model.layers.1", "model.layers.28", "model.layers.29"]
SETTINGS = (
    "float32",
    "int8",
    "nf4",
    "nf4-double",
    "fp4",
    "nf4-first-last",
    "nf4-skip2",
    "nf4-skip4",
    "nf4-skip8",
    "qlora",
    "qlora-float32-base",
    "hqq4",
    "hqq4-g32-rtn",
    "gptq4",
    "torchao-int4",
    "quanto-int4",
)
EXTRA_PACKAGES = "pip install hqq torchao optimum-quanto; gptqmodel: see the module docstring"


def speckd_args(setting: str, ranking: list[str], output_dir: str):
    """The `SpecKDConfig` a bitsandbytes setting is loaded with (None for the others)."""
    from speckd_trl import SpecKDConfig

    common = dict(output_dir=output_dir, use_cpu=True, report_to="none", teacher_bnb_4bit_compute_dtype="float32")
    if setting == "float32":
        return SpecKDConfig(**common, teacher_quantization="none")
    if setting in ("int8", "nf4", "fp4"):
        return SpecKDConfig(**common, teacher_quantization=setting, teacher_bnb_4bit_use_double_quant=False)
    if setting == "nf4-double":
        return SpecKDConfig(**common, teacher_quantization="nf4", teacher_bnb_4bit_use_double_quant=True)
    if setting == "nf4-first-last":
        return SpecKDConfig(**common, teacher_quantization="nf4", teacher_bnb_4bit_use_double_quant=False,
                            teacher_quantization_skip_modules=FIRST_LAST)  # fmt: skip
    if setting.startswith("nf4-skip"):
        keep = ranking[: int(setting[len("nf4-skip") :])]
        return SpecKDConfig(**common, teacher_quantization="nf4", teacher_bnb_4bit_use_double_quant=False,
                            teacher_quantization_skip_modules=keep)  # fmt: skip
    return None


def other_config(setting: str, calibration_texts: list[str], tokenizer):
    """A transformers quantization config for the settings outside bitsandbytes; ImportError when not installed."""
    import torch

    if setting == "torchao-int4":
        import torchao  # noqa: F401
        from torchao.quantization import IntxWeightOnlyConfig, PerGroup
        from transformers import TorchAoConfig

        return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))
    if setting == "quanto-int4":
        import optimum.quanto  # noqa: F401
        from transformers import QuantoConfig

        return QuantoConfig(weights="int4")
    if setting == "gptq4":
        import gptqmodel  # noqa: F401
        from transformers import GPTQConfig

        return GPTQConfig(bits=4, group_size=64, dataset=calibration_texts, tokenizer=tokenizer)
    raise ValueError(setting)


def hqq_quantize(model, *, group_size: int, plain_rounding: bool):
    """HQQ 4-bit through HQQ's own API (transformers 5.24's HqqConfig cannot quantize); ImportError when missing."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    config = BaseQuantizeConfig(nbits=4, group_size=group_size)
    if plain_rounding:  # min-max rounding with a float zero point, no HQQ optimization
        config["weight_quant_params"]["optimize"] = False
        config["weight_quant_params"]["round_zero"] = False
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=torch.float32, device="cpu")
    return model


def stored_mib(model) -> float:
    """MiB of every parameter's and buffer's stored tensors, looking inside tensor subclasses (torchao, quanto) and
    HQQ's metadata, where `get_memory_footprint` sees only the logical shape or nothing."""
    import torch

    def size(t) -> int:
        names = getattr(t, "__tensor_flatten__", None)
        if names is not None and type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor:
            return sum(size(getattr(t, n)) for n in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    total = sum(size(p.data if isinstance(p, torch.nn.Parameter) else p) for p in model.parameters())
    total += sum(size(b) for b in model.buffers())
    for module in model.modules():
        for value in (getattr(module, "meta", None) or {}).values():  # HQQLinear keeps scales and zeros here
            if torch.is_tensor(value):
                total += size(value)
    return total / 2**20


def qlora_teacher(base: Path, train, cache: Path, *, steps: int, lr: float, batch_size: int, seed: int) -> Path:
    """LoRA adapters tuned on an NF4 base (QLoRA), the demo teacher's data, steps and batch; cached."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from speckd_trl.demo.app import _key

    out = cache / f"qlora-teacher-{_key(str(base), steps, lr, batch_size, seed)}"
    if (out / "adapter_config.json").is_file():
        return out
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=bnb, device_map={"": "cpu"})
    pairs = train.map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
        remove_columns=train.column_names,
    )
    args = SFTConfig(output_dir=str(out) + ".run", max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size,
                     lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), logging_steps=5, save_strategy="no",
                     report_to="none", seed=seed, use_cpu=True, bf16=False)  # fmt: skip
    peft = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    trainer = SFTTrainer(model=model, args=args, train_dataset=pairs, peft_config=peft)
    print(f"[qlora] tuning LoRA r=16 on the NF4 base for {steps} steps, lr {lr}", flush=True)
    trainer.train()
    trainer.model.save_pretrained(str(out))
    return out


def load_setting(setting: str, teacher_dir: Path, ranking: list[str], args, setup) -> tuple:
    """(model, how it was loaded, in words)."""
    from transformers import AutoModelForCausalLM

    from speckd_trl.models import load_teacher

    loading = speckd_args(setting, ranking, args.output_dir)
    if loading is not None:
        model = load_teacher(str(teacher_dir), loading)
        skip = loading.teacher_quantization_skip_modules
        return model, f"teacher_quantization={loading.teacher_quantization_method}" + (
            f", kept {skip}" if skip else ""
        )
    if setting.startswith("qlora"):
        import torch
        from peft import PeftModel
        from transformers import BitsAndBytesConfig

        adapter = qlora_teacher(setup["base"], setup["train"], setup["cache"], steps=setup["config"].teacher_steps,
                                lr=args.qlora_lr, batch_size=setup["config"].batch_size, seed=0)  # fmt: skip
        if setting == "qlora-float32-base":  # the same adapters on the unquantized base: the tune's own skill
            base = AutoModelForCausalLM.from_pretrained(str(setup["base"]), dtype=torch.float32)
            return PeftModel.from_pretrained(base, str(adapter)).eval(), "float32 base + the QLoRA adapters"
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(
            str(setup["base"]), quantization_config=bnb, device_map={"": "cpu"}
        )
        return PeftModel.from_pretrained(base, str(adapter)).eval(), f"NF4 base + LoRA tuned on it ({adapter.name})"
    if setting.startswith("hqq4"):
        import hqq  # noqa: F401  (ImportError before loading anything)
        import torch

        model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
        group, plain = (32, True) if setting == "hqq4-g32-rtn" else (64, False)
        hqq_quantize(model, group_size=group, plain_rounding=plain)
        return model, f"HQQ 4-bit, group {group}" + (", plain rounding" if plain else "")
    return other_model(setting, teacher_dir, setup["tokenizer"], setup["train"])


def other_model(setting: str, teacher_dir: Path, tokenizer, train) -> tuple:
    """The teacher loaded through `other_config(setting)` (calibrated, where it is, on the first 32 train
    conversations), and the config's class name."""
    from transformers import AutoModelForCausalLM

    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in train[:32]["messages"]]
    config = other_config(setting, texts, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), quantization_config=config, device_map="cpu")
    return model, type(config).__name__


def tuning_delta(base_dir: Path, teacher_dir: Path) -> dict[str, float]:
    """How the teacher's tune compares with NF4's rounding, over the decoder's linear weights (root mean squares):
    the tune's change of the weights, NF4's rounding error of the tuned weights (bitsandbytes, blocks of 64), and
    the error left in the tune's change once both models are rounded (NF4(teacher) - NF4(base) against the change);
    and the same for 4-bit plain min-max rounding in groups of 32 (`hqq4-g32-rtn`'s grid, the grid of the GGUF Q4_1
    file the base was dequantized from): how many base weights sit on it, how far the rounded teacher lands from the
    base, against the tune's change."""
    import bitsandbytes.functional as F
    import torch
    from transformers import AutoModelForCausalLM

    def nf4(weight):
        packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        return F.dequantize_4bit(packed, state).view_as(weight)

    def rtn32(weight):  # 4-bit min-max rounding with a float zero point, groups of 32 along the rows
        groups = weight.reshape(-1, 32)
        low, high = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
        step = (high - low).clamp_min(1e-12) / 15
        rounded = ((groups - low) / step).round().clamp(0, 15) * step + low
        return rounded.view_as(weight), step.expand_as(groups).reshape(weight.shape)

    base = dict(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).named_parameters())
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    sums = dict(weight=0.0, delta=0.0, rounding=0.0, delta_error=0.0, rtn_rounding=0.0, rtn_from_base=0.0)
    counts = dict(weights=0, base_on_grid=0, rounded_to_base=0)
    for name, param in teacher.named_parameters():
        if param.dim() != 2 or ".layers." not in name:
            continue
        weight, before = param.data, base[name].data
        rounded = nf4(weight)
        sums["weight"] += weight.pow(2).sum().item()
        sums["delta"] += (weight - before).pow(2).sum().item()
        sums["rounding"] += (rounded - weight).pow(2).sum().item()
        sums["delta_error"] += ((rounded - nf4(before)) - (weight - before)).pow(2).sum().item()
        (plain, step), (plain_base, step_base) = rtn32(weight), rtn32(before)
        sums["rtn_rounding"] += (plain - weight).pow(2).sum().item()
        sums["rtn_from_base"] += (plain - before).pow(2).sum().item()
        counts["weights"] += weight.numel()
        counts["base_on_grid"] += ((plain_base - before).abs() <= 1e-3 * step_base).sum().item()
        counts["rounded_to_base"] += ((plain - before).abs() <= 1e-3 * step).sum().item()
    return {
        "tune_change_over_weight": (sums["delta"] / sums["weight"]) ** 0.5,
        "nf4_rounding_over_weight": (sums["rounding"] / sums["weight"]) ** 0.5,
        "nf4_rounding_over_tune_change": (sums["rounding"] / sums["delta"]) ** 0.5,
        "tune_change_error_after_nf4_over_tune_change": (sums["delta_error"] / sums["delta"]) ** 0.5,
        "rtn32_base_weights_on_grid": counts["base_on_grid"] / counts["weights"],
        "rtn32_teacher_weights_rounded_to_base_value": counts["rounded_to_base"] / counts["weights"],
        "rtn32_rounding_over_tune_change": (sums["rtn_rounding"] / sums["delta"]) ** 0.5,
        "rtn32_rounded_teacher_from_base_over_tune_change": (sums["rtn_from_base"] / sums["delta"]) ** 0.5,
    }


def answer_kl(reference, logits) -> tuple[float, float, int]:
    """Summed KL(reference || model) and top-1 agreements over the answer positions, and the position count."""
    kl, agree, n = 0.0, 0, 0
    for ref, out in zip(reference, logits, strict=True):
        log_p, log_q = ref.log_softmax(-1), out.log_softmax(-1)
        kl += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        n += ref.shape[0]
    return kl, agree, n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"some of {SETTINGS}")
    parser.add_argument("--heldout", default="test", choices=("demo", "validation", "test"))
    parser.add_argument("--items", type=int, default=None, help="only the first N held-out items")
    parser.add_argument("--calibration", type=int, default=64, help="train rows of the per-layer sensitivity")
    parser.add_argument("--qlora-lr", type=float, default=5e-4, help="learning rate of the QLoRA teacher's tune")
    parser.add_argument("--cache-dir", default=None, help="The demo's cache (default: the user cache).")
    parser.add_argument("--output-dir", default="/tmp/speckd-teacher-quant")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "teacher_quant.png"))
    parser.add_argument("--log", default="", help="also append the lines, the table and the final JSON here")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--from-logs",
        nargs="+",
        help="Load nothing: the table and plot of the ROW lines of earlier runs' logs (a run split or resumed).",
    )
    parser.add_argument(
        "--delta-only",
        action="store_true",
        help="only compare the teacher's tune with NF4's rounding (`tuning_delta`: a DELTA line), load no setting",
    )
    args = parser.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")

    def log(line: str) -> None:
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as handle:
                handle.write(line + "\n")

    if args.from_logs:
        from speckd_trl.demo import hub

        cache = Path(args.cache_dir).expanduser() if args.cache_dir else hub.cache_dir()
        teachers = sorted(cache.glob("teacher-*/config.json"))  # the planner reads the teacher's config only
        args.teacher_dir = str(teachers[0].parent) if teachers else None
        rows = [json.loads(line[4:]) for path in args.from_logs for line in open(path) if line.startswith("ROW {")]
        order = {name: i for i, name in enumerate(SETTINGS)}
        rows = sorted((r for r in rows if r["setting"] in settings), key=lambda r: order[r["setting"]])
        report(rows, args, time.time(), log)
        return

    import torch
    from quality import answer_logits, answer_positions, heldout_rows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speckd_trl.demo import DemoConfig, evaluate, hub, prepare
    from speckd_trl.teacher_check import PeakMemory, completion_batches, completion_logits, layer_sensitivity

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    config = DemoConfig(student_init="base", lora_r=16)  # the quality benchmark's transfer regime
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else hub.cache_dir()
    teacher_dir, base_dir, data, _ = prepare(config, cache)
    args.teacher_dir = str(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    heldout = data["eval"] if args.heldout == "demo" else heldout_rows(config, args.heldout, args.items)
    if args.heldout == "demo" and args.items:
        heldout = heldout.select(range(min(args.items, len(heldout))))
    examples = answer_positions(tokenizer, heldout)
    log("ARGS " + json.dumps(vars(args)))
    if args.delta_only:
        log("DELTA " + json.dumps(tuning_delta(base_dir, teacher_dir)))
        return

    full = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    reference = answer_logits(full, examples)
    ranking = []
    if any(s.startswith("nf4-skip") for s in settings):
        calibration = completion_batches(data["train"], tokenizer, samples=args.calibration, batch_size=8,
                                         max_length=None)  # fmt: skip
        scores = layer_sensitivity(full, calibration, quant_type="nf4", reference=completion_logits(full, calibration))
        ranking = [name for name, _ in scores]
        log("SENSITIVITY " + json.dumps({"calibration_rows": args.calibration, "kl_by_layer": scores}))
    del full
    gc.collect()
    setup = {"base": base_dir, "train": data["train"], "cache": cache, "config": config, "tokenizer": tokenizer}

    rows = []
    for setting in settings:
        meter = PeakMemory("cpu")
        meter.start()
        try:
            model, how = load_setting(setting, teacher_dir, ranking, args, setup)
        except ImportError as err:
            why = f"{type(err).__name__}: {err} ({EXTRA_PACKAGES})"
            log("SKIP " + json.dumps({"setting": setting, "why": why}))
            continue
        answer_logits(model, examples[:1])  # one answer pass: the peak is the loading's and one forward's
        peak = meter.peak_mib()
        logits = answer_logits(model, examples)
        kl, agree, n = answer_kl(reference, logits)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        exact = evaluate(model, tokenizer, heldout, max_new_tokens=config.max_new_tokens, desc=setting)
        row = {"setting": setting, "loaded": how, "split": args.heldout, "items": len(heldout),
               "exact_match": exact, "kl_per_token": kl / n, "top1_agreement": agree / n, "answer_tokens": n,
               "weights_mib": model.get_memory_footprint() / 2**20, "stored_mib": stored_mib(model),
               "peak_mib": peak}  # fmt: skip
        rows.append(row)
        log("ROW " + json.dumps(row))
        del model, logits
        gc.collect()
    report(rows, args, started, log)


def report(rows, args, started, log) -> None:
    title = f"cpu: the demo's tuned SmolLM2-135M teacher loaded each way, {rows[0]['items']} {args.heldout} items"
    log(f"\n{title}")
    log("| setting | loaded as | exact match % (95% CI) | KL(fp32 \\|\\| this) / answer token | top-1 agreement % | "
        "weights MiB: footprint (stored) | planner MiB | peak MiB |")  # fmt: skip
    log("|---|---|---|---|---|---|---|---|")
    teacher_dir = getattr(args, "teacher_dir", None)
    for r in rows:
        low, high = wilson(r["exact_match"], r["items"])
        planned = planner_mib(r["setting"], teacher_dir)
        log(f"| {r['setting']} | {r['loaded']} | {100 * r['exact_match']:.1f} ({100 * low:.1f}-{100 * high:.1f}) | "
            f"{r['kl_per_token']:.4f} | {100 * r['top1_agreement']:.1f} | {r['weights_mib']:.0f} "
            f"({r.get('stored_mib', r['weights_mib']):.0f}) | {'-' if planned is None else f'{planned:.0f}'} | "
            f"{r['peak_mib']:.0f} |")  # fmt: skip
    plot(rows, args.plot, title)
    log(f"plot: {args.plot}   wall time {time.time() - started:.0f} s")
    log(json.dumps({"title": title, "args": vars(args), "rows": rows}))


PLANNER = {  # setting -> the planner's teacher settings (`speckd-trl plan --teacher-quant ...`)
    "float32": dict(teacher_quant="none"),
    "int8": dict(teacher_quant="int8"),
    "nf4": dict(teacher_quant="nf4", teacher_double_quant=False),
    "nf4-double": dict(teacher_quant="nf4", teacher_double_quant=True),
    "fp4": dict(teacher_quant="fp4", teacher_double_quant=False),
    "nf4-first-last": dict(teacher_quant="nf4", teacher_double_quant=False, teacher_full_layers=4),
    "nf4-skip2": dict(teacher_quant="nf4", teacher_double_quant=False, teacher_full_layers=2),
    "nf4-skip4": dict(teacher_quant="nf4", teacher_double_quant=False, teacher_full_layers=4),
    "nf4-skip8": dict(teacher_quant="nf4", teacher_double_quant=False, teacher_full_layers=8),
    "gptq4": dict(teacher_quant="gptq"),
}


def planner_mib(setting: str, teacher_dir: str | None) -> float | None:
    """The planner's teacher weights for a bitsandbytes or GPTQ setting (float32 compute), in MiB; None for the others.
    The planner counts bitsandbytes' quantization constants, which `get_memory_footprint` leaves out."""
    if setting not in PLANNER or teacher_dir is None:
        return None
    from speckd_trl.plan import PlanConfig, estimate_memory

    config = PlanConfig(teacher=teacher_dir, student=teacher_dir, dtype="float32", **PLANNER[setting])
    return estimate_memory(config).terms["teacher weights"] / 2**20


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a proportion `p` measured on `n` items (one model, no seeds: the items vary)."""
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5 / (1 + z * z / n)
    return center - half, center + half


def plot(rows, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_mem) = plt.subplots(1, 2, figsize=(13, 4.2))
    names = [r["setting"] for r in rows]
    ax_acc.bar(range(len(rows)), [100 * r["exact_match"] for r in rows], color="#2a7")
    ax_acc.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax_acc.set_title("teacher's held-out exact match (%)", fontsize=10)
    for x, r in enumerate(rows):
        ax_acc.text(x, 100 * r["exact_match"] + 0.5, f"{100 * r['exact_match']:.1f}", ha="center", fontsize=7)
    mib = [r.get("stored_mib", r["weights_mib"]) for r in rows]
    ax_mem.scatter(mib, [100 * r["exact_match"] for r in rows])
    for r, x in zip(rows, mib):
        ax_mem.annotate(r["setting"], (x, 100 * r["exact_match"]), fontsize=7)
    ax_mem.set(xlabel="weights (MiB)", ylabel="exact match (%)", title="skill against memory")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
