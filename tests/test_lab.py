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


def test_verdict_rules(lab):
    v = lab.verdict
    assert v(-0.1, -0.2, -0.01) == "holds"  # the interval lies below 0: in the claim's favour
    assert v(-0.1, -0.2, 0.05) == "unclear"  # favours the claim, the interval includes 0
    assert v(0.0, -0.1, 0.1) == "unclear"
    assert v(0.05, -0.1, 0.2) == "does not hold"  # the point estimate is against the claim
    assert v(0.1, 0.01, 0.2) == "does not hold"  # the interval excludes 0 against the claim
    assert v(0.3, 0.1, 0.5, lower_is_better=False) == "holds"  # e.g. the acceptance rises
    assert v(0.8, 0.5, 0.95, null=1.0) == "holds"  # a ratio below 1
    assert v(1.2, 0.7, 1.9, null=1.0) == "does not hold"
    assert v(None, None, None) == "unclear" and v(float("nan"), 0, 1) == "unclear"
    assert set(lab.VERDICTS) == {"holds", "does not hold", "unclear"}

    curve = [[5, 2.0], [10, 1.0], [15, 1.4], [20, 1.6], [25, 0.8], [30, 1.3]]
    assert lab.count_spikes(curve, warmup=10) == 2  # 1.6 > 1.5 x 1.0 and 1.3 > 1.5 x 0.8; 1.4 < 1.5 x 1.0
    assert lab.count_spikes(curve, warmup=25) == 1 and lab.count_spikes(curve, warmup=30) == 0
    assert lab.window_change([0.1, 0.2, 0.3, 0.5, 0.9]) == pytest.approx(0.8)
    assert lab.window_change([0.5]) is None
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    point, low, high = lab.sd_ratio(a, b)
    assert point == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)
    assert lab.sd_ratio([1.0, 3.0, 2.0, 5.0], [1.0, 2.0, 2.5, 2.0]) == lab.sd_ratio(
        [1.0, 3.0, 2.0, 5.0], [1.0, 2.0, 2.5, 2.0]
    )
    assert lab.sd_ratio([1.0, 2.0], [1.0, 2.0]) is None  # too few seeds

    # claims_table on made-up rows: a gate that is better than GKD on every seed holds; a worse one does not
    rows = []
    for seed in range(4):
        for method, kl in (
            ("sft", 0.5),
            ("gkd", 0.4),
            ("speckd-none", 0.4),
            ("speckd-topk", 0.3),
            ("speckd-spec", 0.6),
        ):
            rows.append({"experiment": "C1", "method": method, "seed": seed, "noise": 0.3, "beta": 0.0,
                         "kl_all": kl + 0.01 * seed * (1 + (method == "gkd")) + 0.001 * (seed % 2), "spikes": 0, "exact": 1.0,
                         "acceptance_curve": [0.1, 0.2, 0.5, 0.7, 0.8] if method.startswith("speckd") else []})  # fmt: skip
    table = {r["claim"]: r["verdict"] for r in lab.claims_table(lab.analyze_claims(rows, 0.3, 0.0))}
    assert table["C1: speckd-topk beats GKD"] == "holds" and table["C1: speckd-spec beats GKD"] == "does not hold"
    assert table["C5: speckd-topk's acceptance rises over training"] == "holds"
    assert table["C2: speckd-topk is more stable (seed spread)"] == "holds"  # sd 0.013 vs gkd 0.026 on all draws
    assert table["C2: speckd-topk has fewer loss spikes"] == "unclear"  # no spikes anywhere


def test_claims_quick(lab, tmp_path):
    """`--claims --quick`: every claim's experiment runs (2 seeds, 6 steps, 16 held-out prompts) in about 25 s."""
    threads = torch.get_num_threads()
    try:
        result = lab.main(["--claims", "--quick", "--steps", "6", "--logging-steps", "2", "--eval-prompts", "16",
                           "--output-dir", str(tmp_path / "runs"), "--plot", str(tmp_path / "claims.png"),
                           "--log", str(tmp_path / "claims")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    assert {r["experiment"] for r in rows} == {"C1", "C3", "C4", "C5"}
    assert len(result["grid"]) == 6 and "speckd-topk-sched" in result["settings"]
    sched = result["settings"]["speckd-topk-sched"]
    assert (
        sched["gate_top_k_end"] == result["settings"]["speckd-topk"]["gate_top_k"] and sched["gate_top_k_start"] == 16
    )
    assert {r["beta"] for r in rows if r["experiment"] == "C4"} == {0.5, 1.0}
    assert {r["noise"] for r in rows if r["experiment"] == "C3"} == {0.0, 0.6}
    assert all(len(r["loss_curve"]) == 3 and r["spikes"] >= 0 for r in rows)
    claims = result["claims"]
    assert len(claims) == 17 and all(c["verdict"] in lab.VERDICTS for c in claims)
    assert {c["claim"][:2] for c in claims} == {"C1", "C2", "C3", "C4", "C5"}
    assert set(result["analysis"]["C5"]["acceptance"]) == {"speckd-topk", "speckd-spec", "speckd-topk-sched"}
    assert (tmp_path / "claims.png").stat().st_size > 0
    log = (tmp_path / "claims.log").read_text()
    assert "PLAN 46 runs" in log and log.count("VERDICT ") == 17 and '"claims": [' in log.splitlines()[-1]
    again = lab.from_json(str(tmp_path / "claims.json"), str(tmp_path / "again.png"))  # verdicts from the rows alone
    assert again["claims"] == json.loads(json.dumps(claims))
