"""Packed dataset micro-batches (`packing=True`, `speckd_trl/packing.py`): a packed micro-batch gives the same loss,
gradients, gate verdicts and logged statistics as the same rows padded, on both loss paths, for every gate, with LoRA,
a teacher cache and an NF4 teacher; packing changes what the models compute (fewer positions, restarting
`position_ids`); a model that would let packed sequences attend to each other is refused; and a trainer trains with it.
"""

import math

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, Qwen2ForCausalLM

from speckd_trl import SpecKDConfig
from speckd_trl.batches import KIND_KEY, OFF_POLICY, ON_POLICY
from speckd_trl.packing import PACKED_KEY, Packed, check_packable, pack_micro_batch
from speckd_trl.tools.testing import TINY_ARGS, make_dataset, make_model, make_tokenizer, make_trainer, perturbed_copy


MAX_LENGTH = 64
RTOL = 1e-5


def sharp(seed: int, config_class=None):
    """`make_model(seed)` with its output weights times 10: logits of a few units, so that the divergence is not a
    near-zero difference of near-uniform distributions (its round-off then is), and the gates both accept and
    reject."""
    kwargs = {} if config_class is None else {"config_class": config_class}
    model = make_model(seed, make_tokenizer(), **kwargs)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
    return model


def sharp_trainer(output_dir, config_class=None, **overrides):
    """`make_trainer` with `sharp` models (unless given; the student a noisy copy of the teacher), packing on,
    dataset micro-batches only."""
    # a student near the teacher: every gate both accepts and rejects
    overrides.setdefault("student", perturbed_copy(sharp(1, config_class), 1.0))
    overrides.setdefault("gate_top_k", 30)
    if "teacher_cache" not in overrides or "teacher" in overrides:
        overrides.setdefault("teacher", sharp(1, config_class))
    return make_trainer(output_dir, **{"packing": True, "lmbda": 0.0, "max_length": MAX_LENGTH, **overrides})


def completion_mask_dataset(n: int = 8) -> Dataset:
    """Plain-text prompt / completion rows of varied lengths: `SpecKDTrainer` tokenizes them with a `completion_mask`."""
    rows = []
    for i in range(n):
        prompt = " ".join(f"w{(7 * i + j) % 40}" for j in range(3 + (5 * i) % 17))
        completion = " ".join(f"w{(3 * i + j) % 40}" for j in range(2 + (3 * i) % 11)) + " <|im_end|>"
        rows.append({"prompt": prompt, "completion": completion})
    return Dataset.from_list(rows)


def batches(trainer, rows: int = 6) -> tuple[dict, dict]:
    """The first `rows` dataset rows collated (padded), and the same micro-batch packed."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    packed = pack_micro_batch(batch, MAX_LENGTH, trainer.processing_class.pad_token_id)
    return {**batch, KIND_KEY: OFF_POLICY}, {**packed, KIND_KEY: OFF_POLICY}


def with_uniforms_by_position(trainer, packed: dict) -> None:
    """Make the gate's random draws a function of the position (the same uniform at a padded position and at its
    packed place), so that a rule that draws (`spec`, sampled proposals) decides alike in both layouts."""
    gate, layout = trainer._gate, packed[PACKED_KEY]
    padded_shape = (layout.padded["input_ids"].size(0), layout.padded["input_ids"].size(1) - 1)
    table = torch.rand((2, *padded_shape), generator=torch.Generator().manual_seed(7))
    draw = gate.draw_uniforms

    def by_position(kind, gated, generator):
        drawn = draw(kind, gated, generator)
        for i, name in enumerate(sorted(drawn)):
            drawn[name] = table[i] if gated.shape == padded_shape else layout.from_padded(table[i])
        return drawn

    gate.draw_uniforms = by_position


def loss_grads_window(trainer, batch: dict) -> tuple:
    trainer._gate.window = {k: 0.0 for k in trainer._gate.window}
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(40))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, dict(trainer._gate.window)


def assert_packed_equals_padded(trainer, rows: int = 6) -> dict:
    padded, packed = batches(trainer, rows)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # something was packed away
    with_uniforms_by_position(trainer, packed)
    loss_a, grads_a, window_a = loss_grads_window(trainer, padded)
    loss_b, grads_b, window_b = loss_grads_window(trainer, packed)
    assert loss_a != 0
    assert abs(float(loss_b - loss_a)) <= RTOL * abs(float(loss_a)), (float(loss_a), float(loss_b))
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        scale = float(grad.abs().max())
        assert float((grads_b[name] - grad).abs().max()) <= RTOL * max(scale, 1e-12), name
    # the gate's verdicts and the per-sequence rewards, counted alike
    for key in window_a:
        assert math.isclose(window_a[key], window_b[key], rel_tol=1e-6, abs_tol=1e-9), (key, window_a, window_b)
    return window_a


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
@pytest.mark.parametrize("gate", ["none", "topk", "spec"])
def test_packed_equals_padded_qwen2(tmp_path, gate, loss_path):
    trainer = sharp_trainer(tmp_path, gate=gate, loss_path=loss_path)
    window = assert_packed_equals_padded(trainer)
    if gate != "none":  # the comparison covers both verdicts
        assert 0 < window["accepted_off"] < window["gated_off"], window


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_packed_equals_padded_llama_with_completion_masks_and_sampled_proposals(tmp_path, loss_path):
    trainer = sharp_trainer(
        tmp_path,
        LlamaConfig,
        train_dataset=completion_mask_dataset(),
        gate="spec",
        gate_proposal="sample",
        loss_path=loss_path,
    )
    assert "completion_mask" in trainer.train_dataset.column_names
    assert_packed_equals_padded(trainer, rows=8)


def test_packed_equals_padded_lora_student(tmp_path):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none")
    trainer = sharp_trainer(tmp_path, gate="topk", peft_config=peft_config)
    # LoRA's B starts at zero: give it values, so that every LoRA gradient is non-zero and compared
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    assert_packed_equals_padded(trainer)


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_packed_equals_padded_from_a_teacher_cache(tmp_path, loss_path):
    live = make_trainer(tmp_path / "live", teacher=sharp(1), max_length=MAX_LENGTH)
    live.cache_teacher(str(tmp_path / "cache"), top_k=8, batch_size=4)
    trainer = sharp_trainer(
        tmp_path / "cached",
        teacher=sharp(1),
        gate="topk",
        gate_top_k=8,
        teacher_cache=str(tmp_path / "cache"),
        loss_path=loss_path,
    )
    cache, read = trainer._teacher_cache, []
    batch = cache.batch
    cache.batch = lambda *args: read.append(args) or batch(*args)
    assert_packed_equals_padded(trainer)
    assert len(read) == 2  # both layouts read the cache, the packed one by each row's own tokens


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_packed_equals_padded_nf4_teacher(tmp_path, loss_path):
    pytest.importorskip("bitsandbytes")
    sharp(1).save_pretrained(tmp_path / "teacher")
    trainer = sharp_trainer(
        tmp_path / "out",
        teacher=str(tmp_path / "teacher"),
        teacher_load_in_4bit=True,
        gate="spec",
        loss_path=loss_path,
    )
    assert_packed_equals_padded(trainer)


def test_the_shift_never_crosses_a_sequence(tmp_path):
    trainer = sharp_trainer(tmp_path)
    padded, packed = batches(trainer)
    layout: Packed = packed[PACKED_KEY]
    starts = packed["position_ids"] == 0
    assert (packed["labels"][starts] == -100).all()  # no output predicts the next sequence's first token
    # the packed completion positions are exactly the padded ones, each in one place
    completion = packed["labels"][:, 1:] != -100
    assert completion.sum() == (padded["labels"][:, 1:] != -100).sum()
    assert torch.equal(layout.to_padded(completion, False), padded["labels"][:, 1:] != -100)
    # every packed row within max_length, every sequence whole and in order
    assert packed["input_ids"].size(1) <= MAX_LENGTH
    tokens = layout.to_padded(packed["input_ids"][:, 1:], -1)
    real = padded["attention_mask"][:, 1:].bool() & (padded["attention_mask"][:, :-1].bool())
    assert torch.equal(tokens[real], padded["input_ids"][:, 1:][real])


def test_packing_changes_what_the_models_compute(tmp_path):
    """`SpecKDConfig(packing=True)`: dataset micro-batches reach both models packed (fewer positions, restarting
    `position_ids`, no attention mask); without it they arrive padded. On-policy micro-batches stay padded."""
    calls = {}

    def spy(model, role):
        forward = model.forward

        def recorded(*args, **kwargs):
            calls.setdefault(role, []).append(kwargs)
            return forward(*args, **kwargs)

        model.forward = recorded

    seen = {}
    for packing in (False, True):
        calls.clear()
        trainer = make_trainer(tmp_path / str(packing), packing=packing, lmbda=0.0, max_length=MAX_LENGTH)
        spy(trainer.model, "student")
        spy(trainer.teacher_model, "teacher")
        batch = trainer._make_completions(trainer.data_collator([trainer.train_dataset[i] for i in range(6)]))
        trainer.compute_loss(trainer.model, batch)
        for role in ("student", "teacher"):
            (kwargs,) = calls[role]
            seen[packing, role] = kwargs
    for role in ("student", "teacher"):
        padded, packed = seen[False, role], seen[True, role]
        assert padded["attention_mask"] is not None and "position_ids" not in padded
        assert packed.get("attention_mask") is None and packed["use_cache"] is False
        assert packed["input_ids"].numel() < padded["input_ids"].numel()
        assert (packed["position_ids"] == 0).sum() > packed["input_ids"].size(0)  # several sequences per row
    on_policy = make_trainer(tmp_path / "on", packing=True, lmbda=0.5, max_length=MAX_LENGTH, max_new_tokens=4)
    on_policy._batch_kinds.draw = lambda: ON_POLICY
    made = on_policy._make_completions(on_policy.data_collator([on_policy.train_dataset[i] for i in range(4)]))
    assert PACKED_KEY not in made and made[KIND_KEY] == ON_POLICY


class IgnoresPositions(Qwen2ForCausalLM):
    """Takes `position_ids` and drops them: its causal mask spans the whole packed row."""

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


def test_a_model_that_cannot_take_packed_positions_is_refused():
    tokenizer = make_tokenizer()
    model = make_model(0, tokenizer)
    check_packable(model, "student")  # a transformers model: fine
    ignoring = IgnoresPositions(model.config)
    ignoring.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="does not keep packed sequences apart"):
        check_packable(ignoring, "student")

    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="does not take `position_ids`"):
        check_packable(NoPositions(), "teacher")


def test_the_trainer_refuses_such_a_model(tmp_path):
    tokenizer = make_tokenizer()
    base = make_model(0, tokenizer)
    student = IgnoresPositions(base.config)
    student.load_state_dict(base.state_dict())
    with pytest.raises(ValueError, match="packing=True: the student"):
        make_trainer(tmp_path, student=student, packing=True, lmbda=0.0, max_length=MAX_LENGTH)


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_trains_with_packing(tmp_path, loss_path):
    trainer = make_trainer(
        tmp_path,
        train_dataset=make_dataset(24),
        packing=True,
        lmbda=0.5,
        max_length=MAX_LENGTH,
        max_new_tokens=4,
        gate="topk",
        gate_top_k=30,
        per_device_train_batch_size=6,
        gradient_accumulation_steps=2,
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-3,
        loss_path=loss_path,
    )
    made = []
    make = trainer._make_completions
    trainer._make_completions = lambda inputs: made.append(make(inputs)) or made[-1]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(PACKED_KEY in b for b in made) and any(b[KIND_KEY] == ON_POLICY for b in made)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(math.isfinite(entry["loss"]) for entry in logs)
    assert all(0 <= entry["reward/mean"] <= 1 and "gate/acceptance_rate" in entry for entry in logs)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"padding_free": True}, "padding_free=True is not supported"),
        ({"packing": True, "packing_strategy": "wrapped"}, "packing_strategy='wrapped'"),
        ({"packing": True, "seq_kd": True}, "seq_kd=True"),
        ({"packing": True, "lmbda": 1.0}, "lmbda=1.0"),
        ({"packing": True, "lmbda": 0.5, "mixing": "sample"}, 'mixing="sample"'),
        ({"packing": True, "eval_packing": True}, "eval_packing=True"),
    ],
)
def test_what_packing_cannot_do_is_refused(overrides, fragment):
    with pytest.raises(ValueError, match=None) as error:
        SpecKDConfig(output_dir="out", **TINY_ARGS, **overrides)
    assert fragment in str(error.value)


def test_packing_is_accepted():
    args = SpecKDConfig(output_dir="out", **TINY_ARGS, packing=True, lmbda=0.5)
    assert args.packing and args.packing_strategy == "bfd"
