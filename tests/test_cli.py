"""`speckd-trl` on tiny models saved to disk and a local JSONL dataset."""

import pytest

from speckd_trl.cli import main


def test_cli_trains_on_local_files(workspace, tmp_path):
    out = tmp_path / "out"
    status = main(
        [
            "--model_name_or_path", str(workspace / "student"),
            "--teacher_model_name_or_path", str(workspace / "teacher"),
            "--dataset_name", str(workspace / "train.jsonl"),
            "--output_dir", str(out),
            "--use_cpu", "--report_to", "none", "--save_strategy", "no",
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_new_tokens", "4",
            "--gate", "spec", "--lmbda", "0.5",
            "--use_peft", "--lora_r", "4", "--lora_target_modules", "all-linear",
        ]
    )  # fmt: skip
    assert status == 0
    assert (out / "adapter_config.json").is_file()


def test_cli_reads_a_yaml_recipe(workspace, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {workspace / 'student'}\n"
        f"teacher_model_name_or_path: {workspace / 'teacher'}\n"
        f"dataset_name: {workspace / 'train.jsonl'}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "use_cpu: true\nreport_to: none\nsave_strategy: 'no'\nmax_steps: 1\nper_device_train_batch_size: 2\n"
        "max_new_tokens: 4\ngate: topk\ngate_top_k: 10\nteacher_load_in_4bit: true\n"
    )
    assert main(["--config", str(recipe)]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus_flag", "1"], "--bogus_flag"),
        (["--model_name_or_path", "./no/such/dir", "--teacher_model_name_or_path", "./t"], "no such directory"),
        (["--config", "no-such-recipe.yaml"], "no such file"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    status = main([*argv, "--output_dir", str(tmp_path)] if argv[0] != "--config" else argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("speckd-trl: error:") and message in err[0]


def test_cli_bad_choice_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--gate", "bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--gate" in err and "bogus" in err and "usage:" in err


def test_cli_help_lists_the_speckd_fields(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--gate ", "--gate_top_k", "--gate_on", "--gate_proposal", "--reject_weight", "--gate_normalize"):
        assert flag in text
    assert "--teacher_load_in_4bit" in text and "--lmbda" in text and "--use_peft" in text


def test_cli_trains_with_the_distillation_trainer(workspace, tmp_path):
    out = tmp_path / "out"
    status = main(
        [
            "--trainer", "distillation",
            "--model_name_or_path", str(workspace / "student"),
            "--teacher_model_name_or_path", str(workspace / "teacher"),
            "--dataset_name", str(workspace / "train.jsonl"),
            "--output_dir", str(out),
            "--use_cpu", "--report_to", "none", "--save_strategy", "no",
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "4",
            "--gate", "spec", "--gate_top_k", "3", "--reject_weight", "0.2",
            "--use_peft", "--lora_r", "4", "--lora_target_modules", "all-linear",
        ]
    )  # fmt: skip
    assert status == 0
    assert (out / "adapter_config.json").is_file()


def test_cli_picks_the_trainer_from_the_flag_or_the_recipe(tmp_path):
    from speckd_trl import SpecKDConfig, SpecKDDistillationConfig
    from speckd_trl.cli import make_parser, trainer_choice

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trainer: distillation\ngate: spec\n")
    assert trainer_choice([]) == "gkd"
    assert trainer_choice(["--gate", "spec", "--trainer", "distillation"]) == "distillation"
    assert trainer_choice(["--trainer=distillation"]) == "distillation"
    assert trainer_choice(["--config", str(recipe)]) == "distillation"
    assert trainer_choice(["--config", str(recipe), "--trainer", "gkd"]) == "gkd"  # the command line wins
    assert SpecKDConfig in make_parser("gkd").dataclass_types
    assert SpecKDDistillationConfig in make_parser("distillation").dataclass_types


def test_cli_distillation_flags_are_distillation_configs(capsys):
    """`--trainer distillation --help` lists the gate's flags and DistillationConfig's, not GKD's."""
    with pytest.raises(SystemExit):
        main(["--trainer", "distillation", "--help"])
    text = capsys.readouterr().out
    for flag in ("--trainer", "--gate ", "--gate_top_k", "--reject_weight", "--max_completion_length", "--use_vllm"):
        assert flag in text
    assert "--lmbda" not in text and "--gate_on" not in text
    with pytest.raises(SystemExit) as exit_info:
        main(["--trainer", "bogus"])
    assert exit_info.value.code == 2


def test_cli_unknown_recipe_keys_say_what_to_change(tmp_path, capsys):
    """TRL's own message asked the user to set a parser option (`fail_with_unknown_args=False`)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("gate: topk\ngate_topk: 5\n")
    assert main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown keys: gate_topk" in err[0] and "speckd-trl --trainer gkd --help" in err[0]
    assert "fail_with_unknown_args" not in err[0]


def test_cli_empty_dataset_file(workspace, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    status = main(
        [
            "--model_name_or_path", str(workspace / "student"),
            "--teacher_model_name_or_path", str(workspace / "teacher"),
            "--dataset_name", str(empty), "--output_dir", str(tmp_path / "out"), "--use_cpu",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "the file is empty (no rows)" in err[0]
