"""The lab's capacity axis (`benchmarks/lab_capacity.py`) and its gate-rule variants (`benchmarks/lab_rules.py`)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from speckd_trl.rules import GATE_RULES, accept_mask


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """`lab_capacity`, `lab_rules` and `lab_process`, imported from their folder (they import each other)."""
    path = str(ROOT / "benchmarks")
    sys.path.insert(0, path)  # (imported by name: the worker processes unpickle `lab_capacity.run` by name)
    rules = dict(GATE_RULES)
    try:
        yield {name: importlib.import_module(name) for name in ("lab_process", "lab_rules", "lab_capacity")}
    finally:
        sys.path.remove(path)
        GATE_RULES.clear()  # the variants registered here leave the package's rules as they were
        GATE_RULES.update(rules)


def entropy(logits: torch.Tensor) -> float:
    p = torch.softmax(logits.double(), -1)
    return -(p * p.log()).sum().item()


def in_top_k(logits: torch.Tensor, token: int, k: int) -> bool:
    z = logits.tolist()
    return token in sorted(range(len(z)), key=lambda v: (-z[v], v))[:k]


@pytest.mark.parametrize("normalized", [False, True])
def test_variant_rules_match_a_loop_reference(bench, normalized):
    rules = bench["lab_rules"]
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 6, 20, generator=g) * torch.rand(3, 6, 1, generator=g) * 6
    teacher = torch.randn(3, 6, 20, generator=g) * torch.rand(3, 6, 1, generator=g) * 6
    proposals, mask = torch.randint(0, 20, (3, 6), generator=g), torch.rand(3, 6, generator=g) > 0.2
    s_in, t_in = (student.log_softmax(-1), teacher.log_softmax(-1)) if normalized else (student, teacher)
    for base, threshold in (("topk_uncertain", 1.5), ("student_uncertain", 2.0)):
        name = rules.variant(base, threshold)
        got = accept_mask(s_in, t_in, proposals, mask, gate=name, top_k=3, normalized=normalized)
        for b, t in mask.nonzero().tolist():
            if base == "topk_uncertain":
                want = entropy(teacher[b, t]) < threshold or in_top_k(teacher[b, t], proposals[b, t].item(), 3)
            else:
                want = entropy(student[b, t]) >= threshold
            assert got[b, t].item() == want, (base, b, t)
        assert not got[~mask].any() and 0 < got[mask].float().mean() < 1


def test_hard_slots_are_a_pair_lookup_and_the_teacher_knows_them(bench):
    lp = bench["lab_process"]
    try:
        lp.configure((0, 2))
        prompt = [1, 2, 3, 4]
        answer = lp.deterministic_answer(prompt)
        assert answer[0] == lp.DIGIT0 + lp.HARD_TABLE[1][2] and answer[2] == lp.DIGIT0 + lp.HARD_TABLE[3][4]
        assert answer[1] == lp.DIGIT0 + lp.PERM[2] and answer[3] == lp.DIGIT0 + lp.PERM[4]
        ids = torch.tensor([lp.prompt_ids(prompt) + lp.sample_answer(prompt, __import__("random").Random(0))])
        teacher = lp.OracleTeacher(lp.OracleTeacherConfig(noise=0.0))
        p = teacher.probabilities(ids)[0]
        start = len(lp.prompt_ids(prompt)) - 1  # the position after `assistant` predicts answer slot 0
        assert p[start].argmax().item() == answer[0] and p[start + 4].argmax().item() == answer[2]
        with pytest.raises(ValueError, match="hard_slots"):
            lp.configure((4,))
    finally:
        lp.configure(())


def test_quick_capacity_run(bench, tmp_path):
    capacity = bench["lab_capacity"]
    threads = torch.get_num_threads()
    try:
        summary = capacity.main(["--quick", "--workers", "1", "--sizes", "16,32", "--methods",
                                 "gkd,speckd-topk,speckd-topk-uncertain", "--plot", str(tmp_path / "cap.png"),
                                 "--log", str(tmp_path / "cap")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert summary["chosen"]["speckd-topk-uncertain"]["rule"][0] == "topk_uncertain"
    saved = json.loads((tmp_path / "cap.json").read_text())
    rows = saved["rows"]
    assert len(rows) == 2 * 2 * 3  # sizes x seeds x methods
    for row in rows:
        assert set(row["budgets"]) == {"4", "8"}
        for metrics in row["budgets"].values():
            assert all(math.isfinite(metrics[m]) for m in ("kl_all", "kl_easy", "kl_hard", "kl_ent"))
    mean, half, seeds = summary["kl_all_minus_gkd"]["speckd-topk/16/8"]
    assert seeds == 2 and math.isfinite(mean) and (tmp_path / "cap.png").stat().st_size > 0


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_filter_all_distils_every_position_toward_the_teacher_top_k(bench, tmp_path, loss_path):
    """`topk_filter_all` with target filtering at full weight, on a dataset batch: KL(top-k target || student) at
    every completion position, over the completion tokens (beta=0); every proposal rejected."""
    from speckd_trl.batches import OFF_POLICY
    from speckd_trl.tools.testing import collated_batch, make_trainer

    name = bench["lab_rules"].variant("topk_filter_all")
    trainer = make_trainer(tmp_path, gate=name, gate_top_k=3, loss_path=loss_path, beta=0.0, reject_target="top_k",
                           reject_weight=1.0)  # fmt: skip
    batch = collated_batch(trainer, OFF_POLICY)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=None)
    with torch.no_grad():
        ids, attn = batch["input_ids"], batch["attention_mask"]
        s_lp = trainer.model(input_ids=ids, attention_mask=attn).logits[:, :-1].double().log_softmax(-1)
        t_lp = trainer.teacher_model(input_ids=ids, attention_mask=attn).logits[:, :-1].double().log_softmax(-1)
    completion = batch["labels"][:, 1:] != -100
    total = 0.0
    for b, t in completion.nonzero().tolist():
        p = t_lp[b, t].exp().tolist()
        top = sorted(range(len(p)), key=lambda v: (-p[v], v))[:3]
        mass = sum(p[v] for v in top)
        total += sum(p[v] / mass * (math.log(p[v] / mass) - s_lp[b, t, v].item()) for v in top)
    assert loss.item() == pytest.approx(total / completion.sum().item(), rel=1e-4)
    assert trainer._gate.window["accepted_off"] == 0 < trainer._gate.window["gated_off"]


def test_oracle_teacher_with_a_cache_matches_full_sequences(bench):
    """Incremental calls (SKD generation) see the whole context through the cache, and a crop forgets the tokens
    after it, as a model's key-value cache does."""
    from transformers import DynamicCache

    lp = bench["lab_process"]
    teacher = lp.OracleTeacher(lp.OracleTeacherConfig(noise=0.3))
    ids = torch.tensor([lp.prompt_ids([1, 2, 3, 4]) + lp.sample_answer([1, 2, 3, 4], __import__("random").Random(0))])
    full = teacher(input_ids=ids).logits
    cache, cut = DynamicCache(config=teacher.config), ids.size(1) - 5
    first = teacher(input_ids=ids[:, :cut], past_key_values=cache).logits
    wrong = teacher(input_ids=torch.full((1, 3), lp.DIGIT0), past_key_values=cache).logits  # drafts, then rejected
    cache.crop(-3)  # (transformers: a negative count of tokens to remove)
    rest = teacher(input_ids=ids[:, cut:], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), full)
    assert not torch.allclose(wrong, full[:, cut : cut + 3])


def test_lab_trainer_edits_rollouts_under_the_ungated_loss(bench, tmp_path):
    """SKD's rollout editing with the full loss (`skd-full`): `gate="none"` with `generation_gate="topk"` replaces
    drafts the teacher rejects, and the loss gates nothing: the same loss as `gate="none"` on the same sequences."""
    from speckd_trl.batches import PROPOSALS_KEY
    from speckd_trl.tools.testing import make_trainer

    rules = bench["lab_rules"]
    settings = dict(per_device_train_batch_size=4, max_new_tokens=8, max_steps=2, lmbda=1.0, gate="none",
                    on_policy_generation="speculative", gate_top_k=3, gate_draft_len=3, logging_steps=1)  # fmt: skip
    trainer = make_trainer(tmp_path / "skd", **settings)
    trainer.__class__ = rules.LabSpecKDTrainer
    trainer.generation_gate = "topk"
    inputs = trainer._make_completions(next(iter(trainer.get_train_dataloader())))
    completion = inputs["labels"][:, 1:] != -100
    assert (completion & (inputs[PROPOSALS_KEY][:, 1:] != inputs["input_ids"][:, 1:])).any()  # drafts replaced
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    plain = make_trainer(tmp_path / "plain", **settings)
    plain.model.load_state_dict(trainer.model.state_dict())
    plain.model.train()
    torch.testing.assert_close(plain.compute_loss(plain.model, inputs), loss)
    trainer.train()
    assert all(e["gen/replaced_fraction"] > 0 for e in trainer.state.log_history if "loss" in e)
