"""`SpecKDServerDistillationTrainer` in-process: TRL's server request and alignment, with a client that scores the
sequences with a local teacher the way the vLLM server does (`LocalTeacherClient`). The server itself (vLLM on a GPU)
is not reachable here; the GPU script runs it."""

import math
from types import SimpleNamespace

import pytest
import torch
from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

from speckd_trl import SpecKDServerDistillationConfig, SpecKDServerDistillationTrainer
from speckd_trl.tools.testing import (
    TINY_ARGS,
    VOCAB_SIZE,
    LocalTeacherClient,
    make_dataset,
    make_model,
    make_prompt_dataset,
    make_tokenizer,
)


@pytest.fixture
def local_teacher(monkeypatch):
    """The tiny teacher behind every `VLLMClient` the trainers build (TRL imports the class at `__init__`)."""
    teacher = make_model(1, make_tokenizer()).eval()
    monkeypatch.setattr("trl.generation.vllm_client.VLLMClient", lambda *args, **kwargs: LocalTeacherClient(teacher))
    return teacher


SERVER_ARGS = dict(teacher_model_server_url="http://teacher.invalid:8000", max_completion_length=6, beta=0.0)


def server_trainer(tmp_path, ours=True, **overrides):
    tokenizer = make_tokenizer()
    config = SpecKDServerDistillationConfig if ours else ServerDistillationConfig
    args = config(
        **{**TINY_ARGS, **SERVER_ARGS, "output_dir": str(tmp_path / ("ours" if ours else "trl")), **overrides}
    )
    trainer = (SpecKDServerDistillationTrainer if ours else ServerDistillationTrainer)(
        model=make_model(0, tokenizer),
        args=args,
        train_dataset=make_dataset() if ours else make_prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, read by TRL's server loss
    return trainer


def server_batch(rows=4, prompt_len=5, completion_len=6, seed=0):
    """A generation batch as `DistillationTrainer` makes it: prompts left-padded, completions right-padded."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, VOCAB_SIZE, (rows, prompt_len), generator=g)
    completion_ids = torch.randint(4, VOCAB_SIZE, (rows, completion_len), generator=g)
    prompt_mask, completion_mask = torch.ones_like(prompt_ids), torch.ones_like(completion_ids)
    for r in range(rows):
        prompt_mask[r, : r % 3] = 0
        completion_mask[r, completion_len - r % 2 * 2 :] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask)  # fmt: skip


def test_with_gate_none_the_loss_and_gradients_are_trls(tmp_path, local_teacher):
    batch = server_batch()
    results = []
    for ours in (True, False):
        extra = dict(gate="none") if ours else {}
        trainer = server_trainer(tmp_path, ours=ours, loss_top_k=8, **extra)
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (ours_loss, ours_grads), (trl_loss, trl_grads) = results
    assert ours_loss == pytest.approx(trl_loss, rel=1e-5)
    for name in trl_grads:
        torch.testing.assert_close(ours_grads[name], trl_grads[name], rtol=1e-4, atol=1e-7)


def test_the_topk_gate_matches_a_by_hand_reference_on_the_local_teacher(tmp_path, local_teacher):
    k_gate, k_server, reject_weight = 3, 8, 0.25
    trainer = server_trainer(
        tmp_path, loss_top_k=k_server, gate="topk", gate_top_k=k_gate, reject_weight=reject_weight
    )
    batch = server_batch(seed=1)
    loss = trainer.compute_loss(trainer.model, batch).item()
    with torch.no_grad():
        total, tokens, accepted = 0.0, 0, 0
        for r in range(batch["prompt_ids"].size(0)):
            ids = torch.cat([batch["prompt_ids"][r][batch["prompt_mask"][r].bool()],
                             batch["completion_ids"][r][batch["completion_mask"][r].bool()]])  # fmt: skip
            n_prompt = int(batch["prompt_mask"][r].sum())
            s = trainer.model(input_ids=ids[None]).logits[0].double().log_softmax(-1)
            t = local_teacher(input_ids=ids[None]).logits[0].double().log_softmax(-1)
            for pos in range(n_prompt - 1, len(ids) - 1):
                teacher, student = t[pos].tolist(), s[pos].tolist()
                top = sorted(range(VOCAB_SIZE), key=lambda v: -teacher[v])
                ok = int(ids[pos + 1]) in top[:k_gate]
                p = [math.exp(teacher[v]) for v in top[:k_server]]
                q = [math.exp(student[v]) for v in top[:k_server]]
                p, q = p + [1 - sum(p)], q + [1 - sum(q)]
                total += (1.0 if ok else reject_weight) * sum(x * math.log(x / y) for x, y in zip(p, q))
                tokens, accepted = tokens + 1, accepted + ok
    assert 0 < accepted < tokens
    assert loss == pytest.approx(total / tokens, rel=1e-4)


@pytest.mark.parametrize("gate", [dict(gate="topk", gate_top_k=4), dict(gate="spec")])
def test_it_trains_with_the_local_teacher(tmp_path, local_teacher, gate):
    trainer = server_trainer(tmp_path, loss_top_k=8, max_steps=2, logging_steps=1, learning_rate=1e-3,
                             per_device_train_batch_size=4, **gate)  # fmt: skip
    trainer.train()
    rates = [e["gate/acceptance_rate"] for e in trainer.state.log_history if "gate/acceptance_rate" in e]
    assert trainer.state.global_step == 2 and len(rates) == 2 and all(0 <= r <= 1 for r in rates)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(beta=0.5), "beta=0.5 is not gated on a server teacher"),
        (dict(loss_add_tail=False), "loss_add_tail=False is not gated"),
        (dict(loss_top_k=4, gate_top_k=5), r"reads the teacher's top 5 tokens .* loss_top_k=4"),
        # ties at the k-th place: the server's top-k is cut at an arbitrary tied token (#34)
        (dict(loss_top_k=5, gate_top_k=5), r"top 5 tokens .* loss_top_k=5, cut at an arbitrary token .* >= 6"),
        (dict(gate="spec", temperature=0.7), "gate='spec' with temperature=0.7"),
    ],
)
def test_settings_the_server_cannot_serve_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        SpecKDServerDistillationConfig(**{**TINY_ARGS, **SERVER_ARGS, "output_dir": str(tmp_path), **overrides})


def test_the_defaults_are_the_gated_loss(tmp_path):
    args = SpecKDServerDistillationConfig(**TINY_ARGS, output_dir=str(tmp_path), teacher_model_server_url="http://t")
    assert (args.beta, args.loss_top_k, args.loss_add_tail, args.vllm_server_port) == (0.0, 20, True, 8001)


def test_ties_inside_the_returned_set_go_to_the_lower_id(tmp_path):
    """The server lists its top-K in torch.topk's order (ties in no fixed order); with gate_top_k < loss_top_k the
    gate ranks the returned tokens itself, so a tie at the k-th place goes to the lower id as on the full teacher."""
    from speckd_trl.rules import get_rule
    from speckd_trl.server_trainer import server_sparse_teacher

    logits = torch.full((1, 1, 40), -5.0)
    logits[..., [30, 12, 20, 7, 25]] = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0])  # 4 tokens tie at places 2-5
    full = torch.log_softmax(logits, dim=-1)
    order = torch.tensor([30, 25, 20, 12, 7, 0])  # as a server may list them: ties by descending id
    result = {"topk_logprobs": full[..., order], "topk_token_ids": order.expand(1, 1, 6),
              "actual_logprobs": full[..., 0]}  # fmt: skip
    _, view = server_sparse_teacher(result, torch.ones(1, 1, dtype=torch.bool), 40)
    rule = get_rule("topk")
    for k in (2, 3, 4):
        for token in (7, 12, 20, 25, 30):
            proposal = torch.tensor([[token]])
            expected = rule.accept(full, full, proposal, top_k=k, uniforms=None, normalized=True)
            assert torch.equal(rule.accept(view, view, proposal, top_k=k, uniforms=None, normalized=True), expected)


# ---------------------------------------------------------------------------- a teacher with a larger padded vocabulary


class PaddedTeacher(torch.nn.Module):
    """The tiny teacher with `extra` padding rows after its `VOCAB_SIZE` outputs (a teacher whose embedding is padded
    beyond the student's, as Qwen2.5-7B's 152064 against Qwen2.5-0.5B's 151936), scoring above every real token."""

    def __init__(self, model, extra=4):
        super().__init__()
        self.model, self.extra = model, extra

    @property
    def device(self):
        return self.model.device

    def forward(self, input_ids):
        logits = self.model(input_ids=input_ids).logits
        above = logits.max(dim=-1, keepdim=True).values + 0.05 * torch.arange(1, self.extra + 1)
        return SimpleNamespace(logits=torch.cat([logits, above], dim=-1))


@pytest.fixture
def padded_teacher(monkeypatch):
    teacher = PaddedTeacher(make_model(1, make_tokenizer()).eval())
    monkeypatch.setattr("trl.generation.vllm_client.VLLMClient", lambda *args, **kwargs: LocalTeacherClient(teacher))
    return teacher


@pytest.mark.parametrize("gate", [dict(gate="none"), dict(gate="topk", gate_top_k=3, reject_weight=0.25)])
def test_ids_past_the_students_vocabulary_go_to_the_tail_and_never_count_for_the_gate(tmp_path, padded_teacher, gate):
    """#34: the server returns ids 96-99, which the student (96 tokens) does not have: their mass is in the tail
    bucket (the student puts none on them), and the topk gate ranks the sampled token among the student's ids only."""
    k_server = 8
    trainer = server_trainer(tmp_path, loss_top_k=k_server, **gate)
    batch = server_batch(seed=1)
    loss = trainer.compute_loss(trainer.model, batch).item()
    with torch.no_grad():
        total, tokens, accepted = 0.0, 0, 0
        for r in range(batch["prompt_ids"].size(0)):
            ids = torch.cat([batch["prompt_ids"][r][batch["prompt_mask"][r].bool()],
                             batch["completion_ids"][r][batch["completion_mask"][r].bool()]])  # fmt: skip
            n_prompt = int(batch["prompt_mask"][r].sum())
            s = trainer.model(input_ids=ids[None]).logits[0].double().log_softmax(-1)
            t = padded_teacher(input_ids=ids[None]).logits[0].double().log_softmax(-1)  # over VOCAB_SIZE + 4 ids
            for pos in range(n_prompt - 1, len(ids) - 1):
                teacher, student = t[pos].tolist(), s[pos].tolist()
                returned = sorted(range(len(teacher)), key=lambda v: -teacher[v])[:k_server]
                assert sum(v >= VOCAB_SIZE for v in returned) == 4  # the padding rows come first
                real = [v for v in returned if v < VOCAB_SIZE]
                p = [math.exp(teacher[v]) for v in real]
                q = [math.exp(student[v]) for v in real]
                p, q = p + [1 - sum(p)], q + [1 - sum(q)]  # the tail: the padding rows' mass too (teacher side)
                ok = True
                if gate["gate"] == "topk":
                    ranked = sorted(range(VOCAB_SIZE), key=lambda v: (-teacher[v], v))  # the student's ids only
                    ok = int(ids[pos + 1]) in ranked[: gate["gate_top_k"]]
                weight = 1.0 if ok else gate["reject_weight"]
                total += weight * sum(x * math.log(x / y) for x, y in zip(p, q))
                tokens, accepted = tokens + 1, accepted + ok
    if gate["gate"] == "topk":
        assert 0 < accepted < tokens
    assert loss == pytest.approx(total / tokens, rel=1e-4)


def test_a_gate_the_padding_rows_leave_undecided_is_refused(tmp_path, padded_teacher):
    """4 of the server's top 6 are padding rows: 2 student tokens left for a top-5 gate, so a sampled token outside
    them has an unknown rank. A clear error, naming both vocabularies and the loss_top_k that would serve."""
    trainer = server_trainer(tmp_path, loss_top_k=6, gate="topk", gate_top_k=5)
    with pytest.raises(ValueError, match=r"the student has 96 tokens, the teacher's ids reach 100 .* loss_top_k >= 9"):
        trainer.compute_loss(trainer.model, server_batch(seed=1))


def test_it_trains_with_a_padded_teacher(tmp_path, padded_teacher):
    trainer = server_trainer(tmp_path, loss_top_k=10, max_steps=2, logging_steps=1, learning_rate=1e-3,
                             per_device_train_batch_size=4, gate="topk", gate_top_k=4)  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2


# ---------------------------------------------------------------------------- the sparse views against the [B, T, V] ones


@pytest.mark.parametrize("padded", [False, True])
def test_candidate_view_and_bucket_kl_equal_the_full_vocabulary_views(padded):
    """The trainer reads the server's answer on K + 1 candidates per position (`candidate_view`, `bucket_forward_kl`);
    the verdicts of `topk` (every k, ties at the k-th place included) and `spec`, and the divergence with its
    gradient, equal those on the `[B, T, V]` view and target (`with_sampled_log_probs`, `tail_bucket_target`)."""
    from speckd_trl.divergence import weighted_jsd_from_log_probs
    from speckd_trl.rules import get_rule
    from speckd_trl.server_teacher import (
        bucket_forward_kl,
        candidate_view,
        server_sparse_teacher,
        with_sampled_log_probs,
    )

    g = torch.Generator().manual_seed(0)
    B, T, V, K = 3, 7, 40, 8
    logits = torch.randn(B, T, V + (4 if padded else 0), generator=g).round()  # rounded: many ties
    full = torch.log_softmax(logits, dim=-1)
    values, ids = full.topk(K, dim=-1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, :3] = ids[0, :3, 1].clamp(max=V - 1)  # some sampled tokens inside the returned top-K
    completion = torch.ones(B, T, dtype=torch.bool)
    completion[2, 5:] = False
    result = {
        "topk_logprobs": values,
        "topk_token_ids": ids,
        "actual_logprobs": full.gather(-1, tokens[..., None])[..., 0],
    }
    teacher, dense = server_sparse_teacher(result, completion, V)
    dense = with_sampled_log_probs(dense, result["actual_logprobs"], tokens, completion)
    student = torch.log_softmax(torch.randn(B, T, V, generator=g), dim=-1)
    student_view, teacher_view, index = candidate_view(teacher, result["actual_logprobs"], tokens, completion, student)
    assert torch.equal(student_view.gather(-1, index[..., None]), student.gather(-1, tokens[..., None]))
    uniforms = torch.rand(B, T, generator=g)
    for name, ks in (("topk", (1, 2, 3, 5, 7)), ("spec", (1,))):
        rule = get_rule(name)
        for k in ks:
            expected = rule.accept(student, dense, tokens, top_k=k, uniforms=uniforms, normalized=True)
            got = rule.accept(student_view, teacher_view, index, top_k=k, uniforms=uniforms, normalized=True)
            assert torch.equal(got[completion], expected[completion]), (name, k)

    weights = torch.rand(B, T, generator=g) * completion
    logits_s = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    grads = []
    for sparse in (True, False):
        z = logits_s.clone().requires_grad_()
        log_q = torch.log_softmax(z, dim=-1)
        if sparse:
            loss = (bucket_forward_kl(teacher, log_q) * weights).sum()
        else:
            loss = weighted_jsd_from_log_probs(log_q, teacher.target(dense, log_q), weights, beta=0.0).sum()
        loss.backward()
        grads.append((loss.detach(), z.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-9)
