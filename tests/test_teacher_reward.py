"""`TeacherAcceptanceReward`: the teacher's verdict as a TRL reward function (GRPO's ``reward_funcs``)."""

import math
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from speckd_trl import TeacherAcceptanceReward
from speckd_trl.tools.testing import (
    TINY_ARGS,
    make_model,
    make_prompt_dataset,
    make_tokenizer,
    save_teacher_with_another_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    model = make_model(1, tokenizer)
    with torch.no_grad():  # larger logits: a spread of ranks, so that top-k both accepts and rejects
        model.get_output_embeddings().weight.mul_(10)
    return model.eval()


def chat_prompts(n=4):
    return [row["prompt"] for row in make_prompt_dataset(n)]


def text_prompts(n=4):
    return [f"what is {i} + {i + 1} =" for i in range(n)]


def random_completions(n, tokenizer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 5, 1, 4, 2, 6][:n]
    return [torch.randint(4, len(tokenizer), (c,), generator=generator).tolist() for c in lengths]


def by_hand(teacher, tokenizer, prompts, completion_ids, k):
    """Per completion, one unpadded teacher forward; a token is accepted iff fewer than k tokens come before it in
    the teacher's order (a larger logit, or an equal logit and a smaller id) at the previous position."""
    rewards = []
    for prompt, completion in zip(prompts, completion_ids):
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        else:
            text = prompt
        prompt_ids = tokenizer(text)["input_ids"]
        ids = torch.tensor([prompt_ids + completion])
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0]
        accepted = 0
        for t, token in enumerate(completion):
            row = logits[len(prompt_ids) + t - 1]
            ahead = (row > row[token]).sum() + (row[:token] == row[token]).sum()
            accepted += int(ahead < k)
        rewards.append(accepted / len(completion))
    return rewards


@pytest.mark.parametrize("kind", ["chat", "plain"])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_reward_equals_by_hand_count(tokenizer, teacher, kind, k):
    prompts = chat_prompts() if kind == "chat" else text_prompts()
    completions = random_completions(len(prompts), tokenizer)
    reward = TeacherAcceptanceReward(teacher, tokenizer, gate="topk", top_k=k)
    got = reward(prompts=prompts, completions=[None] * len(prompts), completion_ids=completions)
    expected = by_hand(teacher, tokenizer, prompts, completions, k)
    assert got == pytest.approx(expected, abs=1e-6)
    assert all(isinstance(r, float) for r in got)
    if k == 5:
        assert 0 < sum(got) < len(got), "the test should see both accepted and rejected tokens"


def test_greedy_completion_of_the_teacher_itself_gets_reward_one(tokenizer):
    """Policy = teacher, k=1: every greedily generated token is the teacher's argmax at the previous position, so the
    reward is 1; a prompt/completion misalignment by one position would score the argmax of the wrong position."""
    policy = make_model(0, tokenizer).eval()
    prompts = chat_prompts(3) + text_prompts(3)
    completion_ids = []
    for prompt in prompts:
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        out = policy.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6, min_new_tokens=6)
        completion_ids.append(out[0, len(ids) :].tolist())
    reward = TeacherAcceptanceReward(policy, tokenizer, top_k=1)
    assert reward(prompts=prompts[:3], completion_ids=completion_ids[:3]) == [1.0, 1.0, 1.0]
    assert reward(prompts=prompts[3:], completion_ids=completion_ids[3:]) == [1.0, 1.0, 1.0]
    # the same tokens one position later are (mostly) not the argmax: the check is not vacuous
    shifted = [[ids[0], *ids[:-1]] for ids in completion_ids[:3]]
    assert min(reward(prompts=prompts[:3], completion_ids=shifted)) < 1.0


def test_spec_and_none_gates_are_refused(tokenizer, teacher):
    with pytest.raises(ValueError, match="probabilit.*gate='topk'"):
        TeacherAcceptanceReward(teacher, tokenizer, gate="spec")
    with pytest.raises(ValueError, match="accepts every token"):
        TeacherAcceptanceReward(teacher, tokenizer, gate="none")
    with pytest.raises(ValueError, match="not supported"):
        TeacherAcceptanceReward(teacher, tokenizer, gate="nope")


def test_top_k_must_be_below_the_vocabulary(tokenizer, teacher):
    with pytest.raises(ValueError, match="top_k=96"):
        TeacherAcceptanceReward(teacher, tokenizer, top_k=96)


def test_vocabulary_mismatch_is_an_error(tokenizer, tmp_path):
    small = make_model(1, tokenizer, vocab_size=50)
    with pytest.raises(ValueError, match="Vocabulary mismatch.*96 tokens.*50 logits"):
        TeacherAcceptanceReward(small, tokenizer)
    # a teacher by path whose own tokenizer gives shared ids to other tokens (same size)
    path = save_teacher_with_another_tokenizer(tmp_path / "teacher", tokenizer)
    with pytest.raises(ValueError, match="Vocabulary mismatch.*differ on 2"):
        TeacherAcceptanceReward(str(path), tokenizer)


def test_teacher_by_path_loads_and_scores(tokenizer, teacher, tmp_path):
    teacher.save_pretrained(tmp_path / "t")
    tokenizer.save_pretrained(tmp_path / "t")
    prompts, completions = text_prompts(2), random_completions(2, tokenizer)
    by_path = TeacherAcceptanceReward(str(tmp_path / "t"), tokenizer, top_k=5, device="cpu")
    loaded = TeacherAcceptanceReward(teacher, tokenizer, top_k=5)
    assert by_path(prompts=prompts, completion_ids=completions) == loaded(prompts=prompts, completion_ids=completions)
    with pytest.raises(ValueError, match="load_in_4bit=True loads a teacher given as a name or path"):
        TeacherAcceptanceReward(teacher, tokenizer, load_in_4bit=True)


def test_teacher_by_path_in_4bit(tokenizer, teacher, tmp_path):
    pytest.importorskip("bitsandbytes")
    teacher.save_pretrained(tmp_path / "t")
    reward = TeacherAcceptanceReward(str(tmp_path / "t"), tokenizer, top_k=5, load_in_4bit=True, device="cpu")
    assert reward.teacher.is_loaded_in_4bit
    prompts, completions = chat_prompts(2), random_completions(2, tokenizer)
    got = reward(prompts=prompts, completion_ids=completions)
    assert got == pytest.approx(by_hand(reward.teacher, tokenizer, prompts, completions, 5), abs=1e-6)


def test_chat_prompt_without_chat_template_is_an_error(teacher):
    plain = make_tokenizer()
    plain.chat_template = None
    reward = TeacherAcceptanceReward(teacher, plain)
    assert len(reward(prompts=text_prompts(1), completion_ids=[[10, 11]])) == 1  # plain prompts need none
    with pytest.raises(ValueError, match="no chat template"):
        reward(prompts=chat_prompts(1), completion_ids=[[10, 11]])


def test_empty_completion_gets_the_documented_value(tokenizer, teacher):
    prompts, completions = text_prompts(3), [[10, 11], [], [12]]
    reward = TeacherAcceptanceReward(teacher, tokenizer)
    got = reward(prompts=prompts, completion_ids=completions)
    assert got[1] == 0.0
    assert got[0] == reward(prompts=prompts[:1], completion_ids=completions[:1])[0]  # the others are unaffected
    assert reward(prompts=prompts[1:2], completion_ids=[[]]) == [0.0]  # a batch of empty ones: no forward
    missing = TeacherAcceptanceReward(teacher, tokenizer, empty_reward=None)
    assert missing(prompts=prompts, completion_ids=completions)[1] is None


def length_reward(completions, **kwargs):
    """A trivial rule reward beside the teacher's: shorter completions score higher."""
    return [-float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]


def test_grpo_trains_with_the_teacher_reward_and_logs_it(tokenizer, teacher, tmp_path):
    policy = make_model(0, tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    reward = TeacherAcceptanceReward(teacher, tokenizer, top_k=5)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        **TINY_ARGS,
        num_generations=2,
        max_completion_length=4,
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[reward, length_reward],
        args=args,
        train_dataset=make_prompt_dataset(8),
        processing_class=tokenizer,
    )
    assert trainer.reward_func_names == ["teacher_acceptance", "length_reward"]
    # the prompts are tokenized as GRPO tokenizes them for generation (a private TRL method: this pins the contract)
    for prompts in (chat_prompts(3), text_prompts(3)):
        assert reward.prompt_ids(prompts) == [list(ids) for ids in trainer._tokenize_prompts(prompts)[0]]
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rewards/teacher_acceptance/mean" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert 0.0 <= entry["rewards/teacher_acceptance/mean"] <= 1.0
        assert not math.isnan(entry["rewards/teacher_acceptance/mean"])
        assert "rewards/length_reward/mean" in entry
    changed = any(not torch.equal(before[n], p) for n, p in policy.named_parameters())
    assert changed, "GRPO did not update the policy"


def test_a_padded_teacher_ranks_the_tokenizers_ids_only(tokenizer):
    """A teacher embedding padded past the tokenizer (as Qwen's), whose padding logits are the highest: the reward
    ranks the tokenizer's ids only, as SpecKDTrainer compares them, so the teacher's best real token is accepted."""
    teacher = make_model(1, tokenizer, vocab_size=128).eval()
    n = len(tokenizer)
    teacher.get_output_embeddings().register_forward_hook(
        lambda module, args, logits: logits.index_fill(-1, torch.arange(n, 128), 1e4)
    )
    prompts = text_prompts(2)
    completions = []
    for prompt in prompts:  # the teacher's own greedy tokens among the real ids
        ids = tokenizer(prompt)["input_ids"]
        for _ in range(4):
            with torch.no_grad():
                logits = teacher(input_ids=torch.tensor([ids])).logits[0, -1]
            assert logits.argmax() >= n  # a padding row scores highest
            ids = ids + [int(logits[:n].argmax())]
        completions.append(ids[-4:])
    reward = TeacherAcceptanceReward(teacher, tokenizer, top_k=1)
    assert reward(prompts=prompts, completion_ids=completions) == [1.0, 1.0]

    def real_ids_only(input_ids):
        return SimpleNamespace(logits=teacher(input_ids=input_ids).logits[..., :n])

    random = random_completions(2, tokenizer, seed=3)  # and any k: the by-hand count over the tokenizer's ids
    got = TeacherAcceptanceReward(teacher, tokenizer, top_k=5)(prompts=prompts, completion_ids=random)
    assert got == pytest.approx(by_hand(real_ids_only, tokenizer, prompts, random, 5), abs=1e-6)
