"""One consumer GPU: an 8B NF4 teacher and a 1B LoRA student, GKD vs SpecKD, peak memory and step time side by side.

    python benchmarks/one_gpu_memory.py                      # needs a CUDA GPU with ~24 GB free
    python benchmarks/one_gpu_memory.py --batch 4 --seq 512 --new-tokens 64

No download: the teacher and student are random-init models with the shapes of Llama-3.1-8B and Llama-3.2-1B (the
same 128256-token vocabulary), written inline. The teacher is saved once in bf16 to a temporary directory and loaded
back by `SpecKDTrainer` itself with `teacher_load_in_4bit=True` (NF4, double quantization, bf16 compute), which is
the path a user takes. Memory and speed do not depend on the weights' values, only on their shapes (generation
length is fixed with `min_new_tokens` so random weights do not stop early).

For each trainer: one optimizer step on a dataset batch and one on an on-policy batch (student generation of
`new-tokens` tokens); peak allocated CUDA memory and wall time of each, after one untimed warm-up run. Prints a table and a final JSON line, and
saves a bar chart.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from speckd_trl import SpecKDConfig, SpecKDTrainer  # noqa: E402
from speckd_trl.models import load_teacher  # noqa: E402
from speckd_trl.tools.testing import CHAT_TEMPLATE  # noqa: E402


VOCAB = 128256
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=True)  # fmt: skip


def tokenizer_for(vocab: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"] + [f"t{i}" for i in range(vocab - 4)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|im_end|>", bos_token="<|im_start|>")  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_rows(n: int, prompt_len: int, completion_len: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, 30000, (prompt_len + completion_len,), generator=g).tolist()
        prompt = " ".join(f"t{i}" for i in ids[:prompt_len])
        completion = " ".join(f"t{i}" for i in ids[prompt_len:])
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})
    return Dataset.from_list(rows)


def run(name, trainer_cls, config_cls, student_fn, teacher, tok, train, args, extra):
    config = config_cls(
        output_dir=tempfile.mkdtemp(), report_to="none", bf16=True, per_device_train_batch_size=args.batch,
        max_steps=1, logging_steps=1, save_strategy="no", learning_rate=1e-4, max_new_tokens=args.new_tokens,
        gradient_checkpointing=True, max_length=args.seq + 8, seed=0, **extra,
    )  # fmt: skip
    trainer = trainer_cls(model=student_fn(), teacher_model=teacher, args=config, train_dataset=train,
                          processing_class=tok, peft_config=LoraConfig(r=16, target_modules="all-linear"))  # fmt: skip
    trainer.generation_kwargs["min_new_tokens"] = args.new_tokens
    trainer.generation_config.min_new_tokens = args.new_tokens
    results = []
    for kind, lmbda in (("dataset", 0.0), ("on_policy", 1.0)):
        trainer.lmbda = lmbda  # both trainers read the batch kind from `self.lmbda`
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()  # max_steps=1: one optimizer step
        torch.cuda.synchronize()
        results.append({"trainer": name, "batch": kind, "seconds": time.perf_counter() - start,
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30})  # fmt: skip
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512, help="prompt + completion tokens of dataset rows")
    parser.add_argument("--new-tokens", type=int, default=64, help="on-policy completion length")
    parser.add_argument("--plot", default="one_gpu_memory.png")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("one_gpu_memory.py needs a CUDA GPU.")

    tok = tokenizer_for(VOCAB)
    teacher_dir = tempfile.mkdtemp(prefix="teacher8b-")
    with torch.device("cuda"):
        teacher = LlamaForCausalLM._from_config(LlamaConfig(vocab_size=VOCAB, **LLAMA_8B), dtype=torch.bfloat16)
    teacher.save_pretrained(teacher_dir)
    del teacher
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    load_args = SpecKDConfig(output_dir=tempfile.mkdtemp(), report_to="none", bf16=True, teacher_load_in_4bit=True)
    teacher = load_teacher(teacher_dir, load_args)
    teacher_gib = torch.cuda.memory_allocated() / 2**30

    def student():
        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(LlamaConfig(vocab_size=VOCAB, **LLAMA_1B), dtype=torch.bfloat16)
        model.generation_config.eos_token_id = tok.eos_token_id
        return model

    prompt_len = args.seq // 4
    train = make_rows(64, prompt_len, args.seq - prompt_len)
    run(
        "warm-up", SpecKDTrainer, SpecKDConfig, student, teacher, tok, train, args, {}
    )  # CUDA/cuBLAS start-up, untimed
    rows = run("GKD", GKDTrainer, GKDConfig, student, teacher, tok, train, args, {})
    rows += run("SpecKD topk", SpecKDTrainer, SpecKDConfig, student, teacher, tok, train, args, {"gate": "topk"})
    rows += run("SpecKD spec", SpecKDTrainer, SpecKDConfig, student, teacher, tok, train, args, {"gate": "spec"})

    gpu = torch.cuda.get_device_name()
    print(f"{gpu}; NF4 teacher (8B shapes) resident: {teacher_gib:.2f} GiB; batch {args.batch} x {args.seq} tokens, "
          f"{args.new_tokens} generated tokens on on-policy steps")  # fmt: skip
    print(f"{'trainer':<12} {'batch':<10} {'s/step':>8} {'peak GiB':>9}")
    for row in rows:
        print(f"{row['trainer']:<12} {row['batch']:<10} {row['seconds']:>8.2f} {row['peak_gib']:>9.2f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['trainer']}\n{r['batch']}" for r in rows]
    ax.bar(labels, [r["peak_gib"] for r in rows], color=["#888", "#888"] + ["#2a7"] * (len(rows) - 2))
    ax.axhline(24, color="#c33", linestyle="--", label="24 GiB consumer GPU")
    ax.set_ylabel("peak allocated CUDA memory (GiB)")
    ax.set_title(f"8B NF4 teacher + 1B LoRA student, batch {args.batch}x{args.seq}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")
    print(json.dumps({"gpu": gpu, "teacher_nf4_gib": teacher_gib, "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
