"""`speckd_trl.rules` against slow, obviously-correct loop references on random logits."""

import math

import pytest
import torch

from speckd_trl.metrics import sequence_rewards
from speckd_trl.rules import accept_mask, propose, teacher_rank


B, T, V = 3, 7, 11


def random_logits(seed: int, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties, also at the top-k boundary
        student = torch.randint(-2, 3, (B, T, V), generator=g).float()
        teacher = torch.randint(-2, 3, (B, T, V), generator=g).float()
    else:
        student = torch.randn(B, T, V, generator=g) * 2
        teacher = torch.randn(B, T, V, generator=g) * 2
    proposals = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    return student, teacher, proposals, mask


def topk_reference(teacher, proposals, mask, k):
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            z = teacher[b, t].tolist()
            order = sorted(range(V), key=lambda v: (-z[v], v))  # descending logit, lower id first on ties
            out[b, t] = proposals[b, t].item() in order[:k]
    return out


def spec_reference(student, teacher, proposals, mask, u):
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            x = proposals[b, t].item()
            p = torch.softmax(teacher[b, t].double(), -1)[x].item()
            q = torch.softmax(student[b, t].double(), -1)[x].item()
            out[b, t] = u[b, t].item() < min(1.0, p / q)
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 5, V - 1, V])
def test_topk_matches_reference(k, ties):
    for seed in range(5):
        student, teacher, proposals, mask = random_logits(seed, ties)
        got = accept_mask(student, teacher, proposals, mask, gate="topk", top_k=k)
        assert got.dtype == torch.bool and got.shape == (B, T)
        assert torch.equal(got, topk_reference(teacher, proposals, mask, k))


def test_topk_tie_at_boundary_prefers_lower_id():
    teacher = torch.tensor([[[3.0, 1.0, 2.0, 2.0, 2.0]]])  # ranks: 0, 4, 1, 2, 3
    mask = torch.ones(1, 1, dtype=torch.bool)
    verdicts = [
        accept_mask(teacher, teacher, torch.tensor([[x]]), mask, gate="topk", top_k=2).item() for x in range(5)
    ]
    assert verdicts == [True, False, True, False, False]
    assert teacher_rank(teacher.expand(1, 5, 5), torch.arange(5).view(1, 5)).tolist() == [[0, 4, 1, 2, 3]]


def test_topk_with_k_at_least_vocab_accepts_all_masked():
    student, teacher, proposals, mask = random_logits(0, ties=True)
    assert torch.equal(accept_mask(student, teacher, proposals, mask, gate="topk", top_k=V), mask)
    assert torch.equal(accept_mask(student, teacher, proposals, mask, gate="topk", top_k=10 * V), mask)


def test_spec_matches_reference_with_fixed_generator():
    for seed in range(5):
        student, teacher, proposals, mask = random_logits(seed)
        got = accept_mask(
            student, teacher, proposals, mask, gate="spec", generator=torch.Generator().manual_seed(seed)
        )
        u = torch.rand(B, T, generator=torch.Generator().manual_seed(seed))  # the same draws, in the same order
        assert torch.equal(got, spec_reference(student, teacher, proposals, mask, u))
        again = accept_mask(
            student, teacher, proposals, mask, gate="spec", generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(got, again)


def test_spec_mean_acceptance_is_one_minus_total_variation():
    """x ~ q and u ~ U(0,1): E[accept] = sum_x q(x) min(1, p(x)/q(x)) = 1 - TV(p, q)."""
    g = torch.Generator().manual_seed(0)
    n, vocab = 4, 6
    student = torch.randn(n, 1, vocab, generator=g)
    teacher = torch.randn(n, 1, vocab, generator=g)
    draws = 20000
    student_rep = student.expand(n, draws, vocab)
    teacher_rep = teacher.expand(n, draws, vocab)
    proposals = propose(student_rep, mode="sample", generator=g)
    mask = torch.ones(n, draws, dtype=torch.bool)
    accepted = accept_mask(student_rep, teacher_rep, proposals, mask, gate="spec", generator=g)
    p, q = torch.softmax(teacher[:, 0], -1), torch.softmax(student[:, 0], -1)
    expected = 1 - 0.5 * (p - q).abs().sum(-1)
    tolerance = 4 * math.sqrt(0.25 / draws)  # 4 sigma of a Bernoulli mean
    assert torch.allclose(accepted.float().mean(-1), expected, atol=tolerance)


def test_spec_accepts_everything_when_student_equals_teacher():
    student, _, proposals, mask = random_logits(3)
    got = accept_mask(student, student.clone(), proposals, mask, gate="spec", generator=torch.Generator())
    assert torch.equal(got, mask)


def test_spec_with_temperature_scaled_proposal_distribution():
    """The gate reads q from the logits it is given: scaling by 1/temperature changes q, hence the verdicts."""
    student, teacher, proposals, mask = random_logits(4)
    tau = 0.7
    got = accept_mask(student / tau, teacher, proposals, mask, gate="spec", generator=torch.Generator().manual_seed(1))
    u = torch.rand(B, T, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, spec_reference(student / tau, teacher, proposals, mask, u))


@pytest.mark.parametrize("gate", ["topk", "spec", "none"])
def test_masked_positions_are_never_accepted(gate):
    student, teacher, proposals, _ = random_logits(5)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :3] = True
    got = accept_mask(student, teacher, proposals, mask, gate=gate, generator=torch.Generator())
    assert not got[~mask].any()
    if gate == "none":
        assert torch.equal(got, mask)


def test_propose_greedy_and_sample():
    student, _, _, _ = random_logits(6)
    assert torch.equal(propose(student, mode="greedy"), student.argmax(-1))
    draws = propose(student[:1, :1].expand(1, 20000, V), mode="sample", generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.flatten(), minlength=V).float() / draws.numel()
    assert torch.allclose(freq, torch.softmax(student[0, 0], -1), atol=0.02)
    never = torch.full((1, 500, V), -float("inf"))
    never[..., 4] = 0.0
    assert (propose(never, mode="sample", generator=torch.Generator()) == 4).all()


def test_sequence_rewards():
    accepted = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    gated = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert sequence_rewards(accepted, gated).tolist() == pytest.approx([2 / 3, 0.5])


@pytest.mark.parametrize("kwargs", [{"gate": "bogus"}, {"gate": "topk", "top_k": 0}])
def test_bad_arguments_raise(kwargs):
    student, teacher, proposals, mask = random_logits(0)
    with pytest.raises(ValueError, match="accept_mask"):
        accept_mask(student, teacher, proposals, mask, **kwargs)


@pytest.mark.parametrize("seed", range(4))
def test_log_probs_in_place_of_logits_give_the_same_verdicts(seed):
    """The trainer passes the divergence's log-probabilities (`normalized=True`): same verdicts as from logits."""
    student, teacher, proposals, mask = random_logits(seed)
    u = torch.rand(B, T, generator=torch.Generator().manual_seed(seed))
    log_q, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    spec = accept_mask(log_q, log_p, proposals, mask, gate="spec", uniforms=u, normalized=True)
    assert torch.equal(spec, spec_reference(student, teacher, proposals, mask, u))
    for k in (1, 3, 7):
        topk = accept_mask(log_q, log_p, proposals, mask, gate="topk", top_k=k, normalized=True)
        assert torch.equal(topk, topk_reference(teacher, proposals, mask, k))
