"""Two CPU processes (`python -m torch.distributed.run`, gloo): the same batch kind on every process at every step,
and the loss of one process on the same global batch."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ddp_worker", REPO / "tests" / "ddp_worker.py")
ddp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_worker)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `python -m torch.distributed.run` is `torchrun` without needing the script on PATH (a venv that is not activated)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_processes_agree_and_match_one_process(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), str(REPO / "tests" / "ddp_worker.py"), str(multi), "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((multi / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]

    # every process drew the same kind at every step; lmbda=0.5 gave both kinds
    assert ranks[0]["kinds"] == ranks[1]["kinds"]
    assert {"on_policy", "off_policy"} <= set(ranks[0]["kinds"])

    # 2 processes x batch 2 == 1 process x batch 4: same loss and gate metrics at every step
    reference = ddp_worker.run(str(single), 4)
    assert reference["kinds"] == ranks[0]["kinds"]
    assert len(reference["logs"]) == len(ranks[0]["logs"]) == 4
    for got, expected in zip(ranks[0]["logs"], reference["logs"]):
        assert expected["loss"] > 0
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)
        assert got["gate/acceptance_rate"] == pytest.approx(expected["gate/acceptance_rate"], abs=1e-6)
