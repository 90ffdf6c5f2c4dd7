"""Smoke test of the synthetic lab (`benchmarks/lab.py`): the process, the computable teacher and a quick run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lab():
    path = str(ROOT / "benchmarks")
    sys.path.insert(0, path)  # lab.py imports lab_process from its own folder
    try:
        yield _load("lab")
    finally:
        sys.path.remove(path)


def test_process_and_teacher(lab):
    lp = lab.lp
    splits = lp.make_splits(50, 20, 20, seed=0)
    assert not {tuple(p) for p in splits.train} & {tuple(p) for p in splits.test}
    data = lab.eval_set(splits.test, seed=1)
    tokenizer = lp.make_lab_tokenizer()
    row = lp.chat_rows(splits.test[:1], seed=1)[0]
    ids = tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False)
    assert ids["input_ids"][: len(lp.prompt_ids(splits.test[0]))] == lp.prompt_ids(splits.test[0])

    exact = lab.make_teacher(0.0, 1.0)
    ref = lab.teacher_reference(exact, data)
    assert ref["kl_all"] < 1e-3 and ref["exact"] == 1.0  # noise 0: the teacher is the process
    noisy = lab.teacher_reference(lab.make_teacher(0.3, 1.0), data)
    assert noisy["kl_det"] == pytest.approx(-math.log(0.7), abs=0.05)  # 30% of the mass moved off the right token
    assert noisy["kl_ent"] > 0.05 and noisy["exact"] == 1.0  # argmax still right at noise 0.3
    flip = lab.teacher_reference(lab.make_teacher(0.3, 1.0, "flip"), data)
    assert flip["exact"] < 0.8  # confidently wrong at about 30% of the deterministic slots


def test_quick_run(lab, tmp_path):
    threads = torch.get_num_threads()
    try:
        result = lab.main(["--quick", "--steps", "4", "--methods", "gkd,speckd-topk", "--eval-prompts", "16",
                           "--output-dir", str(tmp_path / "runs"), "--plot", str(tmp_path / "lab.png"),
                           "--log", str(tmp_path / "lab-quick")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    assert len(rows) == 4 and {r["seed"] for r in rows} == {0, 1}
    for r in rows:
        assert r["steps"] == 4 and all(math.isfinite(r[m]) for m in ("kl_all", "kl_det", "kl_ent"))
        assert r["teacher_forwards"] == 4  # one teacher forward per micro-batch
    assert 0 <= result["table"]["speckd-topk"]["train_acceptance"][0] <= 1
    assert result["paired"]["speckd-topk - gkd/kl_all"][2] == 2  # paired over both seeds
    assert (tmp_path / "lab.png").stat().st_size > 0
    assert json.loads((tmp_path / "lab-quick.json").read_text())["settings"]["speckd-topk"]["gate_top_k"] >= 1
    again = lab.from_json(str(tmp_path / "lab-quick.json"), str(tmp_path / "again.png"))  # re-report, no training
    assert again["rows"] == json.loads(json.dumps(rows)) and (tmp_path / "again.png").stat().st_size > 0
