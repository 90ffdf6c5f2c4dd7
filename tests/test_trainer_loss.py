"""The trainer's loss against GKD's and against by-hand recomputations, on one batch of tiny models."""

import pytest
import torch
from datasets import Dataset
from trl.experimental.gkd import GKDTrainer

from speckd_trl import SpecKDConfig, SpecKDTrainer
from speckd_trl.testing import make_dataset, make_model, make_tokenizer
from speckd_trl.trainer import KIND_KEY, OFF_POLICY


def make_args(tmp_path, **overrides) -> SpecKDConfig:
    kwargs = dict(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        max_new_tokens=6,
        save_strategy="no",
        seed=0,
    )
    kwargs.update(overrides)
    return SpecKDConfig(**kwargs)


def make_trainer(tmp_path, dataset=None, **overrides) -> SpecKDTrainer:
    tokenizer = make_tokenizer()
    return SpecKDTrainer(
        model=make_model(0, tokenizer),
        teacher_model=make_model(1, tokenizer),
        args=make_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else make_dataset(),
        processing_class=tokenizer,
    )


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
        {"gate": "topk", "gate_top_k": 96},  # k = vocabulary size: everything accepted
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


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
@pytest.mark.parametrize("normalize", ["tokens", "accepted"])
def test_gradient_accumulation_matches_the_full_batch(tmp_path, lmbda, normalize):
    """2 micro-batches of 1 give the update of 1 batch of 2 (SGD, lr 1: the update is the gradient)."""
    short, long = "answer 7", "answer is 3 + 4 = 7 answer 7 what is 7"  # completions of different lengths
    dataset = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": "what is 3 + 4 ="}, {"role": "assistant", "content": c}]}
            for c in (short, long)
        ]
    )
    updates = []
    for batch_size, accumulation in [(2, 1), (1, 2)]:
        trainer = make_trainer(
            tmp_path / f"b{batch_size}",
            dataset=dataset,
            lmbda=lmbda,
            temperature=1e-4,  # near-greedy sampling: the same completions batched or not
            gate="topk",
            gate_top_k=30,
            reject_weight=0.1,
            gate_normalize=normalize,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            weight_decay=0.0,
        )
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)]))
    assert updates[0].abs().sum() > 0
    if normalize == "tokens":
        assert torch.allclose(updates[0], updates[1], atol=1e-6, rtol=1e-4)
    else:  # per micro-batch denominators: the same direction, token-share weighted
        cosine = torch.nn.functional.cosine_similarity(updates[0], updates[1], dim=0)
        assert cosine > 0.9


@pytest.mark.parametrize("gate", ["topk", "spec"])
@pytest.mark.parametrize("kind", ["off_policy", "on_policy"])
def test_gate_on_the_whole_batch_or_on_the_gated_rows_alike(tmp_path, gate, kind):
    """`_verify_rows` gates the whole batch when most positions are gated and copies the gated rows out otherwise;
    both give the verdicts of the gate applied position by position."""
    trainer = make_trainer(tmp_path, gate=gate, gate_top_k=3, temperature=0.7)
    g = torch.Generator().manual_seed(0)
    n_b, n_t, vocab = 3, 8, 96
    log_q = torch.log_softmax(torch.randn(n_b, n_t, vocab, generator=g) * 2, -1)
    log_p = torch.log_softmax(torch.randn(n_b, n_t, vocab, generator=g) * 2, -1)
    labels = torch.randint(0, vocab, (n_b, n_t), generator=g)
    uniforms = {"accept": torch.rand(n_b, n_t, generator=g)} if gate == "spec" else {}
    most = torch.rand(n_b, n_t, generator=g) > 0.2
    few = most & (torch.arange(n_t) < 3)
    assert 2 * most.sum() > most.numel() >= 2 * few.sum()
    whole = trainer._verify_rows(log_q, log_p, labels, most, kind, uniforms)
    rows = trainer._verify_rows(log_q, log_p, labels, few, kind, uniforms)
    assert torch.equal(rows, whole & few)
    for b, t in most.nonzero().tolist():  # one position at a time
        one = trainer._verify(
            log_q[b, t], log_p[b, t], labels[b, t], most[b, t], kind, {n: u[b, t] for n, u in uniforms.items()}
        )
        assert one.item() == whole[b, t].item()
    assert 0 < whole[most].float().mean() < 1
