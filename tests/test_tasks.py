"""reasoning-gym datasets: sizes, determinism, disjoint splits, chat format, answer matching."""

from __future__ import annotations

import pytest

from speckd_trl.demo.tasks import DEFAULT_TASK, build_task_dataset, exact_match, extract_answer


@pytest.fixture(scope="module")
def data():
    return build_task_dataset(num_train=300, num_eval=100, seed=0)


def _prompts(split):
    return [row["messages"][0]["content"] for row in split]


def test_split_sizes(data):
    assert DEFAULT_TASK == "basic_arithmetic"
    assert set(data) == {"train", "eval"}
    assert len(data["train"]) == 300
    assert len(data["eval"]) == 100


def test_same_seed_same_rows_other_seed_other_rows(data):
    again = build_task_dataset(num_train=300, num_eval=100, seed=0)
    assert again["train"].to_list() == data["train"].to_list()
    assert again["eval"].to_list() == data["eval"].to_list()
    other = build_task_dataset(num_train=300, num_eval=100, seed=1)
    # reasoning-gym seeds items with seed + idx; seed 1 must not just be seed 0 shifted by one item.
    assert len(set(_prompts(other["train"])) & set(_prompts(data["train"]))) < 150


def test_eval_disjoint_from_train_and_unique(data):
    train, evals = set(_prompts(data["train"])), _prompts(data["eval"])
    assert not train & set(evals)
    assert len(set(evals)) == len(evals)


def test_dedup_keeps_eval_size_on_a_tiny_task_space():
    # two operands in 0..10: 121 distinct prompts, so many eval draws repeat train ones.
    data = build_task_dataset(num_train=150, num_eval=30, seed=3, min_digits=1, max_digits=1)
    assert len(data["eval"]) == 30
    assert not set(_prompts(data["train"])) & set(_prompts(data["eval"]))


def test_exhausted_task_space_raises():
    with pytest.raises(ValueError, match="eval prompts not in train"):
        build_task_dataset(num_train=2000, num_eval=100, seed=0, min_digits=1, max_digits=1)


def test_message_format_and_answers(data):
    for row in data["train"].to_list()[:50] + data["eval"].to_list()[:50]:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == row["answer"]
        assert "only" in user["content"].lower()
        assert len(user["content"]) < 100
        # the answer is the value of the expression in the prompt
        expression = user["content"].removeprefix("What is ").split("?")[0]
        assert set(expression) <= set("0123456789+ ") and expression.count(" + ") == 1
        assert int(row["answer"]) == eval(expression)  # noqa: S307 - digits, +, - and spaces only


def test_task_kwargs_and_other_tasks():
    data = build_task_dataset(num_train=20, num_eval=5, seed=0, min_terms=4, max_terms=4)
    assert all(
        row["messages"][0]["content"].count(" + ") + row["messages"][0]["content"].count(" - ") == 3
        for row in data["train"]
    )
    gcd = build_task_dataset("gcd", num_train=4, num_eval=2)
    assert "Answer with only the final answer." in gcd["train"][0]["messages"][0]["content"]
    with pytest.raises(ValueError, match="Unknown reasoning-gym task"):
        build_task_dataset("no_such_task", num_train=1, num_eval=1)
    with pytest.raises(ValueError, match="allow_parentheses"):
        build_task_dataset(num_train=1, num_eval=1, operators=("+", "/"))
    chain = build_task_dataset("chain_sum", num_train=30, num_eval=5)
    assert any(" - " in row["messages"][0]["content"] for row in chain["train"])
    with pytest.raises(ValueError, match="seed"):
        build_task_dataset(num_train=1, num_eval=1, size=3)
    assert len(build_task_dataset(num_train=3, num_eval=0)["eval"]) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", "42"),
        ("  42.\n", "42"),
        ("-7<|im_end|>", "-7"),
        ("3 + 4 = 7", "7"),
        ("The answer is 12.", "12"),
        ("Answer: 5", "5"),
        ("<answer> 9 </answer>", "9"),
        ("8\nBecause 5 + 3 = 8.", "8"),
        ("", ""),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("42", "42", True),
        (" 42. ", "42", True),
        ("42.0", "42", True),
        ("+42", "42", True),
        ("1,000", "1000", True),
        ("-4", "-4", True),
        ("4", "-4", False),
        ("43", "42", False),
        ("2 + 3 = 5<|im_end|>", "5", True),
        ("To solve this, we add 2 and 3", "5", False),
        ("yes", "Yes", False),
        ("Paris.", "Paris", True),
        ("nan", "nan", True),
        ("inf", "inf", True),
    ],
)
def test_exact_match(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected
