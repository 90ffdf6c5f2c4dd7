"""`SpecKDGOLDTrainer`: gated distillation across tokenizers on TRL's `GOLDTrainer`.

Two tiny models with two different ByteLevel BPE tokenizers (trained on different corpora, so some student tokens have
a counterpart in the teacher's vocabulary and some do not, and the byte alignment has multi-token spans on both
sides). With `gate="none"` the loss and gradients are `GOLDTrainer`'s (dataset and on-policy batches, plain and hybrid
ULD); with a gate, the verdicts equal a slow by-hand alignment; bad inputs raise with clear messages."""

import copy
import random

import pytest
import torch
from datasets import Dataset
from trl.experimental.gold import GOLDConfig, GOLDTrainer

from speckd_trl import SpecKDGOLDConfig, SpecKDGOLDTrainer
from speckd_trl.compat import gold_forward, uld_alignment
from speckd_trl.cross_tokenizer import span_completion, span_verdicts
from speckd_trl.rules import teacher_rank
from speckd_trl.tools.testing import (
    TINY_ARGS,
    byte_level_bpe_tokenizer,
    make_model,
    make_tokenizer,
    random_words,
)


CHAT_WORDS = ["user assistant"]
ALPHABET = "abcdef012345"


def chat_rows(n: int, seed: int) -> Dataset:
    """Chat rows whose prompts and answers are random words (varied splits under both tokenizers)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = " ".join(random_words(rng.randint(2, 4), seed * 1000 + i, ALPHABET))
        answer = " ".join(random_words(rng.randint(3, 7), seed * 1000 + 500 + i, ALPHABET))
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Student and teacher tokenizers (the teacher's saved, as GOLD loads it by path) and their tiny models."""
    path = tmp_path_factory.mktemp("gold")
    # different alphabets: each tokenizer merges pairs the other splits
    student_tokenizer = byte_level_bpe_tokenizer([" ".join(random_words(400, 1, "abcdef012"))] * 3 + CHAT_WORDS, 400)
    teacher_tokenizer = byte_level_bpe_tokenizer([" ".join(random_words(400, 2, "abc012345"))] * 3 + CHAT_WORDS, 360)
    teacher_tokenizer.save_pretrained(path / "teacher")
    student = make_model(0, student_tokenizer, vocab_size=len(student_tokenizer))
    teacher = make_model(1, teacher_tokenizer, vocab_size=len(teacher_tokenizer))
    for model in (student, teacher):  # logits of a few units: verdicts that both accept and reject
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(10)
    teacher.config._name_or_path = str(path / "teacher")
    return {
        "path": path,
        "student_tokenizer": student_tokenizer,
        "teacher_tokenizer": teacher_tokenizer,
        "student": student,
        "teacher": teacher,
        "teacher_path": str(path / "teacher"),
    }


GOLD_ARGS = dict(
    **TINY_ARGS,
    use_uld_loss=True,
    per_device_train_batch_size=4,
    max_length=96,
    max_completion_length=12,
    max_steps=2,
    logging_steps=1,
    learning_rate=1e-3,
)


def make_gold(pair, tmp_path, *, gated: bool, dataset=None, eval_dataset=None, **overrides):
    """A `GOLDTrainer` (or, `gated`, a `SpecKDGOLDTrainer`) on copies of the pair's models."""
    config, trainer = (SpecKDGOLDConfig, SpecKDGOLDTrainer) if gated else (GOLDConfig, GOLDTrainer)
    args = config(
        output_dir=str(tmp_path), teacher_tokenizer_name_or_path=pair["teacher_path"], **{**GOLD_ARGS, **overrides}
    )
    return trainer(
        model=copy.deepcopy(pair["student"]),
        teacher_model=copy.deepcopy(pair["teacher"]),
        args=args,
        train_dataset=dataset if dataset is not None else chat_rows(8, 0),
        eval_dataset=eval_dataset,
        processing_class=pair["student_tokenizer"],
    )


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def assert_same(reference, ours):
    (loss_ref, grads_ref), (loss, grads) = reference, ours
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("hybrid", [False, True], ids=["uld", "hybrid"])
@pytest.mark.parametrize("merge", ["observed", "bayesian"])
def test_gate_none_equals_gold_on_dataset_batches(pair, tmp_path, hybrid, merge):
    settings = dict(uld_use_hybrid_loss=hybrid, uld_token_merge_strategy=merge, uld_crossentropy_weight=0.3)
    gold = make_gold(pair, tmp_path / "gold", gated=False, **settings)
    ours = make_gold(pair, tmp_path / "ours", gated=True, gate="none", **settings)
    batch = next(iter(gold.get_train_dataloader()))
    assert_same(loss_and_grads(gold, batch), loss_and_grads(ours, batch))


@pytest.mark.parametrize("hybrid", [False, True], ids=["uld", "hybrid"])
def test_gate_none_equals_gold_on_on_policy_batches(pair, tmp_path, hybrid):
    gold = make_gold(pair, tmp_path / "gold", gated=False, lmbda=1.0, uld_use_hybrid_loss=hybrid)
    ours = make_gold(pair, tmp_path / "ours", gated=True, gate="none", lmbda=1.0, uld_use_hybrid_loss=hybrid)
    torch.manual_seed(0)
    gold.model.train()
    gold._fill_buffer(next(iter(gold.get_train_dataloader())), 1)  # the student samples the completions
    assert gold._buffered_on_policy == [True]
    batch = gold._buffered_inputs[0]
    ours._on_policy_batch = True
    assert_same(loss_and_grads(gold, batch), loss_and_grads(ours, batch))


def test_gate_none_without_uld_is_golds_own_loss(pair, tmp_path):
    """Same tokenizer, no ULD: GOLD's GKD-style JSD, passed through."""
    tokenizer = pair["student_tokenizer"]
    rows = Dataset.from_list([{"messages": r["messages"]} for r in chat_rows(4, 3)])
    trainers = []
    for config, cls in ((GOLDConfig, GOLDTrainer), (SpecKDGOLDConfig, SpecKDGOLDTrainer)):
        extra = {"gate": "none"} if cls is SpecKDGOLDTrainer else {}
        args = config(output_dir=str(tmp_path), **{**GOLD_ARGS, "use_uld_loss": False}, **extra)
        trainers.append(
            cls(
                model=copy.deepcopy(pair["student"]),
                teacher_model=make_model(1, tokenizer, vocab_size=len(tokenizer)),
                args=args,
                train_dataset=rows,
                processing_class=tokenizer,
            )
        )
    batch = next(iter(trainers[0].get_train_dataloader()))
    assert_same(loss_and_grads(trainers[0], batch), loss_and_grads(trainers[1], batch))


# ---------------------------------------------------------------------- verdicts across tokenizers


def gated_pieces(trainer, inputs, on_policy: bool):
    """The trainer's verdict path on one micro-batch: accept bits `[B, T_s]`, the gated positions, the student's
    logits and the aligned sequences."""
    from speckd_trl.batch_kind import OFF_POLICY, BatchKind

    with torch.no_grad():
        student_out, teacher_out, teacher_ids, teacher_labels, teacher_offsets = gold_forward(
            trainer, trainer.model, inputs
        )
    sequences = uld_alignment(
        trainer.uld_loss_fn,
        student_out.logits,
        teacher_out.logits,
        inputs["labels"],
        teacher_labels,
        inputs["input_ids"],
        teacher_ids,
        inputs["byte_offsets"],
        teacher_offsets,
    )
    completion = span_completion(sequences, inputs["input_ids"].shape, student_out.logits.device)
    kind = BatchKind.on_policy() if on_policy else BatchKind.named(OFF_POLICY)
    batch = trainer._open_batch(kind, completion, inputs["input_ids"], training=False)
    accepted, _ = span_verdicts(batch, sequences, student_out.logits, teacher_out.logits, trainer._to_teacher)
    return accepted, completion, student_out.logits, sequences, batch


def teacher_id_by_hand(token: str, student_tokenizer, teacher_tokenizer) -> int:
    """The teacher token of a student token, by hand: the same string in the teacher's vocabulary, else the first
    teacher token of its decoded text (end of sequence to end of sequence)."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    if token in teacher_vocab:
        return teacher_vocab[token]
    if token == student_tokenizer.eos_token:
        return teacher_tokenizer.eos_token_id
    text = student_tokenizer.convert_tokens_to_string([token])
    return teacher_tokenizer(text, add_special_tokens=False)["input_ids"][0]


def verdicts_by_hand(trainer, pair, inputs, student_logits, on_policy: bool, k: int):
    """Slow reference: walk each completion's bytes; a student token that starts where a teacher token starts is
    verified against the teacher's distribution before that teacher token (the teacher model run here on its own
    tokenization), for the teacher token of the proposal; a student token that starts inside a teacher token takes
    the verdict of the student token before it. Also returns what was met: proposals with and without counterpart,
    and student tokens that start inside a teacher token or cover several."""
    student_tokenizer, teacher_tokenizer = pair["student_tokenizer"], pair["teacher_tokenizer"]
    teacher_vocab = teacher_tokenizer.get_vocab()
    expected = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    met = {"counterpart": 0, "no_counterpart": 0, "inside_teacher_token": 0, "covers_several": 0}
    for row in range(inputs["input_ids"].size(0)):
        prompt_ids = teacher_tokenizer(inputs["original_prompt_text"][row], add_special_tokens=False)["input_ids"]
        completion = teacher_tokenizer(
            inputs["original_completion_text"][row], add_special_tokens=False, return_offsets_mapping=True
        )
        teacher_ids = prompt_ids + completion["input_ids"] + [teacher_tokenizer.eos_token_id]
        with torch.no_grad():
            teacher_logits = trainer.teacher_model(input_ids=torch.tensor([teacher_ids])).logits[0]
        teacher_start = {start: len(prompt_ids) + j for j, (start, _) in enumerate(completion["offset_mapping"])}
        teacher_ends = sorted(end for _, end in completion["offset_mapping"])
        positions = (inputs["labels"][row] != -100).nonzero().squeeze(-1).tolist()[:-1]  # GOLD skips the EOS
        verdict = True
        for p in positions:
            start, end = inputs["byte_offsets"][row, p].tolist()
            if start in teacher_start:
                u = teacher_start[start]
                proposal = int(inputs["input_ids"][row, p]) if on_policy else int(student_logits[row, p - 1].argmax())
                token = student_tokenizer.convert_ids_to_tokens(proposal)
                met["counterpart" if token in teacher_vocab else "no_counterpart"] += 1
                target = teacher_id_by_hand(token, student_tokenizer, teacher_tokenizer)
                rank = teacher_rank(teacher_logits[u - 1][None], torch.tensor([target]))
                verdict = bool(rank[0] < k)
                met["covers_several"] += sum(start < e < end for e in teacher_ends)
            else:
                met["inside_teacher_token"] += 1
            expected[row, p] = verdict
    return expected, met


@pytest.mark.parametrize("on_policy", [False, True], ids=["dataset_greedy", "on_policy_sampled"])
def test_verdicts_equal_a_by_hand_alignment(pair, tmp_path, on_policy):
    k = 120  # of ~400: two untrained models agree on about a third of the proposals
    trainer = make_gold(pair, tmp_path, gated=True, gate="topk", gate_top_k=k, dataset=chat_rows(8, 7))
    inputs = next(iter(trainer.get_train_dataloader()))
    accepted, completion, student_logits, _, _ = gated_pieces(trainer, inputs, on_policy)
    expected, met = verdicts_by_hand(trainer, pair, inputs, student_logits, on_policy, k)
    in_loss = (inputs["labels"] != -100).clone()
    in_loss[torch.arange(in_loss.size(0)), in_loss.cumsum(-1).argmax(-1)] = False  # the skipped EOS
    assert torch.equal(completion, in_loss)
    assert torch.equal(accepted[completion], expected[completion])
    assert 0 < int(accepted[completion].sum()) < int(completion.sum())  # both verdicts occur
    assert all(met.values()), met  # tokens with and without counterpart, spans of several tokens on both sides


@pytest.mark.parametrize("normalize", ["tokens", "accepted"])
def test_gated_loss_weights_each_span_by_its_verdict(pair, tmp_path, normalize):
    """The loss by hand: per sequence, sum over its spans of the verdict's weight times the span's sorted-L1 ULD term,
    over the number of spans (`"accepted"`: over the sum of the weights); the batch's mean."""
    reject_weight = 0.25
    trainer = make_gold(
        pair,
        tmp_path,
        gated=True,
        gate="topk",
        gate_top_k=120,
        reject_weight=reject_weight,
        gate_normalize=normalize,
        dataset=chat_rows(8, 7),
    )
    inputs = next(iter(trainer.get_train_dataloader()))
    accepted, _, _, sequences, _ = gated_pieces(trainer, inputs, on_policy=False)
    expected = []
    for row, sequence in enumerate(sequences):
        terms, weights = [], []
        for g, span in enumerate(sequence.student_spans):
            s = sequence.student[g].sort(descending=True).values
            t = sequence.teacher[g].sort(descending=True).values
            size = max(s.numel(), t.numel())
            l1 = torch.nn.functional.pad(s, (0, size - s.numel())) - torch.nn.functional.pad(t, (0, size - t.numel()))
            weight = 1.0 if bool(accepted[row, span[0]]) else reject_weight
            terms.append(weight * l1.abs().sum())
            weights.append(weight)
        expected.append(torch.stack(terms).sum() / (len(terms) if normalize == "tokens" else sum(weights)))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    # and with reject_weight=1 the gate changes nothing: GOLD's loss
    trainer.args.reject_weight = 1.0
    ungated = make_gold(pair, tmp_path / "gold", gated=False, dataset=chat_rows(8, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            trainer.compute_loss(trainer.model, inputs), ungated.compute_loss(ungated.model, inputs)
        )


def test_spec_verdicts_read_the_teacher_at_the_proposals_teacher_token(pair, tmp_path):
    """`spec` across tokenizers on sampled tokens: accept iff u < p_teacher(teacher token of x) / q(x), q the
    student at the sampling temperature, at each span's first student token."""
    trainer = make_gold(pair, tmp_path, gated=True, gate="spec", temperature=0.7, top_p=1.0, dataset=chat_rows(8, 7))
    inputs = next(iter(trainer.get_train_dataloader()))
    accepted, _, student_logits, sequences, batch = gated_pieces(trainer, inputs, on_policy=True)
    with torch.no_grad():
        _, teacher_out, *_ = gold_forward(trainer, trainer.model, inputs)
    checked = 0
    for row, sequence in enumerate(sequences):
        for student_span, teacher_span in zip(sequence.student_spans, sequence.teacher_spans, strict=True):
            s, t = student_span[0], teacher_span[0]
            x = int(inputs["input_ids"][row, s])
            token = pair["student_tokenizer"].convert_ids_to_tokens(x)
            target = teacher_id_by_hand(token, pair["student_tokenizer"], pair["teacher_tokenizer"])
            log_p = torch.log_softmax(teacher_out.logits[row, t - 1], -1)[target]
            log_q = torch.log_softmax(student_logits[row, s - 1] / 0.7, -1)[x]
            u = batch.uniforms["accept"][row, s]
            assert bool(accepted[row, s]) == bool(torch.log(u) < log_p - log_q)
            checked += 1
    assert checked > 20 and 0 < int(accepted.sum())


def test_training_logs_the_gate_and_evaluates(pair, tmp_path):
    """Dataset and on-policy micro-batches (lmbda=0.5, two per step), then an evaluation."""
    trainer = make_gold(
        pair,
        tmp_path,
        gated=True,
        gate="topk",
        gate_top_k=120,
        lmbda=0.5,
        uld_use_hybrid_loss=True,
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        eval_dataset=chat_rows(4, 5),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    assert all(0 <= entry["gate/acceptance_rate"] <= 1 and "reward/mean" in entry for entry in logs)
    assert any("gate/acceptance_rate_on_policy" in entry for entry in logs)
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


# ---------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_tokenizers_without_byte_offsets_are_refused(pair, tmp_path, role):
    word_level = make_tokenizer()  # whitespace word-level: no ByteLevel offsets
    if role == "teacher":
        word_level.save_pretrained(tmp_path / "word_level")
        pair = {**pair, "teacher_path": str(tmp_path / "word_level")}
    else:
        pair = {**pair, "student_tokenizer": word_level, "student": make_model(0, word_level)}
    with pytest.raises(ValueError, match=f"the {role}'s tokenizer .* is not a ByteLevel BPE tokenizer"):
        make_gold(pair, tmp_path, gated=True, gate="topk")


def test_different_tokenizers_without_uld_are_refused(pair, tmp_path):
    teacher = copy.deepcopy(pair["teacher"])
    teacher.name_or_path = pair["teacher_path"]
    args = SpecKDGOLDConfig(output_dir=str(tmp_path), **{**GOLD_ARGS, "use_uld_loss": False}, gate="none")
    with pytest.raises(ValueError, match="use_uld_loss=False compares .* Set use_uld_loss=True"):
        SpecKDGOLDTrainer(
            model=copy.deepcopy(pair["student"]),
            teacher_model=teacher,
            args=args,
            train_dataset=chat_rows(4, 0),
            processing_class=pair["student_tokenizer"],
        )


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(use_uld_loss=True, use_extended_uld=False), "use_extended_uld=False: positional ULD"),
        (dict(use_uld_loss=False), "use_uld_loss=False: without ULD"),
        (dict(use_uld_loss=True, reject_target="top_k"), "reject_target='top_k' is not served across tokenizers"),
        (dict(use_uld_loss=True, reward_coef=0.1), "reward_coef=0.1 is not served"),
    ],
)
def test_settings_the_alignment_cannot_serve_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        SpecKDGOLDConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="topk", **settings)


def test_gate_none_accepts_positional_uld(tmp_path):
    SpecKDGOLDConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="none", use_uld_loss=True, use_extended_uld=False)


def test_spec_warns_when_golds_sampler_is_filtered(tmp_path):
    with pytest.warns(UserWarning, match="top_p=0.95"):
        SpecKDGOLDConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="spec", use_uld_loss=True)


def test_gate_top_k_is_checked_against_the_teachers_vocabulary(pair, tmp_path):
    with pytest.raises(ValueError, match="gate_top_k"):
        make_gold(pair, tmp_path, gated=True, gate="topk", gate_top_k=len(pair["teacher_tokenizer"]))


def test_a_gold_config_is_refused(pair, tmp_path):
    args = GOLDConfig(output_dir=str(tmp_path), teacher_tokenizer_name_or_path=pair["teacher_path"], **GOLD_ARGS)
    with pytest.raises(TypeError, match="SpecKDGOLDTrainer needs `args=SpecKDGOLDConfig"):
        SpecKDGOLDTrainer(
            model=copy.deepcopy(pair["student"]),
            teacher_model=copy.deepcopy(pair["teacher"]),
            args=args,
            train_dataset=chat_rows(4, 0),
            processing_class=pair["student_tokenizer"],
        )


def test_resume_matches_the_uninterrupted_run(pair, tmp_path):
    """Stop at step 2 of 4 and resume from its checkpoint: the same loss and gate metrics at every step (GOLD's
    lmbda draw and the student's samples come back with the Trainer's RNG states, the gate's draws with its own)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    config = dict(gate="spec", lmbda=0.5, top_p=1.0, max_steps=4, per_device_train_batch_size=2)

    def logs(trainer, **kwargs):
        trainer.train(**kwargs)
        return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}

    reference = logs(make_gold(pair, tmp_path / "full", gated=True, **config))
    first = make_gold(pair, tmp_path / "cut", gated=True, save_strategy="steps", save_steps=2, **config)
    first.add_callback(StopAt())
    logs(first)
    resumed = logs(
        make_gold(pair, tmp_path / "cut", gated=True, **config),
        resume_from_checkpoint=str(tmp_path / "cut/checkpoint-2"),
    )
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ["loss", *(k for k in reference[step] if k.startswith(("gate/", "reward/")))]:
            assert resumed[step][key] == pytest.approx(reference[step][key], abs=1e-5), (step, key)
