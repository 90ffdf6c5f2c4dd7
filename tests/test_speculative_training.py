"""Training on speculatively generated sequences (`on_policy_generation="speculative"`).

Such a sequence mixes the student's accepted drafts with the teacher's replacements of rejected ones. The gate and the
reward term must score what the student sampled at each position (its draft), never a teacher replacement: a
replacement was not the student's action, and under `topk` it is in the teacher's top-k by construction.
"""

import pytest
import torch

from speckd_trl import SpecKDTrainer, speculative_generate
from speckd_trl.batches import KIND_KEY, ON_POLICY, PROPOSALS_KEY
from speckd_trl.rules import accept_mask
from speckd_trl.tools.testing import make_model, make_tokenizer, make_trainer


TOP_K = 3


def build(tmp_path, **overrides) -> SpecKDTrainer:
    defaults = dict(per_device_train_batch_size=4, max_new_tokens=8, max_steps=2, lmbda=1.0)
    defaults.update(on_policy_generation="speculative", gate="topk", gate_top_k=TOP_K, gate_draft_len=3)
    return make_trainer(tmp_path, **{**defaults, **overrides})


def speculative_batch(trainer: SpecKDTrainer) -> dict:
    """A micro-batch of the trainer's own speculative on-policy generation, with some drafts replaced."""
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._make_completions(batch)
    assert inputs[KIND_KEY] == ON_POLICY
    return inputs


def drafts_and_replaced(inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The drafts, the completion mask and where the teacher replaced the draft, all `[B, T]` after the shift."""
    completion = inputs["labels"][:, 1:] != -100
    drafts = inputs[PROPOSALS_KEY][:, 1:]
    replaced = completion & (drafts != inputs["input_ids"][:, 1:])
    assert replaced.any() and (completion & ~replaced).any(), "the test needs accepted and replaced drafts"
    return drafts, completion, replaced


def test_proposals_are_the_drafts_and_differ_exactly_where_replaced():
    tokenizer = make_tokenizer()
    student, teacher = make_model(0, tokenizer).eval(), make_model(1, tokenizer).eval()
    tokenizer.padding_side = "left"
    prompts = tokenizer(["<|im_start|>user what is 3 + 4", "<|im_start|>user 5"], padding=True, return_tensors="pt")
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    generator = torch.Generator().manual_seed(0)
    sequences, stats = speculative_generate(student, teacher, ids, mask, gate="topk", top_k=TOP_K, draft_len=3,
                                            max_new_tokens=10, pad_token_id=tokenizer.pad_token_id,
                                            generator=generator)  # fmt: skip
    assert stats.proposals.shape == sequences.shape
    prompt_width = ids.size(1)
    torch.testing.assert_close(stats.proposals[:, :prompt_width], sequences[:, :prompt_width])
    # a topk replacement is in the teacher's top-k and the rejected draft is not: they always differ
    assert int((stats.proposals != sequences).sum()) == stats.replaced_tokens > 0


def test_logged_acceptance_is_the_generations(tmp_path):
    """Every generated token stands at a draft; the replaced ones were rejected: on-policy acceptance under `topk`
    is 1 - the replaced fraction (the same counts, the same logging window)."""
    trainer = build(tmp_path, logging_steps=1)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["gen/replaced_fraction"] > 0
        assert entry["gate/acceptance_rate_on_policy"] == pytest.approx(1 - entry["gen/replaced_fraction"])


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_the_gate_verifies_the_drafts_not_the_replacements(tmp_path, loss_path):
    trainer = build(tmp_path, loss_path=loss_path)
    inputs = speculative_batch(trainer)
    _, completion, replaced = drafts_and_replaced(inputs)
    trainer.model.train()
    trainer.compute_loss(trainer.model, inputs)
    window = trainer._gate.window
    # topk at the same k: exactly the generation's verdicts (an accepted draft again, a replaced one rejected again)
    assert window["gated_on"] == int(completion.sum())
    assert window["accepted_on"] == int((completion & ~replaced).sum())


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
@pytest.mark.parametrize("gate", ["topk", "spec"])
def test_the_reward_term_scores_the_students_drafts(tmp_path, loss_path, gate):
    """kd_coef=0: the loss is -c * sum (r - b) log q_tau(draft) / N, r the gate's verdicts on the drafts."""
    coef, temperature = 0.7, 0.8
    trainer = build(tmp_path, gate=gate, kd_coef=0.0, reward_coef=coef, temperature=temperature, loss_path=loss_path)
    inputs = speculative_batch(trainer)
    drafts, completion, _ = drafts_and_replaced(inputs)
    trainer.model.train()
    trainer._gate.generator.manual_seed(5)
    loss = trainer.compute_loss(trainer.model, inputs)

    trainer._gate.generator.manual_seed(5)
    u = torch.rand(completion.shape, generator=trainer._gate.generator) if gate == "spec" else None
    model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        logits = trainer.model(**model_inputs).logits[:, :-1]
        teacher = trainer.teacher_model(**model_inputs).logits[:, :-1]
    r = accept_mask(logits / temperature, teacher, drafts, completion, gate=gate, top_k=TOP_K, uniforms=u)
    assert 0 < r[completion].float().mean() < 1  # both rewards occur: the term is not trivially 0
    logq = torch.log_softmax(logits / temperature, dim=-1).gather(-1, drafts[..., None]).squeeze(-1)
    b = r[completion].float().mean()
    expected = -coef * ((r.float() - b) * logq)[completion].sum() / completion.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_per_sample_mixing_keeps_the_drafts_of_the_on_policy_rows(tmp_path):
    trainer = build(tmp_path, lmbda=0.5, mixing="sample")
    inputs = trainer._make_completions(next(iter(trainer.get_train_dataloader())))
    on_policy = inputs["speckd_on_policy"]
    proposals, input_ids = inputs[PROPOSALS_KEY], inputs["input_ids"]
    assert torch.equal(proposals[~on_policy], input_ids[~on_policy])  # dataset rows: their own tokens
    assert bool((proposals[on_policy] != input_ids[on_policy]).any())  # on-policy rows: some drafts replaced
