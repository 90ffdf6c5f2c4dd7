"""The trainer's loss against GKD's and against by-hand recomputations, on one batch of tiny models."""

import dataclasses

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl.experimental.gkd import GKDTrainer

from speckd_trl import SpecKDConfig, SpecKDTrainer
from speckd_trl.batch_kind import BatchKind
from speckd_trl.batches import KIND_KEY, OFF_POLICY, ON_POLICY
from speckd_trl.tools.testing import TINY_ARGS, make_model
from speckd_trl.tools.testing import make_trainer as tiny_trainer


# the by-hand references below take the student's argmax as its proposal
DEFAULTS = dict(per_device_train_batch_size=4, max_new_tokens=6, gate_proposal="greedy")


def make_args(tmp_path, **overrides) -> SpecKDConfig:
    return SpecKDConfig(**{**TINY_ARGS, "output_dir": str(tmp_path), **DEFAULTS, **overrides})


def make_trainer(tmp_path, dataset=None, **overrides) -> SpecKDTrainer:
    return tiny_trainer(tmp_path, train_dataset=dataset, **{**DEFAULTS, **overrides})


def dataset_batch(trainer, n=4):
    ds = trainer.train_dataset
    return {**trainer.data_collator([ds[i] for i in range(n)]), KIND_KEY: OFF_POLICY}


def gkd_loss(trainer, batch, num_items_in_batch):
    """TRL's GKD loss on the same batch, normalized by the sum over completion tokens."""
    with torch.no_grad():
        student = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return GKDTrainer.generalized_jsd_loss(
        student[:, :-1],
        teacher[:, :-1],
        labels=batch["labels"][:, 1:],
        beta=trainer.beta,
        num_items_in_batch=num_items_in_batch,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"gate": "none"},
        # the largest k allowed, one below the vocabulary (k = 96 is refused: `test_errors`): here it accepts every
        # greedy proposal
        {"gate": "topk", "gate_top_k": 95},
        {"gate": "topk", "gate_top_k": 1, "reject_weight": 1.0},
        {"gate": "spec", "reject_weight": 1.0},
    ],
)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_equals_gkd_when_nothing_is_masked(tmp_path, overrides, beta):
    trainer = make_trainer(tmp_path, beta=beta, **overrides)
    batch = dataset_batch(trainer)
    n_tokens = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n_tokens)
    assert ours.item() == pytest.approx(gkd_loss(trainer, batch, n_tokens).item(), abs=1e-5, rel=1e-5)


def test_topk_gate_masks_rejected_tokens(tmp_path):
    """Greedy proposals: only positions where the student's argmax is in the teacher's top 30 keep weight 1."""
    trainer = make_trainer(tmp_path, gate="topk", gate_top_k=30, reject_weight=0.25, beta=0.5)
    batch = dataset_batch(trainer)
    with torch.no_grad():
        student = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        teacher = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = teacher[:, :-1]
        completion = batch["labels"][:, 1:] != -100
        per_vocab = GKDTrainer.generalized_jsd_loss(student, teacher, beta=0.5, reduction="none")
        agree = (teacher.topk(30).indices == student.argmax(-1, keepdim=True)).any(-1)
        weights = torch.where(agree, 1.0, 0.25) * completion
        expected = (per_vocab.sum(-1) * weights).sum() / completion.sum()
        ours = trainer.compute_loss(trainer.model, batch)
    assert 0 < agree[completion].float().mean() < 1  # the gate does reject something here
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_nothing_accepted_gives_finite_zero_loss_and_zero_gradient(tmp_path):
    with pytest.warns(UserWarning, match="a reject weight of 0 masks rejected positions completely"):
        trainer = make_trainer(tmp_path, gate="topk", gate_top_k=1, reject_weight=0.0)
    batch = dataset_batch(trainer)
    # the teacher's top-1 is always token 0 (<pad>), which the student never proposes
    with torch.no_grad():
        trainer.teacher_model.lm_head.weight.zero_()
    for normalize in ("tokens", "accepted"):
        trainer.args.gate_normalize = normalize
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() == 0.0
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_on_policy_loss_uses_the_generated_tokens(tmp_path):
    """lmbda=1: the window is generated in `get_batch_samples`; its token count and the loss follow the samples."""
    trainer = make_trainer(tmp_path, lmbda=1.0, gate="topk", gate_top_k=3, reject_weight=0.1, beta=0.5)
    dataset = dataset_batch(trainer)
    (batch,), num_items = trainer.get_batch_samples(iter([dataset]), 1, trainer.args.device)
    assert batch[KIND_KEY] == "on_policy"

    # completion positions by hand: after the prompt, up to and including the first <|im_end|>
    prompt_len = dataset["prompts"].shape[1]
    eos = trainer.processing_class.eos_token_id
    completion = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for b, row in enumerate(batch["input_ids"].tolist()):
        for t in range(prompt_len, len(row)):
            completion[b, t] = True
            if row[t] == eos:
                break
    completion = completion[:, 1:]
    assert num_items.item() == completion.sum().item()
    assert num_items.item() != (dataset["labels"][:, 1:] != -100).sum().item()  # GKD would count these

    with torch.no_grad():
        student = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        teacher = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = teacher[:, :-1]
        sampled = batch["input_ids"][:, 1:]
        weights = torch.zeros(completion.shape)
        for b in range(completion.shape[0]):
            for t in range(completion.shape[1]):
                if completion[b, t]:
                    in_top3 = sampled[b, t].item() in teacher[b, t].topk(3).indices.tolist()
                    weights[b, t] = 1.0 if in_top3 else 0.1
        per_vocab = GKDTrainer.generalized_jsd_loss(student, teacher, beta=0.5, reduction="none")
        expected = (per_vocab.sum(-1) * weights).sum() / completion.sum()
        ours = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


class GradientsBeforeTheStep(TrainerCallback):
    """Copies the accumulated gradients just before the optimizer steps (after any clipping; the tests turn it off),
    so that a test reads the gradient itself, whatever the optimizer does with it."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().clone() for p in model.parameters()])


def record_windows(trainer) -> list:
    """Wraps `get_batch_samples`: every accumulation window the trainer trains on, with its `num_items_in_batch`."""
    windows, fetch = [], trainer.get_batch_samples

    def recorded(*args, **kwargs):
        batches, num_items = fetch(*args, **kwargs)
        windows.append(
            ([{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches], num_items)
        )
        return batches, num_items

    trainer.get_batch_samples = recorded
    return windows


def topk_terms_by_hand(student, teacher, batch, *, top_k, reject_weight, beta):
    """One micro-batch's ``sum_t w_t D_t`` (differentiable), ``sum_t w_t``, its completion tokens and accept bits,
    written from docs/concepts.md with TRL's divergence.

    Proposals: the sampled token on an on-policy batch, the student's argmax otherwise (`gate_proposal="greedy"`).
    ``w_t`` = 1 if the proposal is in the teacher's top-k, else `reject_weight`, 0 off the completion.
    """
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    completion = labels != -100
    proposals = labels.clamp(min=0) if batch[KIND_KEY] == ON_POLICY else logits.detach().argmax(-1)
    accepted = (teacher_logits.topk(top_k).indices == proposals[..., None]).any(-1) & completion
    weights = torch.where(accepted, 1.0, reject_weight) * completion
    divergence = GKDTrainer.generalized_jsd_loss(logits, teacher_logits, beta=beta, reduction="none").sum(-1)
    return (weights * divergence).sum(), weights.sum(), completion.sum(), accepted[completion]


def window_loss(terms, num_items, contract):
    """The loss summed over a window's micro-batches (`terms`: `topk_terms_by_hand` of each), ``N = num_items``.

    ``"tokens"`` (`normalize_loss`'s contract): ``sum_t w_t D_t / N``.
    ``"accepted"`` (its contract under accumulation): each micro-batch ``(n_micro / N) * sum_t w_t D_t / max(1,
    sum_t w_t)``, its own weights in its denominator.
    ``"accepted_pooled"`` (not the contract; tells the test apart from it): one denominator for the whole window,
    ``sum w_t D_t / max(1, sum w_t)`` over all its micro-batches.
    """
    if contract == "tokens":
        return sum(weighted for weighted, *_ in terms) / num_items
    if contract == "accepted":
        return sum(weighted / w_sum.clamp(min=1) * n_micro / num_items for weighted, w_sum, n_micro, _ in terms)
    return sum(t[0] for t in terms) / sum(t[1] for t in terms).clamp(min=1)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
@pytest.mark.parametrize("normalize", ["tokens", "accepted"])
def test_gradient_accumulation_matches_the_full_batch(tmp_path, lmbda, normalize):
    """The accumulated gradient is the gradient of the window's loss as documented (`window_loss`), for 1 batch of 2
    and for 2 micro-batches of 1, and no other candidate contract's; with `"tokens"` both give the same gradient."""
    short, long = "answer 7", "answer is 3 + 4 = 7 answer 7 what is 7"  # completions of different lengths
    dataset = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c}]}
            for q, c in (("what is 3 + 4 =", short), ("what is 1 + 2 + 5 =", long))
        ]
    )
    top_k, reject_weight, beta = 30, 0.1, 0.5
    contracts = ("tokens", "accepted", "accepted_pooled")
    grads = []
    for batch_size, accumulation in [(2, 1), (1, 2)]:
        capture = GradientsBeforeTheStep()
        trainer = make_trainer(
            tmp_path / f"b{batch_size}",
            dataset=dataset,
            lmbda=lmbda,
            temperature=1e-4,  # near-greedy sampling: the same completions batched or not
            gate="topk",
            gate_top_k=top_k,
            gate_proposal="greedy",
            reject_weight=reject_weight,
            beta=beta,
            gate_normalize=normalize,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            max_grad_norm=0.0,  # no clipping: the captured gradient is the accumulated one
        )
        trainer.add_callback(capture)
        windows = record_windows(trainer)
        # the weights the step's gradient is taken at, in a model of our own (a deepcopy of a prepared model would
        # keep calling the original's forward)
        student = make_model(0, trainer.processing_class)
        student.load_state_dict({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        trainer.train()
        assert len(windows) == 1 and len(capture.grads) == 1
        (batches, num_items), got = windows[0], capture.grads[0]
        assert len(batches) == accumulation
        assert num_items.item() == sum((b["labels"][:, 1:] != -100).sum().item() for b in batches)
        assert all(b[KIND_KEY] == (ON_POLICY if lmbda == 1.0 else OFF_POLICY) for b in batches)

        expected = {}
        for contract in contracts:
            student.zero_grad()
            terms = [
                topk_terms_by_hand(
                    student, trainer.teacher_model, b, top_k=top_k, reject_weight=reject_weight, beta=beta
                )
                for b in batches
            ]
            window_loss(terms, num_items, contract).backward()
            expected[contract] = [p.grad.clone() for p in student.parameters()]
        for g, e in zip(got, expected[normalize]):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)

        # the check has power: the gate rejects some tokens, and the candidate contracts give other gradients
        assert 0 < torch.cat([accepted for *_, accepted in terms]).float().mean() < 1
        scale = max(g.abs().max() for g in expected[normalize])
        for other in contracts:
            if other == normalize or (accumulation == 1 and other == "accepted_pooled"):  # one micro-batch: the same
                continue
            assert max((a - b).abs().max() for a, b in zip(expected[normalize], expected[other])) > 1e-3 * scale
        if accumulation == 2:  # the micro-batches differ, so their shares and denominators do
            assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
            assert terms[0][1].item() / terms[0][2].item() != pytest.approx(terms[1][1].item() / terms[1][2].item())
        grads.append(got)
    if normalize == "tokens":  # k micro-batches of b give the gradient of one batch of k * b
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("gate", ["topk", "spec"])
@pytest.mark.parametrize("kind", ["off_policy", "on_policy"])
def test_gate_on_the_whole_batch_or_on_the_gated_rows_alike(tmp_path, gate, kind):
    """`GatedBatch.verdicts` gates the whole batch when most positions are gated and copies the gated rows out
    otherwise; both give the verdicts of the gate applied position by position (`at=`)."""
    trainer = make_trainer(tmp_path, gate=gate, gate_top_k=3, temperature=0.7)
    g = torch.Generator().manual_seed(0)
    n_b, n_t, vocab = 3, 8, 96
    log_q = torch.log_softmax(torch.randn(n_b, n_t, vocab, generator=g) * 2, -1)
    log_p = torch.log_softmax(torch.randn(n_b, n_t, vocab, generator=g) * 2, -1)
    labels = torch.randint(0, vocab, (n_b, n_t), generator=g)
    most = torch.rand(n_b, n_t, generator=g) > 0.2
    few = most & (torch.arange(n_t) < 3)
    assert 2 * most.sum() > most.numel() >= 2 * few.sum()
    batch = trainer._gate.batch(BatchKind.named(kind), most, labels, training=True, step=0, max_steps=1)
    whole = batch.verdicts(log_q, log_p)
    rows = dataclasses.replace(batch, completion=few, gated=few).verdicts(log_q, log_p)  # the same draws
    assert torch.equal(rows, whole & few)
    for b, t in most.nonzero().tolist():  # one position at a time
        one = batch.verdicts(log_q[b, t][None], log_p[b, t][None], at=torch.tensor([b * n_t + t]))
        assert one.item() == whole[b, t].item()
    assert 0 < whole[most].float().mean() < 1
