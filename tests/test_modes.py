"""The modes a config resolves from its string fields (`config.modes`): the schedules' values, and the resolved object
staying out of what is saved (`to_dict`, pickling) while following the fields."""

import json
import pickle

import pytest

from speckd_trl.config import SpecKDConfig, SpecKDDistillationConfig
from speckd_trl.schedules import ConstantSchedule, LinearSchedule


def test_schedules():
    assert [ConstantSchedule(5).at(s, 4) for s in range(4)] == [5, 5, 5, 5]
    linear = LinearSchedule(0.1, 0.5)
    assert [linear.at(s, 5) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert linear.at(9, 5) == pytest.approx(0.5) and linear.at(3, 1) == pytest.approx(0.1)
    assert (linear.max, linear.min) == (0.5, 0.1)
    assert [LinearSchedule(4, 1, rounded=True).at(s, 4) for s in range(4)] == [4, 3, 2, 1]
    assert LinearSchedule(1, 2, rounded=True).at(1, 3) == 2  # 1.5 rounds half up
    assert ConstantSchedule(3).fields("gate_top_k") == {"gate_top_k": 3}
    assert linear.fields("reject_weight") == {"reject_weight_start": 0.1, "reject_weight_end": 0.5}


def test_modes_follow_the_fields_and_are_not_saved(tmp_path):
    args = SpecKDConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        reject_weight_schedule="linear",
        reject_weight_start=1.0,
        reject_weight_end=0.5,
        gate_proposal="sample",
        loss_path="eager",
    )
    modes = args.modes
    assert modes.reject_weight.at(0, 3) == 1.0 and modes.top_k.at(2, 3) == 5
    assert (modes.proposal.name, modes.loss_path.name, modes.mixing.name) == ("sample", "eager", "batch")
    assert not modes.loss_path.from_hidden_states and modes.proposal.draws_uniforms
    assert "modes" not in args.to_dict() and "modes" not in json.loads(args.to_json_string())
    assert pickle.loads(pickle.dumps(args)).modes == modes
    args.gate_normalize = "accepted"  # a field changed after construction is what the modes say
    assert args.modes.normalization.name == "accepted"
    distillation = SpecKDDistillationConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert not hasattr(distillation.modes, "loss_path") and not distillation.modes.reject_target.filters
