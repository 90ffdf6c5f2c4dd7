"""FSDP2 on 2 CPU processes (gloo) through accelerate's FSDP2 path (`examples/accelerate/fsdp2.yaml`):
`SpecKDTrainer` with the eager and the chunked loss, and `SpecKDDistillationTrainer`, each gated with `topk`, train
with student and teacher sharded, and match one process on the same global batch (losses and final weights).

accelerate 1.15 turns no CPU job into an FSDP job (with `use_cpu` it silently trains DDP instead): the worker
(`tests/fsdp_worker.py`, see its docstring) forms the gloo group and applies the launcher's FSDP plugin itself; the
sharding, gathering and gradient reduction are then accelerate's and torch's own FSDP2 code. The GPU version of these
checks, through the plain `accelerate launch`, is in `tests/test_gpu.py`.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from speckd_trl.tools.testing import accelerate_launch, make_model, make_tokenizer, make_trainer


REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "accelerate" / "fsdp2.yaml"
WORKER = REPO / "tests" / "fsdp_worker.py"
_spec = importlib.util.spec_from_file_location("fsdp_worker", WORKER)
fsdp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fsdp_worker)

# 2 FSDP2 processes x batch 2 against 1 process x batch 4, 4 steps at lr 5e-3 (measured: losses within 1.9e-6
# relative, weights within 8e-7, while the steps move the weights by about 1e-2)
LOSS_REL, WEIGHT_ABS, MIN_WEIGHT_CHANGE = 1e-5, 1e-5, 1e-3


def _fsdp2_unavailable() -> str | None:
    """Why FSDP2 cannot run on 2 CPU processes here, or None."""
    if not torch.distributed.is_available():
        return "this torch build has no torch.distributed"
    if not torch.distributed.is_gloo_available():
        return "this torch build has no gloo backend (FSDP2 on CPU processes needs it)"
    try:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        return f"FSDP2 is not available in this torch / accelerate: {err}"
    return None


pytestmark = pytest.mark.skipif(_fsdp2_unavailable() is not None, reason=str(_fsdp2_unavailable()))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    tokenizer = make_tokenizer()
    make_model(1, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, teacher_dir) -> Path:
    """One launch of 2 processes for every case (the launch costs more than the runs)."""
    out = tmp_path_factory.mktemp("fsdp2")
    result = accelerate_launch(CONFIG, [WORKER, out, teacher_dir], timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return out


def _ranks(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}.rank{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize("case", fsdp_worker.CASES)
def test_two_fsdp2_processes_train_and_match_one_process(fsdp_run, teacher_dir, tmp_path, case):
    ranks = _ranks(fsdp_run, case)
    for record in ranks:
        assert record["world"] == 2
        assert record["distributed_type"] == "DistributedType.FSDP" and record["fsdp_version"] == 2
        student = record["student"]
        assert student["fsdp2"] and student["dtensor_params"] == student["params"], student
        assert student["head_weight"] == "DTensor"  # the output layer, read by the chunked losses, is sharded
    # the loss and the gate metrics are logged over all processes (mean loss, summed gate counts)
    for key in ("loss", "gate/acceptance_rate"):
        assert [e[key] for e in ranks[0]["logs"]] == [e[key] for e in ranks[1]["logs"]], key

    # 2 processes x batch 2 == 1 process x batch 4 (no FSDP): the same losses and gate metrics at every step
    reference = fsdp_worker.run(str(tmp_path), case, per_device_batch=4, teacher_dir=str(teacher_dir))
    assert reference["world"] == 1 and reference["distributed_type"] == "DistributedType.NO"
    assert len(ranks[0]["logs"]) == len(reference["logs"]) == fsdp_worker.STEPS
    for got, expected in zip(ranks[0]["logs"], reference["logs"]):
        assert expected["loss"] > 0
        assert got["loss"] == pytest.approx(expected["loss"], rel=LOSS_REL)
        assert got["gate/acceptance_rate"] == pytest.approx(expected["gate/acceptance_rate"], abs=1e-6)

    # and the same weights after the last step: the gradients were reduced across processes (lm_head included)
    got = torch.load(fsdp_run / f"{case}.weights.pt", map_location="cpu")
    expected = torch.load(tmp_path / f"{case}.weights.pt", map_location="cpu")
    initial = dict(make_model(0, make_tokenizer()).named_parameters())
    assert got.keys() == expected.keys()
    for name in expected:
        assert (got[name] - expected[name]).abs().max().item() <= WEIGHT_ABS, name
    change = max((expected[n] - initial[n].detach()).abs().max().item() for n in expected)
    assert change >= MIN_WEIGHT_CHANGE


def test_teacher_is_sharded_with_the_student(fsdp_run):
    """TRL issue #2580 ("Expected all tensors to be on the same device" with a teacher under FSDP): TRL 1.16's GKD
    leaves its teacher unwrapped and where it was loaded; ours is sharded by FSDP2 onto each process's device. (On CPU
    processes every tensor is on the CPU anyway: the device error itself can only show on a GPU, `test_gpu.py`.)"""
    for case in fsdp_worker.CASES:
        for record in _ranks(fsdp_run, case):
            teacher = record["teacher"]
            assert teacher["fsdp2"] and teacher["dtensor_params"] == teacher["params"], (case, teacher)
            assert teacher["device"] == record["student"]["device"]
    for record in _ranks(fsdp_run, "untrained"):
        assert not record["gkd_teacher"]["fsdp2"] and record["gkd_teacher"]["dtensor_params"] == 0


def test_errors_under_fsdp2(fsdp_run):
    for record in _ranks(fsdp_run, "untrained"):
        assert "not supported under FSDP with several processes" in record["speculative_error"]
        # a trainable output layer read while still sharded would get a gradient that bypasses FSDP2's reduction
        assert "still sharded by FSDP2" in record["sharded_head_error"]
        assert record["sharded_head_no_grad"] == [96, 64]  # without gradient it is gathered whole


def test_fsdp_requested_but_not_applied_warns(tmp_path, monkeypatch):
    """What `accelerate launch --config_file fsdp2.yaml ... --use_cpu` gives on CPU processes (measured with accelerate
    1.15: a MULTI_CPU job, the student in DDP): FSDP is not applied; here the same with one process."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.warns(UserWarning, match="FSDP was requested .* runs this job as NO, without FSDP"):
        trainer = make_trainer(tmp_path)
    assert getattr(trainer.accelerator.state, "fsdp_plugin", None) is None
