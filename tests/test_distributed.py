"""Two CPU processes (`python -m torch.distributed.run`, gloo; DDP): the same batch kind on every process at every
step, and the loss of one process on the same global batch, with the eager and the chunked loss."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from speckd_trl.tools.testing import torchrun


REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ddp_worker", REPO / "tests" / "ddp_worker.py")
ddp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_worker)


# `python -m torch.distributed.run` is `torchrun` without needing the script on PATH (a venv that is not activated)
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """One launch of 2 processes for both loss paths of `SpecKDTrainer` and for `SpecKDDistillationTrainer`."""
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun([REPO / "tests" / "ddp_worker.py", out, 2], nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("loss_path", ddp_worker.LOSS_PATHS)
def test_two_processes_agree_and_match_one_process(ddp_run, tmp_path, loss_path):
    ranks = [json.loads((ddp_run / f"{loss_path}.rank{i}.json").read_text()) for i in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]

    # every process drew the same kind at every step; lmbda=0.5 gave both kinds
    assert ranks[0]["kinds"] == ranks[1]["kinds"]
    assert {"on_policy", "off_policy"} <= set(ranks[0]["kinds"])

    # 2 processes x batch 2 == 1 process x batch 4: same loss and gate metrics at every step
    reference = ddp_worker.run(str(tmp_path), 4, loss_path)
    assert reference["kinds"] == ranks[0]["kinds"]
    assert len(reference["logs"]) == len(ranks[0]["logs"]) == 4
    for got, expected in zip(ranks[0]["logs"], reference["logs"]):
        assert expected["loss"] > 0
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)
        assert got["gate/acceptance_rate"] == pytest.approx(expected["gate/acceptance_rate"], abs=1e-6)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_distillation_trainer_two_processes_match_one_process(ddp_run, tmp_path):
    ranks = [json.loads((ddp_run / f"distillation.rank{i}.json").read_text()) for i in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    reference = ddp_worker.run_distillation(str(tmp_path), 4)
    assert len(reference["logs"]) == len(ranks[0]["logs"]) == 4
    for got, expected in zip(ranks[0]["logs"], reference["logs"]):
        assert expected["loss"] > 0
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)
        assert got["gate/acceptance_rate"] == pytest.approx(expected["gate/acceptance_rate"], abs=1e-6)
