"""Tiny offline building blocks for tests and examples: a word-level chat tokenizer, Qwen2 models of hidden size 64
built from configs, and a chat dataset of small sums. Nothing is downloaded.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "+", "=", "what", "is", "answer"] + [str(i) for i in range(40)]
VOCAB_SIZE = 96  # SPECIALS + WORDS, then filler words up to this size


def make_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a ChatML-like template; no download."""
    words = SPECIALS + WORDS
    words += [f"w{i}" for i in range(VOCAB_SIZE - len(words))]
    return word_level_tokenizer(words, with_pad=with_pad)


def word_level_tokenizer(words: list[str], with_pad: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `words` (id = position) with the ChatML-like `CHAT_TEMPLATE`.

    `words` must contain `SPECIALS` (`<pad>`, `<unk>`, `<|im_start|>`, `<|im_end|>`)."""
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<pad>" if with_pad else None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def byte_level_bpe_tokenizer(corpus: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A ByteLevel BPE tokenizer (the kind of Llama 3, Qwen, SmolLM: offsets, every byte a token) trained on `corpus`
    up to `vocab_size` tokens, with `CHAT_TEMPLATE`'s special tokens: two corpora or sizes give two tokenizations of
    the same text, as GOLD's cross-tokenizer alignment needs. Deterministic; no download."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_words(n: int, seed: int, alphabet: str = "abcdefgh0123456789") -> list[str]:
    """`n` random words (1 to 6 characters of `alphabet`), reproducible from `seed`."""
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(n)]


# Families whose logits are not plain `hidden @ W.T` (`make_family_model`): Granite divides them by `logits_scaling`,
# Cohere multiplies them by `logit_scale`, Gemma 2 soft-caps them; Llama is the plain head beside them
HEAD_FAMILIES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "llama": (LlamaConfig, {}),
    "granite": (GraniteConfig, {"logits_scaling": 8.0}),
    "cohere": (CohereConfig, {"logit_scale": 0.3}),
    "gemma2": (Gemma2Config, {"final_logit_softcapping": 2.0, "head_dim": 16}),
}


def make_model(
    seed: int,
    tokenizer: PreTrainedTokenizerFast,
    vocab_size: int = VOCAB_SIZE,
    layers: int = 2,
    config_class: type[PretrainedConfig] = Qwen2Config,
    **config_overrides,
) -> PreTrainedModel:
    """A causal LM with hidden size 64 (Qwen2 unless `config_class` says otherwise), initialized from `seed`."""
    torch.manual_seed(seed)
    config_kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attention_dropout=0.0,  # explicit: by-hand loss recomputations assume a deterministic forward in train mode
    )
    model = AutoModelForCausalLM.from_config(config_class(**{**config_kwargs, **config_overrides}))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_family_model(seed: int, tokenizer: PreTrainedTokenizerFast, family: str) -> PreTrainedModel:
    """`make_model` of a `HEAD_FAMILIES` family, its output weights times 10: logits large enough (a few units) for
    the scale and the softcap to matter, and for a gate between two such models to both accept and reject."""
    config_class, overrides = HEAD_FAMILIES[family]
    model = make_model(seed, tokenizer, config_class=config_class, **overrides)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
    return model


def save_teacher_with_another_tokenizer(path: str | os.PathLike, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Save `make_model(1, tokenizer)` to `path` with a tokenizer of the same size that gives `user` and `assistant`
    each other's ids: a teacher that only an id-by-id comparison of the tokenizers tells apart. Returns `path`."""
    make_model(1, tokenizer).save_pretrained(path)
    other = make_tokenizer()
    vocab = other.backend_tokenizer.get_vocab()
    swapped = {**vocab, "user": vocab["assistant"], "assistant": vocab["user"]}
    backend = Tokenizer(models.WordLevel(vocab=swapped, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other._tokenizer = backend
    other.save_pretrained(path)
    return Path(path)


def drop_cache_under_gradient_checkpointing(model: PreTrainedModel) -> PreTrainedModel:
    """Make `model` ignore its KV cache (``use_cache=False``, no ``past_key_values``) whenever gradient checkpointing
    is on and it is in training mode, whatever the installed transformers does there (older versions turned the
    cache off themselves; 5.x keeps it). Tests use it to set up that situation explicitly. Returns `model`."""
    forward = model.forward

    def forward_without_cache_when_checkpointing(*args, **kwargs):
        if model.is_gradient_checkpointing and model.training:
            kwargs.update(use_cache=False, past_key_values=None)
        return forward(*args, **kwargs)

    model.forward = forward_without_cache_when_checkpointing
    return model


def make_dataset(n: int = 16, seed: int = 0) -> Dataset:
    """Chat rows `{"messages": [user, assistant]}` of small sums, prompts of varying length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        terms = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
        question = " + ".join(str(t) for t in terms)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"what is {question} ="},
                    {"role": "assistant", "content": f"answer {sum(terms)}"},
                ]
            }
        )
    return Dataset.from_list(rows)


# `SpecKDConfig` settings of every tiny test run: CPU, float32, no reporting, no checkpoints, seed 0
TINY_ARGS = dict(bf16=False, use_cpu=True, report_to="none", save_strategy="no", seed=0)
# The multi-process tests (DDP, FSDP2, DeepSpeed workers under `tests/`), which compare N processes with one: 4 logged
# steps at a learning rate large enough that a wrong gradient reduction shows in the later steps' losses, the same
# number of batches on every process; and the gate they all train with (any trainer config, GKD's too, takes the first)
DISTRIBUTED_ARGS = dict(**TINY_ARGS, max_steps=4, logging_steps=1, learning_rate=5e-3, dataloader_drop_last=True)
DISTRIBUTED_GATE = dict(gate="topk", gate_top_k=40, reject_weight=0.5)


def make_prompt_dataset(n: int = 16) -> Dataset:
    """The prompts of `make_dataset(n)` alone (`{"prompt": [user message]}`), for on-policy-only trainers."""
    return Dataset.from_list([{"prompt": row["messages"][:1]} for row in make_dataset(n)])


def make_trainer(
    output_dir,
    *,
    student: PreTrainedModel | None = None,
    teacher: PreTrainedModel | None = None,
    train_dataset: Dataset | None = None,
    peft_config=None,
    callbacks=None,
    **overrides,
):
    """A `SpecKDTrainer` on the tiny models: student `make_model(0)`, teacher `make_model(1)` and `make_dataset()`
    unless given, with `TINY_ARGS`; `overrides` are further `SpecKDConfig` fields."""
    from ..config import SpecKDConfig
    from ..trainer import SpecKDTrainer

    tokenizer = make_tokenizer()
    return SpecKDTrainer(
        model=student if student is not None else make_model(0, tokenizer),
        teacher_model=teacher if teacher is not None else make_model(1, tokenizer),
        args=SpecKDConfig(**{**TINY_ARGS, "output_dir": str(output_dir), **overrides}),
        train_dataset=train_dataset if train_dataset is not None else make_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def collated_batch(trainer, kind: str, rows: int = 4) -> dict:
    """The first `rows` rows of the trainer's dataset through its collator, marked as a batch of `kind`
    (`trainer.ON_POLICY` / `OFF_POLICY`): for on-policy, the dataset's completions stand for sampled ones, so two
    trainers (e.g. the eager and the chunked loss path) see the same tokens."""
    from ..batches import KIND_KEY

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    return {**batch, KIND_KEY: kind}


def loss_gradients_and_window(trainer, batch: dict, num_items_in_batch: int = 13) -> tuple:
    """One training-mode `compute_loss` and backward on `batch` (a micro-batch of a window of `num_items_in_batch`
    completion tokens): the loss, the gradient of every trainable parameter and the gate's logging window."""
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(num_items_in_batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, dict(trainer._gate.window)


def perturbed_copy(model: PreTrainedModel, noise: float, seed: int = 0) -> PreTrainedModel:
    """A copy of `model` with Gaussian noise of std `noise` times each weight's std added: a student close to its
    teacher, for tests and benchmarks of speculative generation that need a high acceptance rate."""
    import copy

    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clone.parameters():
            if param.dim() > 1:
                param.add_(torch.randn(param.shape, generator=generator) * param.std() * noise)
    return clone


def random_batch(batch_size: int, seq_len: int, prompt_len: int, vocab_size: int, seed: int = 0) -> dict:
    """A collated batch of random token ids (ids 4 and up: no special tokens), for benchmarks and memory checks.

    Every row is `seq_len` tokens, all attended; the first `prompt_len` are the prompt (labels -100), the rest the
    completion. Holds the keys GKD's collator produces: `input_ids`, `attention_mask`, `labels`, `prompts`,
    `prompt_attention_mask` (all `[B, T]` or `[B, prompt_len]`, on the CPU).
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "prompts": input_ids[:, :prompt_len],
        "prompt_attention_mask": torch.ones_like(input_ids[:, :prompt_len]),
    }


# ----------------------------------------------------------------------------- several processes (tests)


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    """The environment of launched test processes: this package importable (its source tree first on `PYTHONPATH`),
    one thread per process, no hub, no experimental-API warning, and Python's stack of every thread printed if a
    process dies of a signal (`PYTHONFAULTHANDLER`)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", PYTHONFAULTHANDLER="1")
    return env


def torchrun(script_args: Sequence[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node nproc SCRIPT ARGS...` (`torchrun` without needing it on
    PATH) on a free port, output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    command += ["--master_port", str(free_port()), *map(str, script_args)]
    return subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=timeout)


def accelerate_launch(
    config_file: str | os.PathLike, script_args: Sequence[str], timeout: float = 240, cwd=None
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file CONFIG SCRIPT ARGS...` (or `-m MODULE ARGS...`) on a free port, output
    captured."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    command += ["--main_process_port", str(free_port()), *map(str, script_args)]
    return subprocess.run(command, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=timeout)


class LocalTeacherClient:
    """Stands in for TRL's `VLLMClient` of a teacher server: `get_sequence_logprobs` scores the sequences with a local
    model and answers in the server's format (top-k log-probabilities sorted, padded with -inf; the log-probability
    of each actual token, which vLLM's prompt log-probabilities always include). `calls` counts the requests."""

    def __init__(self, model: PreTrainedModel):
        self.model, self.calls = model, 0

    @torch.no_grad()
    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100, temperature=1.0, **_):
        self.calls += 1
        keys = ("logprobs", "logprob_token_ids", "actual_logprobs", "actual_token_ids")
        out = {key: [] for key in keys}
        for sequence, prompt_length in zip(sequences, prompt_lengths):
            ids = torch.tensor([sequence], device=self.model.device)
            log_probs = torch.log_softmax(self.model(input_ids=ids).logits[0].float() / temperature, dim=-1)
            scored = log_probs[prompt_length - 1 : len(sequence) - 1]  # predicts positions prompt_length .. end
            values, top = scored.topk(min(top_logprobs, scored.size(-1)), dim=-1)
            actual = torch.tensor(sequence[prompt_length:], device=scored.device)
            out["logprobs"].append(values.tolist())
            out["logprob_token_ids"].append(top.tolist())
            out["actual_logprobs"].append(scored.gather(-1, actual.unsqueeze(-1)).tolist())
            out["actual_token_ids"].append(actual.unsqueeze(-1).tolist())
        return out
