"""Adding a gate rule is one class (CONTRIBUTING.md, "How to add a gate"): a toy rule, registered in this file only,
works in the configs, both loss paths of `SpecKDTrainer`, `SpecKDDistillationTrainer` and SKD generation, with no
other module touched."""

import math

import pytest
import torch

from speckd_trl import (
    GATE_RULES,
    GateRule,
    SpecKDConfig,
    SpecKDDistillationConfig,
    SpecKDDistillationTrainer,
    SpecKDServerDistillationConfig,
)
from speckd_trl.batches import OFF_POLICY, ON_POLICY
from speckd_trl.generation import speculative_generate
from speckd_trl.losses import jsd_log_probs
from speckd_trl.rules import accept_mask, get_rule
from speckd_trl.tools.testing import (
    TINY_ARGS,
    collated_batch,
    loss_gradients_and_window,
    make_model,
    make_prompt_dataset,
    make_tokenizer,
    make_trainer,
)


class ConfidentTeacherGate(GateRule):
    """Accept a proposal iff the teacher gives it at least the uniform probability ``1 / V``; a rejected draft is
    replaced by a sample from the teacher's tokens at or above it (never empty: the largest probability is)."""

    name = "confident"

    def accept(self, student_logits, teacher_logits, proposals, *, top_k, uniforms, normalized=False):
        log_p = teacher_logits.float() if normalized else torch.log_softmax(teacher_logits.float(), dim=-1)
        return log_p.gather(-1, proposals.unsqueeze(-1)).squeeze(-1) >= -math.log(teacher_logits.size(-1))

    def replacement_probs(self, teacher_logits, draft_logits, *, top_k):
        p = torch.softmax(teacher_logits, dim=-1)
        return p * (torch.log(p) >= -math.log(p.size(-1)))


@pytest.fixture
def confident(monkeypatch):
    """The rule registered for this test only (`rules.register_rule` would keep it for the session)."""
    monkeypatch.setitem(GATE_RULES, ConfidentTeacherGate.name, ConfidentTeacherGate)


def reference(teacher_logits, proposals, mask):
    out = torch.zeros_like(mask)
    for index in mask.nonzero().tolist():
        log_p = torch.log_softmax(teacher_logits[tuple(index)].double(), -1)
        out[tuple(index)] = log_p[proposals[tuple(index)]].item() >= -math.log(log_p.numel())
    return out


def test_the_rule_is_a_choice_of_both_configs_once_registered(tmp_path, confident):
    assert SpecKDConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="confident").gate_rule.name == "confident"
    SpecKDDistillationConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="confident")


def test_an_unregistered_rule_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="gate='confident' is not valid; allowed values are topk, spec, none"):
        SpecKDConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="confident")


def test_accept_mask_applies_the_rule(confident):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 7, 96, generator=g), torch.randn(3, 7, 96, generator=g) * 3
    proposals, mask = torch.randint(0, 96, (3, 7), generator=g), torch.rand(3, 7, generator=g) > 0.3
    got = accept_mask(student, teacher, proposals, mask, gate="confident")
    assert torch.equal(got, reference(teacher, proposals, mask)) and 0 < got[mask].float().mean() < 1


@pytest.mark.parametrize("kind", [OFF_POLICY, ON_POLICY])
def test_both_loss_paths_apply_the_rule(tmp_path, confident, kind):
    """The eager and the chunked path: the same loss, gradients and counts, and the verdicts are the rule's on the
    student's greedy proposal (dataset rows) or its sampled token (on-policy rows)."""
    runs = {}
    for path in ("eager", "chunked"):
        trainer = make_trainer(tmp_path / path, gate="confident", loss_path=path, reject_weight=0.25)
        runs[path] = loss_gradients_and_window(trainer, collated_batch(trainer, kind))
    (loss_e, grads_e, window_e), (loss_c, grads_c, window_c) = runs["eager"], runs["chunked"]
    assert loss_c.item() == pytest.approx(loss_e.item(), rel=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)
    assert window_c == window_e

    batch = collated_batch(trainer, kind)
    with torch.no_grad():
        ids, attention = batch["input_ids"], batch["attention_mask"]
        student = jsd_log_probs(trainer.model(input_ids=ids, attention_mask=attention).logits[:, :-1])
        teacher = jsd_log_probs(trainer.teacher_model(input_ids=ids, attention_mask=attention).logits[:, :-1])
    completion = batch["labels"][:, 1:] != -100
    proposals = ids[:, 1:] if kind == ON_POLICY else student.argmax(-1)
    expected = reference(teacher, proposals, completion)
    suffix = "on" if kind == ON_POLICY else "off"
    assert window_e[f"gated_{suffix}"] == completion.sum().item()
    assert 0 < window_e[f"accepted_{suffix}"] == expected.sum().item() < completion.sum().item()


def test_distillation_trainer_trains_with_the_rule(tmp_path, confident):
    tokenizer = make_tokenizer()
    args = SpecKDDistillationConfig(
        output_dir=str(tmp_path),
        **TINY_ARGS,
        per_device_train_batch_size=4,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        gate="confident",
    )
    trainer = SpecKDDistillationTrainer(
        model=make_model(0, tokenizer),
        teacher_model=make_model(1, tokenizer),
        args=args,
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )
    assert trainer._gate.rule.name == "confident"
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert 0 <= log["gate/acceptance_rate"] < 1 and "gate/top_k" not in log


def test_skd_generation_verifies_and_replaces_with_the_rule(confident):
    """Every emitted token passes the rule under the teacher: an accepted draft, or the teacher's replacement from
    its confident tokens; drafts were replaced somewhere."""
    tokenizer = make_tokenizer()
    student, teacher = make_model(0, tokenizer), make_model(1, tokenizer)
    prompts = torch.randint(4, 96, (4, 5), generator=torch.Generator().manual_seed(0))
    sequences, stats = speculative_generate(
        student,
        teacher,
        prompts,
        torch.ones_like(prompts),
        gate="confident",
        max_new_tokens=8,
        pad_token_id=0,
        generator=torch.Generator().manual_seed(1),
    )
    assert stats.replaced_tokens > 0 and not torch.equal(stats.proposals, sequences)
    with torch.no_grad():
        logits = teacher(input_ids=sequences).logits[:, prompts.size(1) - 1 : -1]
    completion = sequences[:, prompts.size(1) :]
    assert bool(reference(logits, completion, torch.ones_like(completion, dtype=torch.bool)).all())


class EntropyGate(GateRule):
    """Accept iff the proposal's surprisal under the teacher is at most the teacher's entropy: it reads the whole
    distribution, and declares nothing narrower (`teacher_reads` keeps its default, ``{"full"}``)."""

    name = "entropy"

    def accept(self, student_logits, teacher_logits, proposals, *, top_k, uniforms, normalized=False):
        log_p = teacher_logits.float() if normalized else torch.log_softmax(teacher_logits.float(), dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        return -log_p.gather(-1, proposals.unsqueeze(-1)).squeeze(-1) <= entropy


class TopTwoGate(EntropyGate):
    """Accept iff the proposal is among the teacher's two best tokens; declares that it reads only its top-k."""

    name = "top_two"
    teacher_reads = frozenset({"top_k"})

    def accept(self, student_logits, teacher_logits, proposals, *, top_k, uniforms, normalized=False):
        return get_rule("topk").accept(student_logits, teacher_logits, proposals, top_k=2, uniforms=None)


@pytest.fixture
def partial_rules(monkeypatch):
    for rule in (EntropyGate, TopTwoGate):
        monkeypatch.setitem(GATE_RULES, rule.name, rule)


def test_a_rule_reading_the_whole_teacher_is_refused_where_the_teacher_is_partial(tmp_path, partial_rules):
    """What a rule reads is declared once (`GateRule.teacher_reads`); a server teacher (top-k and the sampled
    token's log-probability) and a teacher cache (top-K) refuse a rule that reads more, naming it and what it lacks.
    A loaded teacher serves it."""
    server = dict(**TINY_ARGS, output_dir=str(tmp_path), teacher_model_server_url="http://teacher.invalid:8000")
    with pytest.raises(ValueError, match=r"gate='entropy' reads the teacher's whole distribution, which a teacher "
                       r"server .* does not hold. Use a gate that reads only what it holds \('topk', 'spec', "
                       r"'none', 'top_two'\)"):  # fmt: skip
        SpecKDServerDistillationConfig(**server, gate="entropy")
    with pytest.raises(ValueError, match=r"gate='entropy' reads the teacher's whole distribution, which "
                       r"teacher_cache='c' \(the teacher's top-K tokens only\) does not hold"):  # fmt: skip
        SpecKDConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="entropy", teacher_cache="c")
    with pytest.raises(ValueError, match=r"gate='spec' reads the teacher's log-probability of the proposed token"):
        SpecKDConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="spec", teacher_cache="c")
    SpecKDServerDistillationConfig(**server, gate="top_two")  # declared top-k only: served by both
    SpecKDConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="top_two", teacher_cache="c")
    SpecKDConfig(output_dir=str(tmp_path), **TINY_ARGS, gate="entropy")  # a loaded teacher holds everything
