"""The teacher cache: its maths (top-K + tail bucket) against by-hand references and TRL's server loss, training from
a cache against training with the live teacher, and the bad inputs (another teacher, tokenizer, K or dataset, missing
or damaged shards, an interrupted build)."""

import json
import math
import shutil

import pytest
import torch

from speckd_trl import SpecKDConfig
from speckd_trl.batches import OFF_POLICY, ON_POLICY
from speckd_trl.losses import (
    SparseTeacher,
    chunked_weighted_jsd,
    sparse_log_probs,
    tail_bucket_target,
    teacher_top_k,
    weighted_jsd_from_log_probs,
)
from speckd_trl.models import OutputHead
from speckd_trl.rules import get_rule
from speckd_trl.teacher_cache import META_FILE, TeacherCache, ids_dtype
from speckd_trl.tools.testing import (
    TINY_ARGS,
    VOCAB_SIZE,
    collated_batch,
    loss_gradients_and_window,
    make_dataset,
    make_model,
    make_tokenizer,
    make_trainer,
    word_level_tokenizer,
)


def bucket_divergence(student: list[float], teacher: list[float], k: int, beta: float) -> float:
    """D_beta over the K + 1 buckets (the teacher's top-k tokens, then everything else), by hand, in float64."""
    top = sorted(range(len(teacher)), key=lambda v: -teacher[v])[:k]
    rest = [v for v in range(len(teacher)) if v not in top]
    p = [math.exp(teacher[v]) for v in top] + [sum(math.exp(teacher[v]) for v in rest)]
    q = [math.exp(student[v]) for v in top] + [sum(math.exp(student[v]) for v in rest)]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def random_log_probs(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, dim=-1)


def test_teacher_top_k_keeps_the_top_tokens_and_the_exact_tail():
    t = random_log_probs(3, 5, 20)
    ids, values, log_tail = teacher_top_k(t, 4)
    assert ids.shape == (3, 5, 4)
    torch.testing.assert_close(values, t.gather(-1, ids))
    for b in range(3):
        for i in range(5):
            rest = [v for v in range(20) if v not in ids[b, i].tolist()]
            assert log_tail[b, i].item() == pytest.approx(math.log(sum(math.exp(t[b, i, v]) for v in rest)))
    _, _, empty = teacher_top_k(t, 50)  # K >= V: no tail
    assert torch.isneginf(empty).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_tail_bucket_target_gives_the_bucket_divergence_and_its_gradient(beta, k):
    t = random_log_probs(6, 12, seed=1)
    logits = torch.randn(6, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    logits.requires_grad_(True)
    s = torch.log_softmax(logits, dim=-1)
    ids, values, log_tail = teacher_top_k(t, k)
    target = tail_bucket_target(ids, values, log_tail, s)
    ours = weighted_jsd_from_log_probs(s, target, torch.ones(6, dtype=torch.float64), beta=beta)
    for row in range(6):
        assert ours[row].item() == pytest.approx(
            bucket_divergence(s[row].tolist(), t[row].tolist(), k, beta), rel=1e-9
        )
    (grad,) = torch.autograd.grad(ours.sum(), logits, retain_graph=True)
    # the reference gradient: autograd through the bucket divergence itself (the student's tail mass included)
    in_top = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, ids, True)
    q_buckets = torch.cat([s.gather(-1, ids), torch.logsumexp(s.masked_fill(in_top, -math.inf), -1, keepdim=True)], -1)
    p_buckets = torch.cat([values, log_tail.unsqueeze(-1)], -1)
    reference = weighted_jsd_from_log_probs(q_buckets, p_buckets, torch.ones(6, dtype=torch.float64), beta=beta)
    (expected,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_tail_bucket_target_matches_trls_server_forward_kl():
    """TRL's own top-k + tail loss (`trl.experimental.server_distillation`, beta=0) on the same top-k."""
    from trl.experimental.server_distillation.server_distillation_trainer import _add_tail_bucket, _jsd_divergence

    t, s = random_log_probs(4, 7, 30, seed=3), random_log_probs(4, 7, 30, seed=4)
    ids, values, log_tail = teacher_top_k(t, 5)
    ours = weighted_jsd_from_log_probs(s, tail_bucket_target(ids, values, log_tail, s), torch.ones(4, 7), beta=0.0)
    valid = torch.ones_like(values, dtype=torch.bool)
    student_sparse, support = _add_tail_bucket(s.gather(-1, ids), valid)
    teacher_sparse, _ = _add_tail_bucket(values, valid)
    theirs = _jsd_divergence(student_sparse, teacher_sparse, beta=0.0, support_mask=support).sum(-1)
    torch.testing.assert_close(ours, theirs)


def test_with_k_covering_the_vocabulary_the_target_is_the_teacher():
    t, s = random_log_probs(5, 16, seed=5), random_log_probs(5, 16, seed=6)
    ids, values, log_tail = teacher_top_k(t, 16)
    torch.testing.assert_close(tail_bucket_target(ids, values, log_tail, s), t)


def kl_or_jsd(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """D_beta between two distributions over their last dimension (0 log 0 = 0), differentiable."""

    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if beta == 0:
        return kl(p, q)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_slots_past_the_vocabulary_go_to_the_tail_bucket(beta):
    """#34: a server teacher with a larger (padded) vocabulary lists ids >= V. Those slots are dropped and their mass
    is the tail's: the divergence and its gradient are the bucket divergence over the slots of ids < V plus the tail,
    whatever id 0 (where a dropped slot points) is: a top token (row 0), a tail token (row 1); a row of dropped slots
    only (row 2) has one bucket and no loss; a row without any (row 3) reads as before."""
    from speckd_trl.losses import no_token_slots

    V = 12
    t = random_log_probs(4, V + 3, seed=3)  # the teacher over 15 ids: 12, 13, 14 are past the student's vocabulary
    ids = torch.tensor([[0, 13, 5, 14], [13, 3, 12, 7], [12, 13, 14, 12], [2, 4, 6, 8]])
    values = t.gather(-1, ids)
    valid = no_token_slots(ids, V)
    assert valid.tolist()[3] == [True] * 4 and no_token_slots(ids[3:], V) is None
    log_tail = torch.log1p(-values.exp().masked_fill(~valid, 0).sum(-1))
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    s = torch.log_softmax(logits, dim=-1)
    target = tail_bucket_target(ids, values, log_tail, s, valid=valid)
    ours = weighted_jsd_from_log_probs(s, target, torch.ones(4, dtype=torch.float64), beta=beta)
    (grad,) = torch.autograd.grad(ours.sum(), logits, retain_graph=True)

    by_hand = []
    for r in range(4):
        real = [int(v) for v, ok in zip(ids[r], valid[r]) if ok]
        p = torch.cat([t[r, real].exp(), log_tail[r].exp().reshape(1)])
        q_top = s[r, real].exp()
        by_hand.append(kl_or_jsd(p, torch.cat([q_top, (1 - q_top.sum()).reshape(1)]), beta))
    by_hand = torch.stack(by_hand)
    (expected,) = torch.autograd.grad(by_hand.sum(), logits)
    torch.testing.assert_close(ours, by_hand)
    torch.testing.assert_close(grad, expected)
    assert ours[2].item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(target[3], tail_bucket_target(ids[3], values[3], log_tail[3], s[3]))

    view = sparse_log_probs(ids, values, V, valid=valid)  # what the gate reads: the student's ids only
    expected_view = torch.full((4, V), -1e4, dtype=torch.float64)
    for r in range(4):
        for v, ok, x in zip(ids[r].tolist(), valid[r].tolist(), values[r].tolist()):
            if ok:
                expected_view[r, v] = x
    torch.testing.assert_close(view, expected_view)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_topk_rule_reads_the_same_verdicts_from_the_sparse_teacher(k):
    t, s = random_log_probs(64, 24, seed=7), random_log_probs(64, 24, seed=8)
    proposals = s.argmax(-1)
    ids, values, _ = teacher_top_k(t, 4)
    rule = get_rule("topk")
    full = rule.accept(s, t, proposals, top_k=k, uniforms=None, normalized=True)
    sparse = rule.accept(s, sparse_log_probs(ids, values, 24), proposals, top_k=k, uniforms=None, normalized=True)
    assert torch.equal(full, sparse) and 0 < int(full.sum()) < 64
    assert get_rule("topk").teacher_reads == {"top_k"} and get_rule("spec").teacher_reads == {"proposal"}


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_chunked_path_on_a_sparse_teacher_matches_the_eager_maths(beta):
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = random_log_probs(10, 20, seed=10)
    ids, values, log_tail = teacher_top_k(t, 3)
    weights = torch.rand(10, generator=g, dtype=torch.float64)
    head = OutputHead(weight=weight, bias=None)
    total, _ = chunked_weighted_jsd(
        hidden, head, SparseTeacher(ids, values, log_tail, 20), None, lambda s_, t_, rows: weights[rows],
        beta=beta, chunk_size=3,
    )  # fmt: skip
    grads = torch.autograd.grad(total, (hidden, weight))
    s = torch.log_softmax(hidden @ weight.t(), dim=-1)
    eager = weighted_jsd_from_log_probs(s, tail_bucket_target(ids, values, log_tail, s), weights, beta=beta).sum()
    expected = torch.autograd.grad(eager, (hidden, weight))
    assert total.item() == pytest.approx(eager.item(), rel=1e-6)  # (the chunked path accumulates in float32)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_ids_are_stored_in_the_smallest_type():
    assert [ids_dtype(v) for v in (96, 256, 257, 49152, 65536, 151936)] == [
        "uint8", "uint8", "uint16", "uint16", "uint16", "uint32",
    ]  # fmt: skip


# ---------------------------------------------------------------------------- training from a cache


def cached_trainer(tmp_path, cache, *, teacher=None, train_dataset=None, student=None, **overrides):
    """A `SpecKDTrainer` on the tiny student (unless given) reading `cache`; no teacher unless given."""
    from speckd_trl import SpecKDTrainer

    tokenizer = make_tokenizer()
    args = SpecKDConfig(
        **{**TINY_ARGS, "output_dir": str(tmp_path / "cached"), "teacher_cache": str(cache), **overrides}
    )
    return SpecKDTrainer(
        model=student if student is not None else make_model(0, tokenizer),
        teacher_model=teacher,
        args=args,
        train_dataset=train_dataset if train_dataset is not None else make_dataset(),
        processing_class=tokenizer,
    )


@pytest.fixture
def full_cache(tmp_path):
    """A float32 cache of the tiny teacher with K = the vocabulary (no approximation left but storage)."""
    live = make_trainer(tmp_path / "live", loss_path="eager")
    live.cache_teacher(str(tmp_path / "cache"), top_k=VOCAB_SIZE, values_dtype="float32", shard_rows=5)
    return tmp_path / "cache"


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
@pytest.mark.parametrize("gate", [dict(gate="none"), dict(gate="topk", gate_top_k=20, reject_weight=0.5)])
def test_a_full_cache_trains_as_the_live_teacher(tmp_path, full_cache, loss_path, gate):
    settings = dict(loss_path=loss_path, lmbda=0.0, beta=0.5, **gate)
    live = make_trainer(tmp_path / "live2", **settings)
    cached = cached_trainer(tmp_path, full_cache, teacher=None, **settings)
    assert cached.teacher_model is None  # lmbda=0: no teacher loaded at all
    batch = collated_batch(live, OFF_POLICY, rows=6)
    loss_l, grads_l, window_l = loss_gradients_and_window(live, batch)
    loss_c, grads_c, window_c = loss_gradients_and_window(cached, batch)
    assert loss_c.item() == pytest.approx(loss_l.item(), rel=1e-5)
    for name in grads_l:
        torch.testing.assert_close(grads_c[name], grads_l[name], rtol=1e-4, atol=1e-7)
    assert window_c == window_l


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_a_small_k_cache_gives_the_by_hand_top_k_plus_tail_loss(tmp_path, loss_path):
    live = make_trainer(tmp_path / "live", loss_path="eager")
    live.cache_teacher(str(tmp_path / "cache"), top_k=4, values_dtype="float32", shard_rows=7)
    cached = cached_trainer(tmp_path, tmp_path / "cache", loss_path=loss_path, lmbda=0.0, beta=0.0, gate="none")
    batch = collated_batch(cached, OFF_POLICY, rows=5)
    completion = batch["labels"][:, 1:] != -100
    loss, _, _ = loss_gradients_and_window(cached, batch, num_items_in_batch=int(completion.sum()))
    with torch.no_grad():
        ids, attention = batch["input_ids"], batch["attention_mask"]
        s = cached.model(input_ids=ids, attention_mask=attention).logits[:, :-1].double().log_softmax(-1)
        t = live.teacher_model(input_ids=ids, attention_mask=attention).logits[:, :-1].double().log_softmax(-1)
    by_hand = sum(bucket_divergence(s[b, i].tolist(), t[b, i].tolist(), 4, 0.0) for b, i in completion.nonzero())
    assert loss.item() == pytest.approx(by_hand / completion.sum().item(), rel=1e-4)


def test_float16_storage_costs_little(tmp_path):
    live = make_trainer(tmp_path / "live", loss_path="eager")
    live.cache_teacher(str(tmp_path / "c16"), top_k=8, values_dtype="float16")
    live.cache_teacher(str(tmp_path / "c32"), top_k=8, values_dtype="float32")
    losses = []
    for name in ("c16", "c32"):
        trainer = cached_trainer(tmp_path / name, tmp_path / name, lmbda=0.0, gate="none")
        losses.append(loss_gradients_and_window(trainer, collated_batch(trainer, OFF_POLICY))[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)
    info = json.loads((tmp_path / "c16" / META_FILE).read_text())["spec"]
    assert (info["ids_dtype"], info["values_dtype"]) == ("uint8", "float16")


def test_training_from_a_cache_runs_without_a_teacher(tmp_path, full_cache):
    trainer = cached_trainer(tmp_path, full_cache, lmbda=0.0, max_steps=3, learning_rate=1e-3, logging_steps=1,
                             gate="topk", gate_top_k=5, reject_target="top_k", reject_weight=1.0)  # fmt: skip
    trainer.train()
    assert trainer.teacher_model is None and trainer.state.global_step == 3
    rates = [e["gate/acceptance_rate"] for e in trainer.state.log_history if "gate/acceptance_rate" in e]
    assert len(rates) == 3 and all(0.0 <= r <= 1.0 for r in rates)


def test_on_policy_batches_use_the_live_teacher(tmp_path, full_cache):
    trainer = cached_trainer(tmp_path, full_cache, teacher=make_model(1, make_tokenizer()), lmbda=0.5,
                             max_steps=3, max_new_tokens=4)  # fmt: skip
    assert trainer.teacher_model is not None
    trainer.train()
    assert trainer.state.global_step == 3


@pytest.fixture
def small_cache(tmp_path):
    """A K=4 cache of the tiny teacher (96 tokens), float16 as by default: the top-K + tail approximation is far from
    the full divergence here."""
    live = make_trainer(tmp_path / "live", loss_path="eager")
    live.cache_teacher(str(tmp_path / "small-cache"), top_k=4, shard_rows=7)
    return tmp_path / "small-cache"


def live_instead_of_cached(trainer):
    """`trainer` with its dataset batches run on the live teacher instead of the cache (as on-policy batches are)."""
    trainer._cached_teacher = lambda *args, **kwargs: None
    return trainer


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
@pytest.mark.parametrize("gate", [dict(gate="none"), dict(gate="topk", gate_top_k=3, reject_weight=0.25)])
def test_with_a_cache_the_live_teacher_gives_the_cached_loss(tmp_path, small_cache, loss_path, gate):
    """#34, one loss scale: a run that reads a cache and makes on-policy batches (lmbda > 0) cuts the live teacher to
    the same top-K + tail, so that a cached and a live batch of the same rows give the same loss, gradients and gate
    verdicts. Before, the live batches had the full divergence (a larger loss: the top-K + tail one is a lower
    bound)."""
    settings = dict(loss_path=loss_path, lmbda=0.5, beta=0.5, loss_chunk_size=7, **gate)
    trainers = [
        cached_trainer(tmp_path / name, small_cache, teacher=make_model(1, make_tokenizer()), **settings)
        for name in ("cached", "live")
    ]
    cached, live = trainers[0], live_instead_of_cached(trainers[1])
    batch = collated_batch(cached, OFF_POLICY, rows=6)
    loss_c, grads_c, window_c = loss_gradients_and_window(cached, batch)
    loss_l, grads_l, window_l = loss_gradients_and_window(live, batch)
    assert loss_l.item() == pytest.approx(loss_c.item(), rel=1e-5)
    for name in grads_c:
        torch.testing.assert_close(grads_l[name], grads_c[name], rtol=1e-4, atol=1e-7)
    assert window_l == window_c
    full = make_trainer(tmp_path / "full", **settings)  # the live teacher without a cache: the full divergence
    assert loss_gradients_and_window(full, batch)[0].item() > loss_c.item() * 1.05


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_an_on_policy_batch_and_a_cached_batch_of_the_same_rows_give_the_same_loss(tmp_path, small_cache, loss_path):
    """The same rows as a dataset batch (read from the cache) and as an on-policy batch (the live teacher): with
    gate="none" (the proposals differ between the two kinds, the weights do not) the same loss and gradients."""
    settings = dict(loss_path=loss_path, lmbda=0.5, beta=0.5, gate="none")
    trainers = [
        cached_trainer(tmp_path / name, small_cache, teacher=make_model(1, make_tokenizer()), **settings)
        for name in ("a", "b")
    ]
    loss_c, grads_c, _ = loss_gradients_and_window(trainers[0], collated_batch(trainers[0], OFF_POLICY, rows=6))
    loss_o, grads_o, _ = loss_gradients_and_window(trainers[1], collated_batch(trainers[1], ON_POLICY, rows=6))
    assert loss_o.item() == pytest.approx(loss_c.item(), rel=1e-5)
    for name in grads_c:
        torch.testing.assert_close(grads_o[name], grads_c[name], rtol=1e-4, atol=1e-7)


def test_the_live_cut_is_what_the_cache_stores(tmp_path, small_cache):
    """`TeacherCache.live` gives, on the same rows, exactly the cached ids, values (float16-rounded) and tail."""
    trainer = cached_trainer(tmp_path, small_cache, teacher=make_model(1, make_tokenizer()), lmbda=0.5, gate="none")
    batch = collated_batch(trainer, OFF_POLICY, rows=6)
    completion = batch["labels"][:, 1:] != -100
    stored = trainer._teacher_cache.batch(batch["input_ids"], batch["attention_mask"], completion)
    with torch.no_grad():
        logits = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    live = trainer._teacher_cache.live(torch.log_softmax(logits[:, :-1].float(), dim=-1))
    assert torch.equal(live.ids[completion], stored.ids[completion])
    torch.testing.assert_close(live.values[completion], stored.values[completion], rtol=0, atol=0)
    torch.testing.assert_close(live.log_tail[completion], stored.log_tail[completion], rtol=0, atol=0)


# ---------------------------------------------------------------------------- bad input


def test_a_cache_that_does_not_cover_the_gates_k_is_refused(tmp_path):
    make_trainer(tmp_path / "live").cache_teacher(str(tmp_path / "cache"), top_k=4)
    with pytest.raises(ValueError, match=r"gate_top_k=5 is larger than the teacher cache's K=4"):
        cached_trainer(tmp_path, tmp_path / "cache", lmbda=0.0, gate="topk", gate_top_k=5)


def test_a_cache_of_another_teacher_is_refused(tmp_path, full_cache):
    other = make_model(1, make_tokenizer(), layers=3)
    with pytest.raises(ValueError, match=r"another teacher \(config\)"):
        cached_trainer(tmp_path, full_cache, teacher=other, lmbda=0.5)


def test_a_cache_of_another_tokenizer_is_refused(tmp_path, full_cache):
    from speckd_trl import SpecKDTrainer
    from speckd_trl.tools.testing import SPECIALS, WORDS

    tokenizer = word_level_tokenizer(SPECIALS + list(reversed(WORDS)))

    with pytest.raises(ValueError, match="another tokenizer"):
        SpecKDTrainer(
            model=make_model(0, tokenizer),
            args=SpecKDConfig(**TINY_ARGS, output_dir=str(tmp_path / "o"), lmbda=0.0, teacher_cache=str(full_cache)),
            train_dataset=make_dataset(),
            processing_class=tokenizer,
        )


def test_a_cache_of_another_dataset_is_refused(tmp_path, full_cache):
    with pytest.raises(ValueError, match="another dataset"):
        cached_trainer(tmp_path, full_cache, lmbda=0.0, train_dataset=make_dataset(seed=3))


def test_missing_and_damaged_shards_are_named(tmp_path, full_cache):
    shard = full_cache / "shard-00001"
    arrow = next(shard.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match="shard shard-00001 is missing or damaged"):
        TeacherCache.open(full_cache)
    shutil.rmtree(shard)
    with pytest.raises(ValueError, match="shard shard-00001 is missing or damaged"):
        TeacherCache.open(full_cache)
    (full_cache / META_FILE).unlink()
    with pytest.raises(ValueError, match="not a teacher cache"):
        TeacherCache.open(full_cache)


def test_an_interrupted_build_resumes_without_recomputing_finished_shards(tmp_path):
    live = make_trainer(tmp_path / "live")
    calls = {"n": 0}
    forward = live.teacher_model.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls.get("fail_at") == calls["n"]:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    live.teacher_model.forward = counting
    calls["fail_at"] = 4  # shards of 4 rows, batches of 2: dies in the middle of the second shard
    with pytest.raises(KeyboardInterrupt):
        live.cache_teacher(str(tmp_path / "cache"), top_k=8, shard_rows=4, batch_size=2)
    with pytest.raises(ValueError, match=r"incomplete \(1 of 4 shards\)"):
        TeacherCache.open(tmp_path / "cache")
    calls.update(n=0, fail_at=None)
    cache = live.cache_teacher(str(tmp_path / "cache"), top_k=8, shard_rows=4, batch_size=2)
    assert calls["n"] == 6  # 3 shards of 2 batches: the finished one was kept
    assert len(cache) == 16
    with pytest.raises(ValueError, match="cannot be resumed"):
        live.cache_teacher(str(tmp_path / "cache"), top_k=16, shard_rows=4)


def test_settings_a_cache_cannot_serve_are_refused(tmp_path, full_cache):
    with pytest.raises(
        ValueError,
        match=r"gate=.spec. reads the teacher.s log-probability of the proposed token, which teacher_cache=.c.",
    ):
        SpecKDConfig(**TINY_ARGS, output_dir=str(tmp_path), teacher_cache="c", gate="spec")
    with pytest.raises(ValueError, match="seq_kd=True with teacher_cache"):
        SpecKDConfig(**TINY_ARGS, output_dir=str(tmp_path), teacher_cache="c", seq_kd=True)
    from speckd_trl import SpecKDTrainer

    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match=r"lmbda=0.5 makes on-policy batches that need a live teacher"):
        SpecKDTrainer(
            model=make_model(0, tokenizer),
            args=SpecKDConfig(**TINY_ARGS, output_dir=str(tmp_path / "o"), lmbda=0.5, teacher_cache=str(full_cache)),
            train_dataset=make_dataset(),
            processing_class=tokenizer,
        )


def test_the_cli_caches_then_trains_from_the_cache_with_one_recipe(workspace, tmp_path, capsys):
    from speckd_trl.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {workspace / 'student'}\n"
        f"teacher_model_name_or_path: {workspace / 'teacher'}\n"
        f"dataset_name: {workspace / 'train.jsonl'}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        f"teacher_cache: {tmp_path / 'cache'}\n"
        "use_cpu: true\nreport_to: none\nsave_strategy: 'no'\nmax_steps: 2\nper_device_train_batch_size: 2\n"
        "max_new_tokens: 4\ngate: topk\ngate_top_k: 5\nteacher_cache_top_k: 8\nlmbda: 0.0\n"
    )
    assert main(["cache-teacher", "--config", str(recipe)]) == 0
    assert "Cached the teacher's top 8 at" in capsys.readouterr().out
    assert main(["--config", str(recipe)]) == 0  # lmbda 0: the teacher in the recipe is not loaded
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["--config", str(recipe), "--gate_top_k", "9"]) == 2
    assert "larger than the teacher cache's K=8" in capsys.readouterr().err


# ---------------------------------------------------------------------------- ties, identity, lock, evaluation (#34)


def tied_log_probs(*shape, seed=0):
    """Log-probabilities with many exact ties, as bf16/fp16 logits have: logits on a 0.25 grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax((torch.randn(*shape, generator=g) * 6).round() / 4, dim=-1)


@pytest.mark.parametrize("k", [1, 3, 8, 32])
def test_the_cached_top_k_is_the_rules_on_exact_ties(k):
    """Written in the topk rule's order (value descending, then id ascending): the first K of a stable sort. So a
    sparse view with gate_top_k == K gives the live teacher's verdicts. torch.topk alone keeps other tied ids."""
    t = tied_log_probs(4, 16, 96, seed=k)
    ids, values, log_tail = teacher_top_k(t, k)
    expected = torch.sort(t, dim=-1, descending=True, stable=True).indices[..., :k]
    assert torch.equal(ids, expected)
    torch.testing.assert_close(values, t.gather(-1, expected))
    rest = t.scatter(-1, expected, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(log_tail, rest)
    # every proposal that ties at the k-th place, and every other token: the same verdicts
    rule = get_rule("topk")
    proposals = torch.arange(96).expand(4, 16, 96).permute(2, 0, 1)  # [96, 4, 16]: each token at each position
    view = sparse_log_probs(ids, values, 96).expand(96, -1, -1, -1)
    full = rule.accept(t, t.expand(96, -1, -1, -1), proposals, top_k=k, uniforms=None, normalized=True)
    sparse = rule.accept(view, view, proposals, top_k=k, uniforms=None, normalized=True)
    assert torch.equal(full, sparse)


def tied_teacher(seed=1):
    """A tiny teacher whose output layer has 4 distinct rows, repeated: every logit ties with 23 others."""
    model = make_model(seed, make_tokenizer())
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight.copy_(weight[torch.arange(VOCAB_SIZE) % 4] * 5)
    return model


@pytest.mark.parametrize("loss_path", ["eager", "chunked"])
def test_a_cache_with_gate_top_k_equal_to_k_gives_the_live_verdicts_on_ties(tmp_path, loss_path):
    teacher, student = tied_teacher(1), tied_teacher(0)  # the student proposes the lowest id of its best group
    settings = dict(loss_path=loss_path, lmbda=0.0, gate="topk", gate_top_k=3)
    live = make_trainer(tmp_path / "live", teacher=teacher, student=student, **settings)
    live.cache_teacher(str(tmp_path / "cache"), top_k=3, values_dtype="float32")
    cached = cached_trainer(tmp_path, tmp_path / "cache", student=student, **settings)
    batch = collated_batch(live, OFF_POLICY, rows=8)
    with torch.no_grad():  # the ties are there: 24 tokens (or more) share the best logit at every position
        logits = teacher(input_ids=batch["input_ids"]).logits
        assert bool(((logits == logits.max(-1, keepdim=True).values).sum(-1) >= 24).all())
    _, _, window_live = loss_gradients_and_window(live, batch)
    _, _, window_cached = loss_gradients_and_window(cached, batch)
    assert window_cached == window_live and 0 < window_live["accepted_off"] < window_live["gated_off"]


def test_a_live_teacher_with_other_weights_is_refused_and_the_override_warns(tmp_path, full_cache, caplog):
    other = make_model(2, make_tokenizer())  # the same config as the cache's teacher (seed 1), other weights
    with pytest.raises(ValueError, match=r"was made by another teacher: .*their weights differ \(input_embeddings"):
        cached_trainer(tmp_path, full_cache, teacher=other, lmbda=0.5)
    with pytest.raises(ValueError, match="another teacher"):  # lmbda 0: a teacher passed in is still checked
        cached_trainer(tmp_path, full_cache, teacher=other, lmbda=0.0)
    trainer = cached_trainer(tmp_path, full_cache, teacher=other, lmbda=0.5, teacher_cache_check_teacher=False)
    assert trainer._teacher_cache is not None
    assert "not checked to be this run's teacher" in caplog.text
    cached_trainer(tmp_path, full_cache, teacher=make_model(1, make_tokenizer()), lmbda=0.5)  # the same weights


def test_the_fingerprint_names_the_checkpoint_not_its_precision(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from speckd_trl.teacher_cache import fingerprint_mismatch, teacher_precision, weights_fingerprint

    tokenizer = make_tokenizer()
    teacher, other = make_model(1, tokenizer), make_model(2, tokenizer)
    teacher.save_pretrained(tmp_path / "t")
    written = weights_fingerprint(teacher)  # float32
    for dtype in (torch.bfloat16, torch.float16):
        nf4 = AutoModelForCausalLM.from_pretrained(
            tmp_path / "t",
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            ),
            device_map={"": "cpu"},
            dtype=dtype,
        )
        assert teacher_precision(nf4) == "nf4" and nf4.get_input_embeddings().weight.dtype == dtype
        assert fingerprint_mismatch(written, weights_fingerprint(nf4)) is None
        assert "input_embeddings" in fingerprint_mismatch(weights_fingerprint(other), weights_fingerprint(nf4))
    assert fingerprint_mismatch(written, weights_fingerprint(teacher.to(torch.bfloat16))) is None


def test_a_cache_records_its_teacher_and_precision(tmp_path, full_cache):
    info = json.loads((full_cache / META_FILE).read_text())
    assert info["spec"]["teacher_dtype"] == "float32" and info["spec"]["teacher_fingerprint"]["input_embeddings"]
    assert set(info["shard_teachers"]) == set(info["shards"]) and len(set(info["shard_teachers"].values())) == 1


def test_a_resumed_build_refuses_shards_of_another_teacher(tmp_path):
    live = make_trainer(tmp_path / "live")
    forward, calls = live.teacher_model.forward, {"n": 0}

    def dies_in_the_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    live.teacher_model.forward = dies_in_the_second_shard
    with pytest.raises(KeyboardInterrupt):
        live.cache_teacher(str(tmp_path / "cache"), top_k=8, shard_rows=4, batch_size=2)
    # the teacher's directory got new weights (same config) before the rerun
    other = make_trainer(tmp_path / "other", teacher=make_model(2, make_tokenizer()))
    with pytest.raises(ValueError, match=r"holds shards of another teacher .* cannot be resumed"):
        other.cache_teacher(str(tmp_path / "cache"), top_k=8, shard_rows=4, batch_size=2)
    # a finished shard that records another teacher than the cache's is refused too (resume and open)
    meta = json.loads((tmp_path / "cache" / META_FILE).read_text())
    meta["shard_teachers"]["shard-00000"] = "0123456789abcdef"
    (tmp_path / "cache" / META_FILE).write_text(json.dumps(meta))
    live.teacher_model.forward = forward
    with pytest.raises(ValueError, match=r"1 finished shard\(s\) \(shard-00000\) were written by another teacher"):
        live.cache_teacher(str(tmp_path / "cache"), top_k=8, shard_rows=4, batch_size=2)
    meta["complete"] = True
    (tmp_path / "cache" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shard\(s\) \(shard-00000\) were written by another teacher"):
        TeacherCache.open(tmp_path / "cache")


def test_a_second_writer_is_refused_at_once(tmp_path):
    import subprocess
    import sys

    from speckd_trl.teacher_cache import LOCK_FILE

    live = make_trainer(tmp_path / "live")
    (tmp_path / "cache").mkdir()
    holder = subprocess.Popen(  # another process, holding the lock as a running cache-teacher does
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); time.sleep(60)", str(tmp_path / "cache" / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="is in use by another process"):
            live.cache_teacher(str(tmp_path / "cache"), top_k=8)
    finally:
        holder.kill()
        holder.wait()
    assert len(live.cache_teacher(str(tmp_path / "cache"), top_k=8)) == 16  # free again


def test_evaluation_without_a_teacher_says_it_needs_one(tmp_path, full_cache):
    trainer = cached_trainer(tmp_path, full_cache, lmbda=0.0)
    assert trainer.teacher_model is None
    for method in (trainer.evaluate, trainer.predict):
        with pytest.raises(ValueError, match=r"needs the teacher, and this trainer has none.*teacher_model="):
            method(trainer.train_dataset)


def test_cache_teacher_help_says_what_it_does(capsys):
    from speckd_trl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["cache-teacher", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: speckd-trl cache-teacher --config recipe.yaml --teacher_cache DIR")
    assert "top-K log-probabilities at every completion token" in out
    for key in ("--teacher_cache_top_k", "--teacher_cache_dtype", "--teacher_model_name_or_path", "--max_length"):
        assert key in out.split("options:")[0]


def test_the_cli_refuses_a_cache_of_another_teacher_by_name(workspace, tmp_path, capsys):
    from speckd_trl.cli import main

    make_model(2, make_tokenizer()).save_pretrained(workspace / "teacher-b")
    make_tokenizer().save_pretrained(workspace / "teacher-b")
    common = (
        f"model_name_or_path: {workspace / 'student'}\ndataset_name: {workspace / 'train.jsonl'}\n"
        f"output_dir: {tmp_path / 'out'}\nteacher_cache: {tmp_path / 'cache'}\nuse_cpu: true\nreport_to: none\n"
        "save_strategy: 'no'\nmax_steps: 1\nper_device_train_batch_size: 2\ngate: topk\ngate_top_k: 5\n"
        "teacher_cache_top_k: 8\nlmbda: 0.0\n"
    )
    recipe_a, recipe_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    recipe_a.write_text(common + f"teacher_model_name_or_path: {workspace / 'teacher'}\n")
    recipe_b.write_text(common + f"teacher_model_name_or_path: {workspace / 'teacher-b'}\n")
    assert main(["cache-teacher", "--config", str(recipe_a)]) == 0
    capsys.readouterr()
    assert main(["--config", str(recipe_b)]) == 2  # lmbda 0: teacher B is not loaded, its name is compared
    err = capsys.readouterr().err
    assert "was made by the teacher" in err and str(workspace / "teacher") in err and "teacher-b" in err
    assert main(["--config", str(recipe_b), "--teacher_cache_check_teacher", "false"]) == 0
