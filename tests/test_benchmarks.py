"""Smoke tests of the benchmark scripts (a refactor of the trainer once broke one unnoticed): `speed_memory.py` (GKD
and the default SpecKD, one measurement: its table and a final JSON line with the ratios to GKD),
`trl_side_by_side.py` (SpecKD's distillation trainers beside their TRL parents) and `teacher_cache.py --bias`, each on
tiny models."""

import json
import math
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def test_speed_memory_runs_and_reports_ratios(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "speed_memory.py"), "--vocab", "128", "--hidden", "64"]
    command += ["--layers", "1", "--seq", "32", "--new-tokens", "4", "--steps", "1", "--warmup", "0", "--threads", "1"]
    command += ["--methods", "GKD,SpecKD defaults", "--measures", "off-policy step", "--plot", str(tmp_path / "p.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"GKD", "SpecKD defaults"}
    gkd, default = rows["GKD"], rows["SpecKD defaults"]
    assert gkd["ms_ratio"] == 1.0
    # at this size a step may fit in memory the process already holds (a peak of 0 above the start: no ratio)
    assert gkd["mem_ratio"] == 1.0 if gkd["peak_mib"] > 0 else math.isnan(gkd["mem_ratio"])
    assert default["ms"] > 0 and default["peak_mib"] >= 0 and default["gate_ms"] > 0  # the gate (topk) ran
    assert (tmp_path / "p.png").stat().st_size > 0


def test_teacher_cache_bias_runs_on_tiny_models(tmp_path):
    """`benchmarks/teacher_cache.py --bias` on tiny models: the top-K + tail loss over the full one per data kind,
    student, K and beta. In float32 storage the cut is a lower bound at every row and K = V gives the full loss."""
    command = [sys.executable, str(REPO / "benchmarks" / "teacher_cache.py"), "--bias", "--tiny", "--rows", "4"]
    command += ["--ks", "8,32", "--max-new-tokens", "4", "--threads", "1", "--values-dtype", "float32"]
    command += ["--plot", str(tmp_path / "p.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    table, vocab = report["table"], report["vocab"]
    assert report["ks"] == [8, 32, vocab] and report["check_max_abs_ratio_minus_1"] < 1e-6
    assert {(r["data"], r["student"]) for r in table} == {
        (kind, student) for kind in ("arithmetic", "chat", "docs") for student in ("base", "noise0.05")
    }
    assert len(table) == 6 * 3 * 2 and all(r["rows"] == 4 for r in table)
    for r in table:
        if r["k"] == vocab:
            assert abs(r["ratio_min"] - 1) < 1e-5 and abs(r["ratio_max"] - 1) < 1e-5, r
        else:
            assert 0 < r["ratio_min"] and r["ratio_max"] <= 1 + 1e-5, r
    assert (tmp_path / "p.png").stat().st_size > 0


def test_packing_benchmark_runs_and_reports_the_saving(tmp_path):
    """`benchmarks/packing.py` on tiny models: every method measured, the packed micro-batches compute fewer positions
    than the padded ones, and the report states the shares (behaviour only: no timing is asserted)."""
    command = [sys.executable, str(REPO / "benchmarks" / "packing.py"), "--vocab", "128", "--hidden", "64"]
    command += ["--layers", "1", "--batch", "4", "--batches", "2", "--median", "24", "--max-length", "64"]
    command += ["--steps", "1", "--warmup", "0", "--threads", "1", "--plot", str(tmp_path / "p.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"GKD", "DistillationTrainer", "SpecKD padded", "SpecKD packed"}
    layout = report["layout"]
    assert layout["real_tokens"] <= layout["packed_positions"] < layout["padded_positions"]
    assert 0 < report["positions_removed"] <= report["padding_share"] < 1
    assert all(row["tokens_per_s"] > 0 and row["peak_mib"] >= 0 for row in rows.values())
    assert isinstance(report["saving_within_10pct_of_removed"], bool) and "positions packing removes" in result.stdout
    assert (tmp_path / "p.png").stat().st_size > 0


def test_trl_side_by_side_runs_and_pairs_each_trainer_with_its_parent(tmp_path):
    """`benchmarks/trl_side_by_side.py` on tiny models: `SpecKDDistillationTrainer` beside TRL's
    `DistillationTrainer` and `SpecKDServerDistillationTrainer` beside `ServerDistillationTrainer` (the in-process
    teacher client on both sides), dataset and on-policy steps: one comparison per pair and step, the gate timed inside
    the SpecKD steps only. Behaviour only: no timing is asserted."""
    methods = "TRL Distillation,SpecKD-Distill topk,TRL ServerDistill,SpecKD-Server topk"
    command = [sys.executable, str(REPO / "benchmarks" / "trl_side_by_side.py"), "--vocab", "128", "--hidden", "64"]
    command += ["--layers", "1", "--seq", "32", "--new-tokens", "4", "--steps", "1", "--warmup", "0", "--threads", "1"]
    command += ["--methods", methods, "--plot", str(tmp_path / "p.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hidden 64 x 1 layers, vocab 128" in result.stdout and "fp32" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["precision"] == "fp32"
    rows = {(row["method"], row["measure"]): row for row in report["rows"]}
    assert set(rows) == {(m, s) for m in methods.split(",") for s in ("dataset step", "on-policy step")}
    for (method, _), row in rows.items():
        assert row["ms"] > 0 and row["peak_mib"] >= 0 and math.isfinite(row["loss"])
        assert (row["gate_ms"] > 0) == method.startswith("SpecKD"), row  # topk gates; TRL has no gate
    pairs = {(c["speckd"], c["trl"], c["measure"]) for c in report["comparisons"]}
    assert pairs == {
        (ours, trl, step)
        for ours, trl in (("SpecKD-Distill topk", "TRL Distillation"), ("SpecKD-Server topk", "TRL ServerDistill"))
        for step in ("dataset step", "on-policy step")
    }
    assert all(c["ms_ratio"] > 0 and 0 <= c["gate_share"] < 1 for c in report["comparisons"])
    assert (tmp_path / "p.png").stat().st_size > 0
