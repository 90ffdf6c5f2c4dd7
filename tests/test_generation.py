"""SKD-style gated generation (`speckd_trl.generation`) on tiny models: exactness, distribution, batching, stops."""

import math

import pytest
import torch
from transformers import DynamicCache

from speckd_trl import SpecKDConfig
from speckd_trl.generation import row_seeds, speculative_generate, student_generate
from speckd_trl.tools.testing import make_model, make_tokenizer, perturbed_copy


PAD, EOS = 0, 3


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return make_model(1, tokenizer).eval()


@pytest.fixture(scope="module")
def close_student(teacher):
    """Accepts some drafts and rejects others, so that blocks end at different places in different rows."""
    return perturbed_copy(teacher, 0.1).eval()


@pytest.fixture(scope="module")
def far_student(tokenizer):
    return make_model(0, tokenizer).eval()


def ragged_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 3, 5 and 2."""
    ids = torch.tensor([[PAD, PAD, 2, 10, 11], [2, 12, 13, 14, 15], [PAD, PAD, PAD, 2, 9]])
    return ids, (ids != PAD).long()


def hf_greedy(model, ids, mask, max_new_tokens: int, eos_token_id=EOS) -> torch.Tensor:
    """transformers' greedy decoding as the reference, every setting that decides the tokens passed explicitly
    (not read from the model's generation config or transformers' defaults)."""
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          num_beams=1, eos_token_id=eos_token_id, pad_token_id=PAD)  # fmt: skip


@pytest.mark.parametrize("draft_len", [1, 3, 8])
def test_topk1_greedy_is_the_teachers_greedy_decoding(teacher, close_student, draft_len):
    ids, mask = ragged_prompts()
    expected = hf_greedy(teacher, ids, mask, 16)
    got, stats = speculative_generate(close_student, teacher, ids, mask, gate="topk", top_k=1, draft_len=draft_len,
                                      max_new_tokens=16, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    assert torch.equal(got, expected)
    # the test means something only if drafts are both accepted and rejected
    assert 0 < stats.replaced_tokens < stats.generated_tokens and sum(stats.accepted_runs) > 0
    assert stats.generated_tokens == sum(int((row != PAD).sum()) for row in expected[:, ids.size(1) :])
    assert stats.teacher_calls == math.ceil(16 / draft_len) if draft_len == 1 else stats.teacher_calls < 16


def test_spec_greedy_is_the_teachers_greedy_decoding(teacher, close_student):
    ids, mask = ragged_prompts()
    expected = hf_greedy(teacher, ids, mask, 12)
    got, _ = speculative_generate(close_student, teacher, ids, mask, gate="spec", draft_len=4, max_new_tokens=12,
                                  do_sample=False, eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    assert torch.equal(got, expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gate_none_is_the_students_own_sampling(teacher, far_student, temperature):
    ids, mask = ragged_prompts()
    kwargs = dict(max_new_tokens=12, temperature=temperature, eos_token_id=EOS, pad_token_id=PAD, seeds=[5, 6, 7])
    expected = student_generate(far_student, ids, mask, **kwargs)
    got, stats = speculative_generate(far_student, teacher, ids, mask, gate="none", draft_len=4, **kwargs)
    assert torch.equal(got, expected)
    assert stats.replaced_tokens == 0 and stats.acceptance_rate == 1.0


def test_student_generate_greedy_matches_hf_generate(far_student):
    ids, mask = ragged_prompts()
    expected = hf_greedy(far_student, ids, mask, 10)
    got = student_generate(
        far_student, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=EOS, pad_token_id=PAD
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "gate,do_sample", [("spec", True), ("topk", True), ("none", True), ("topk", False), ("spec", False)]
)
def test_ragged_batch_equals_one_prompt_at_a_time(teacher, close_student, far_student, gate, do_sample):
    """Row b draws from its own generator seeded with seeds[b]: its sequence does not depend on the batch."""
    student = far_student if do_sample else close_student  # each with both accepted and rejected drafts
    ids, mask = ragged_prompts()
    generator = torch.Generator().manual_seed(0)
    seeds = row_seeds(torch.Generator().manual_seed(0), 3)
    kwargs = dict(gate=gate, top_k=3, draft_len=4, max_new_tokens=14, do_sample=do_sample, temperature=0.5,
                  eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    batched, stats = speculative_generate(student, teacher, ids, mask, generator=generator, **kwargs)
    if gate != "none":
        assert 0 < stats.replaced_tokens < stats.generated_tokens
    for b in range(3):
        start = int(mask[b].argmax())  # first real prompt token
        alone, _ = speculative_generate(student, teacher, ids[b : b + 1, start:], mask[b : b + 1, start:],
                                        seeds=[seeds[b]], **kwargs)  # fmt: skip
        completion = alone[0, ids.size(1) - start :]
        assert torch.equal(batched[b, ids.size(1) : ids.size(1) + completion.numel()], completion)
        assert (batched[b, ids.size(1) + completion.numel() :] == PAD).all()


def test_same_seed_same_sequences(teacher, far_student):
    ids, mask = ragged_prompts()
    runs = [
        speculative_generate(
            far_student,
            teacher,
            ids,
            mask,
            gate="spec",
            max_new_tokens=8,
            pad_token_id=PAD,
            generator=torch.Generator().manual_seed(3),
        )[0]  # fmt: skip
        for _ in range(2)
    ]
    assert torch.equal(*runs)


def test_eos_and_max_new_tokens_are_respected(teacher, close_student):
    ids, mask = ragged_prompts()
    free = hf_greedy(teacher, ids, mask, 10)
    eos = int(free[0, ids.size(1) + 3])  # row 0 emits it at its 4th token: a stop token for the test
    expected = hf_greedy(teacher, ids, mask, 10, eos_token_id=eos)
    got, _ = speculative_generate(close_student, teacher, ids, mask, gate="topk", top_k=1, draft_len=4,
                                  max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=PAD)  # fmt: skip
    assert torch.equal(got, expected)

    # sampled, with a list of 20 stop tokens (~1 in 5 tokens stops): nothing after the first stop but padding,
    # never more than max_new_tokens
    stop = list(range(EOS, EOS + 20))
    sampled, stats = speculative_generate(close_student, teacher, ids.repeat(8, 1), mask.repeat(8, 1), gate="spec",
                                          draft_len=4, max_new_tokens=7, eos_token_id=stop, pad_token_id=PAD,
                                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    completions = sampled[:, ids.size(1) :]
    assert completions.size(1) <= 7
    lengths = []
    for row in completions.tolist():
        stops = [i for i, token in enumerate(row) if token in stop]
        end = stops[0] + 1 if stops else 7
        assert all(token == PAD for token in row[end:]) and (stops or len(row) == 7)
        lengths.append(end)
    assert stats.generated_tokens == sum(lengths) and any(length < 7 for length in lengths)


def peaked(model, scale: float):
    """Sharpen the model's next-token distribution so that the distribution test has power."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model.eval()


@torch.no_grad()
def teacher_marginals(teacher, prompt: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distributions of the first and the second generated token under the teacher (temperature 1)."""
    first = torch.softmax(teacher(prompt).logits[0, -1].double(), dim=-1)
    continued = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
    second_given_first = torch.softmax(teacher(continued).logits[:, -1].double(), dim=-1)  # [V, V]
    return first, first @ second_given_first


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic; cells expected below 5 are pooled into one (dropped when that pool is empty)."""
    expected = probs * counts.sum()
    big = expected >= 5
    counts = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_spec_gate_samples_exactly_the_teachers_distribution():
    """Speculative sampling with the residual max(0, p - q): emitted tokens are distributed as the teacher's p, not
    as the student's q, at the first position (accept or residual) and the second (after either outcome)."""
    vocab = 16
    tokenizer = make_tokenizer()
    teacher = peaked(make_model(1, tokenizer, vocab_size=vocab), 6.0)
    student = peaked(make_model(0, tokenizer, vocab_size=vocab), 6.0)
    prompt = torch.tensor([[2, 7, 9]])
    n = 3000
    out, stats = speculative_generate(student, teacher, prompt.repeat(n, 1), torch.ones(n, 3, dtype=torch.long),
                                      gate="spec", draft_len=2, max_new_tokens=2, temperature=0.8, pad_token_id=PAD,
                                      generator=torch.Generator().manual_seed(1234))  # fmt: skip
    assert 0.2 < stats.acceptance_rate < 0.9, stats.as_dict()  # both branches are exercised often
    first, second = teacher_marginals(teacher, prompt, vocab)
    with torch.no_grad():
        q_first = torch.softmax(student(prompt).logits[0, -1].double() / 0.8, dim=-1)
    # chi-square with at most 15 degrees of freedom: P(X > 37.70) = 0.001 at 15 (fewer cells: even less likely)
    critical = 37.70
    for position, p in ((0, first), (1, second)):
        counts = torch.bincount(out[:, 3 + position], minlength=vocab).double()
        assert chi_square(counts, p) < critical, (position, counts, p * n)
    # the test has power: the student's own distribution is clearly rejected at the first position
    assert chi_square(torch.bincount(out[:, 3], minlength=vocab).double(), q_first) > 10 * critical


def test_topk_gate_emits_only_teacher_top_k_tokens(teacher, far_student):
    ids, mask = ragged_prompts()
    out, stats = speculative_generate(far_student, teacher, ids, mask, gate="topk", top_k=3, draft_len=4,
                                      max_new_tokens=6, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert stats.replaced_tokens > 0
    with torch.no_grad():
        logits = teacher(input_ids=out, attention_mask=torch.cat([mask, torch.ones_like(out[:, 5:])], 1)).logits
    for b in range(3):
        for t in range(5, out.size(1)):
            rank = (logits[b, t - 1] > logits[b, t - 1, out[b, t]]).sum()
            assert rank < 3


def test_stats_count_one_teacher_forward_per_block(teacher, close_student):
    calls = []
    handle = teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        ids, mask = ragged_prompts()
        _, stats = speculative_generate(close_student, teacher, ids, mask, gate="spec", draft_len=4,
                                        max_new_tokens=12, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        handle.remove()
    assert len(calls) == stats.teacher_calls + 1  # + the prompt prefill
    assert stats.generated_tokens == 36 and stats.row_blocks >= 3 * 3  # at most 4 tokens per block and row
    assert stats.teacher_forwards_per_token == stats.row_blocks / 36 < 1


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("on_policy_generation", "teacher", "on_policy_generation='teacher'"),
        ("gate_draft_len", 0, "gate_draft_len=0"),
        ("gate_draft_len", 2.5, "integer >= 1"),
        ("gate_draft_len", True, "integer >= 1"),
    ],
)
def test_config_validation(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        SpecKDConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, **{field: value})


def test_config_defaults(tmp_path):
    args = SpecKDConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True)
    assert (args.on_policy_generation, args.gate_draft_len) == ("student", 4)


def test_bad_arguments(teacher, far_student):
    ids, mask = ragged_prompts()
    right_padded = torch.tensor([[2, 10, PAD]])
    with pytest.raises(ValueError, match="left-padded"):
        speculative_generate(far_student, teacher, right_padded, (right_padded != PAD).long(), max_new_tokens=2,
                             pad_token_id=PAD)  # fmt: skip
    with pytest.raises(ValueError, match="draft_len=0"):
        speculative_generate(far_student, teacher, ids, mask, draft_len=0, max_new_tokens=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="gate='x'"):
        speculative_generate(far_student, teacher, ids, mask, gate="x", max_new_tokens=2, pad_token_id=PAD)


def test_evaluate_drafter_on_tiny_models(tokenizer, teacher, close_student, far_student):
    from speckd_trl.drafter import evaluate_drafter

    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for text in ("what is 1 + 2 =", "what is 3 + 4 + 5 =", "answer 7")
    ]
    # settings the call overrides, set to values of our own first, so "restored" does not lean on transformers' defaults
    fields = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    mine = (11, "heuristic", 0.25)
    for name, value in zip(fields, mine):
        setattr(close_student.generation_config, name, value)
    close = evaluate_drafter(close_student, teacher, tokenizer, prompts, max_new_tokens=10, num_assistant_tokens=3)
    assert tuple(getattr(close_student.generation_config, name) for name in fields) == mine  # settings restored
    far = evaluate_drafter(far_student, teacher, tokenizer, prompts, max_new_tokens=10, num_assistant_tokens=3)
    for result in (close, far):
        assert result["prompts"] == 3 and result["identical_fraction"] == 1.0  # greedy assisted == teacher greedy
        assert result["teacher_forwards_alone"] == result["new_tokens"]  # one token per forward alone
        assert 1.0 <= result["mean_accepted_length"] <= 4.0 and 0.0 <= result["acceptance_rate"] <= 1.0
        assert result["teacher_time_s"] > 0 and result["assisted_time_s"] > 0 and result["speedup"] > 0
    assert close["mean_accepted_length"] > 1.5 > far["mean_accepted_length"]
    assert close["acceptance_rate"] > far["acceptance_rate"]


class CacheDropper(torch.nn.Module):
    """A causal LM that never fills the `DynamicCache` it is handed, whatever transformers does by default.

    ``"ignore"``: the wrapped model runs on the fed tokens alone with ``use_cache=False`` (no cache in or out);
    ``"own"``: it writes to a fresh cache of its own and returns that one; ``"mask"``: like ``"ignore"`` but it keeps
    the caller's attention mask and positions (as a real model under a ``use_cache=False`` override does), so a
    forward after the prompt's prefill fails inside attention unless the missing cache is caught first. Either way
    the caller's cache keeps ``get_seq_length() == 0``.
    """

    def __init__(self, model: torch.nn.Module, mode: str):
        super().__init__()
        self.model, self.mode, self.config = model, mode, model.config

    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        if self.mode == "ignore":
            return self.model(input_ids=input_ids, use_cache=False)
        if self.mode == "mask":
            return self.model(input_ids=input_ids, use_cache=False, **kwargs)
        return self.model(input_ids=input_ids, past_key_values=DynamicCache(config=self.config), use_cache=True)


@pytest.mark.parametrize("mode", ["ignore", "own", "mask"])
@pytest.mark.parametrize("dropper", ["student", "teacher"])
def test_a_model_that_drops_its_cache_is_an_error(tokenizer, teacher, far_student, mode, dropper):
    """`_Batch.forward` checks that the model filled its KV cache; without the check the models would silently
    decode from the fed tokens alone (wrong logits, no error)."""
    student, verifier = far_student, teacher
    if dropper == "student":
        student = CacheDropper(far_student, mode)
    else:
        verifier = CacheDropper(teacher, mode)
    ids, mask = ragged_prompts()
    with pytest.raises(RuntimeError, match="needs the KV cache of CacheDropper, which did not fill it"):
        speculative_generate(student, verifier, ids, mask, max_new_tokens=4, pad_token_id=PAD,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    if dropper == "student":  # the one-model sampler goes through the same check
        with pytest.raises(RuntimeError, match="needs the KV cache of CacheDropper"):
            student_generate(student, ids, mask, max_new_tokens=4, pad_token_id=PAD, seeds=[0, 1, 2])


def test_on_policy_generation_keeps_the_kv_cache_under_gradient_checkpointing(tmp_path):
    """GKD turns the cache off when gradient checkpointing is on (SFTConfig's default); SpecKDTrainer generates with it
    (checkpointing is off while generating), and samples the same tokens as without it."""
    from speckd_trl.tools.testing import make_trainer

    trainer = make_trainer(tmp_path, gradient_checkpointing=True, lmbda=1.0, max_new_tokens=8)
    assert trainer.args.gradient_checkpointing and trainer.generation_config.use_cache
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    sequences = []
    for use_cache in (True, False):
        trainer.generation_config.use_cache = trainer.generation_kwargs["use_cache"] = use_cache
        torch.manual_seed(3)
        sequences.append(trainer._generate("on_policy", batch)["input_ids"])
    assert torch.equal(sequences[0], sequences[1])
