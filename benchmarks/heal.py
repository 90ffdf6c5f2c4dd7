"""A smaller student that is not broken: SmolLM2-135M-Instruct cut to half its depth and healed by distillation.

    python benchmarks/heal.py                 # build (cached); print its size, heal time and heal loss

Its starting accuracy and answer loss on the task are `quality.py --student healed --references`' `REF` lines.

The real-weights *capacity-gap* regime of `benchmarks/quality.py --student healed`: the teacher is the demo's tuned
SmolLM2-135M-Instruct (30 layers); the student is the *untuned* SmolLM2-135M-Instruct with 15 of its 30 layers
(`HEAL_LAYERS`: the first 12 and the last 3, the deep middle dropped as in layer-pruning work), healed by a short
full-parameter distillation from the untuned full model (`SpecKDTrainer` with `gate="none"`, `lmbda=0`, forward KL)
on the full model's own answers to generic instructions (`HEAL_PROMPTS`: no arithmetic, so the healed student does
not have the task's skill). Both stages are cached under the demo's cache directory, keyed by their settings.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

HEAL_LAYERS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 27, 28, 29)
HEAL_PROMPTS = (
    "Write a short poem about the sea.",
    "Explain what photosynthesis is in simple words.",
    "Give me three tips for a good night's sleep.",
    "What is the capital of France, and what is it known for?",
    "Describe a cat to someone who has never seen one.",
    "Write a friendly email inviting a colleague to lunch.",
    "What are the benefits of regular exercise?",
    "Tell me a short story about a lost key.",
    "How does a rainbow form?",
    "Summarize the plot of Romeo and Juliet.",
    "What should I pack for a weekend camping trip?",
    "Explain the difference between weather and climate.",
    "Write a haiku about autumn leaves.",
    "Why do people learn foreign languages?",
    "Give a recipe for a simple tomato soup.",
    "What is a computer program?",
    "Describe your ideal weekend.",
    "How do bees make honey?",
    "Write a thank-you note to a teacher.",
    "What is the role of the heart in the human body?",
    "Explain what a library is for.",
    "Give advice to someone starting their first job.",
    "Why is the sky blue?",
    "Write a short dialogue between a shopkeeper and a customer.",
    "What are some ways to reduce plastic waste?",
    "Describe the city you would like to visit and why.",
    "How do plants drink water?",
    "What makes a good friend?",
    "Explain how a bicycle works.",
    "Write a limerick about a dog who loves to dance.",
    "What is the difference between a lake and a river?",
    "Give me a short motivational message for a Monday morning.",
)


def heal_data(base_dir: Path, out: Path, *, samples_per_prompt: int, max_new_tokens: int, seed: int,
              task_prompts: tuple = ()):  # fmt: skip
    """The base model's sampled answers to `HEAL_PROMPTS` (`samples_per_prompt` each) and to `task_prompts`
    (conversations without their answer, one each) as a `messages` dataset; cached as JSONL in `out`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = out / "heal.jsonl"
    if not path.is_file():
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        tokenizer.padding_side = "left"
        conversations = [[{"role": "user", "content": p}] for p in HEAL_PROMPTS for _ in range(samples_per_prompt)]
        conversations += [list(messages) for messages in task_prompts]
        rows = []
        for start in range(0, len(conversations), 32):
            chunk = conversations[start : start + 32]
            prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = model.generate(**enc, do_sample=True, temperature=0.8, max_new_tokens=max_new_tokens)
            for messages, text in zip(chunk, tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :],
                                                                    skip_special_tokens=True)):  # fmt: skip
                rows.append({"messages": [*messages, {"role": "assistant", "content": text.strip()}]})
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, path)
    return Dataset.from_list([json.loads(line) for line in path.read_text().splitlines()])


def healed_student(base_dir: Path, cache: Path, *, layers: tuple[int, ...] = HEAL_LAYERS, steps: int = 200,
                   learning_rate: float = 1e-4, samples_per_prompt: int = 8, max_new_tokens: int = 96,
                   seed: int = 0, max_fraction: float = 0.75, task_prompts: tuple = ()) -> Path:  # fmt: skip
    """The student of `base_dir`'s `layers`, healed; built once, cached under `cache` (returns its directory).

    `task_prompts` (conversations without their answers) add the base model's own answers to them to the heal data:
    the base keeps what it knows of the task's domain, not the tuned teacher's skill."""
    import torch
    from transformers import AutoTokenizer

    from speckd_trl import SpecKDConfig, SpecKDTrainer
    from speckd_trl.demo.app import _key, layer_subset
    from speckd_trl.demo.hub import is_complete_checkpoint

    parts = [str(base_dir), layers, HEAL_PROMPTS, steps, learning_rate, samples_per_prompt, max_new_tokens, seed]
    key = _key(*parts, *([task_prompts] if task_prompts else []))  # (no task prompts: the first students' keys)
    out = cache / f"healed-{key}"
    if is_complete_checkpoint(out):
        return out
    started = time.time()
    data_parts = [str(base_dir), HEAL_PROMPTS, samples_per_prompt, max_new_tokens, seed]  # any cut shares the text
    data_key = _key(*data_parts, *([task_prompts] if task_prompts else []))
    data = heal_data(base_dir, cache / f"heal-text-{data_key}", samples_per_prompt=samples_per_prompt,
                     max_new_tokens=max_new_tokens, seed=seed, task_prompts=task_prompts)  # fmt: skip
    data_s = time.time() - started
    cut = layer_subset(base_dir, list(layers), cache / f"cut-{key}", max_fraction=max_fraction)
    args = SpecKDConfig(
        output_dir=str(out.with_name(out.name + ".run")),
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=8,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 10,
        logging_steps=max(1, min(10, steps // 2)),
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        gate="none",
        lmbda=0.0,
        beta=0.0,
        max_length=256,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    trainer = SpecKDTrainer(
        model=str(cut), teacher_model=str(base_dir), args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    tmp = out.with_name(out.name + ".tmp")
    trainer.save_model(str(tmp))
    trainer.processing_class.save_pretrained(str(tmp))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    record = {"layers": list(layers), "steps": steps, "learning_rate": learning_rate, "rows": len(data),
              "task_rows": len(task_prompts),
              "data_s": round(data_s, 1), "heal_s": round(time.time() - started - data_s, 1),
              "first_loss": losses[0], "last_loss": losses[-1]}  # fmt: skip
    (tmp / "heal.json").write_text(json.dumps(record, indent=1))
    os.replace(tmp, out)
    return out


def parse_layers(spec: str) -> tuple[int, ...]:
    """`"0-4,20-29"` -> (0, 1, 2, 3, 4, 20, ..., 29)."""
    layers = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        layers.extend(range(int(first), int(last or first) + 1))
    return tuple(layers)


def block_scan(
    base_dir: Path, rows, n_drop: int, *, texts: int = 48, max_length: int = 128
) -> list[tuple[float, int]]:
    """KL(full || cut) per token on `texts` heal conversations for every cut that drops `n_drop` consecutive layers
    (the first and last layers always kept), best first: `[(kl, first dropped layer), ...]`. The cheap way to choose
    which block to drop (the angular-distance rule of layer-pruning work, measured on the output instead)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    step = max(1, len(rows) // texts)
    chats = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in list(rows)[::step][:texts]]
    enc = tokenizer(chats, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False)  # fmt: skip
    mask = enc["attention_mask"].bool()
    layers = list(model.model.layers)

    def log_probs(keep):
        model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = index
        model.config.num_hidden_layers = len(keep)
        with torch.no_grad():
            return torch.log_softmax(model(**enc).logits, -1)

    full = log_probs(range(len(layers)))
    scores = []
    for first in range(1, len(layers) - n_drop):
        cut = log_probs([i for i in range(len(layers)) if not first <= i < first + n_drop])
        scores.append(((full.exp() * (full - cut)).sum(-1)[mask].mean().item(), first))
    return sorted(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="The demo's cache (default: the user cache).")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--layers", default=None, help="kept layers, e.g. '0-4,20-29' (default: HEAL_LAYERS).")
    parser.add_argument(
        "--scan", default="", help="e.g. '10,15': print, per number of dropped layers, the best blocks to drop."
    )
    args = parser.parse_args()
    import torch

    from speckd_trl.demo import hub

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else hub.cache_dir()
    base = hub.smollm2_checkpoint(cache)
    if args.scan:
        from speckd_trl.demo.app import _key

        parts = [str(base), HEAL_PROMPTS, 8, 96, 0]
        rows = heal_data(base, cache / f"heal-text-{_key(*parts)}", samples_per_prompt=8, max_new_tokens=96, seed=0)
        for n_drop in (int(n) for n in args.scan.split(",")):
            scores = block_scan(base, rows, n_drop)
            best = ", ".join(f"drop {s}-{s + n_drop - 1}: {kl:.2f}" for kl, s in scores[:5])
            print(json.dumps({"n_drop": n_drop, "kl_by_first_dropped": {s: round(kl, 3) for kl, s in scores}}))
            print(f"drop {n_drop} layers, best (KL per token): {best}")
        return
    layers = parse_layers(args.layers) if args.layers else HEAL_LAYERS
    student = healed_student(base, cache, layers=layers)
    sizes = {
        f"{name}_params_m": round(sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(path)).parameters())
                                  / 1e6, 1)
        for name, path in (("student", student), ("base", base))
    }  # fmt: skip
    print(json.dumps({"student": str(student), **sizes, **json.loads((student / "heal.json").read_text())}))


if __name__ == "__main__":
    main()
