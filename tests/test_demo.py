"""The demo's pipeline on a tiny Llama saved to disk (the real SmolLM2 run is too long for the suite)."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from speckd_trl.cli import main
from speckd_trl.demo import DemoConfig, layer_subset, run_demo
from speckd_trl.tools.testing import make_model, make_tokenizer


@pytest.fixture
def tiny_llama(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(0, tokenizer, vocab_size=len(tokenizer), layers=6, config_class=LlamaConfig,
                       tie_word_embeddings=True)  # fmt: skip
    path = tmp_path / "base"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_layer_subset_keeps_the_chosen_layers(tiny_llama, tmp_path):
    student_dir = layer_subset(tiny_llama, [0, 5], tmp_path / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2
    for mine, theirs in zip(student.model.layers, [teacher.model.layers[0], teacher.model.layers[5]]):
        assert torch.equal(mine.mlp.up_proj.weight, theirs.mlp.up_proj.weight)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    # the renumbered layers index the KV cache correctly: cached decoding gives the uncached tokens
    prompt, kwargs = (
        torch.tensor([[2, 10, 11]]),
        dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=1),
    )
    cached = student.generate(prompt, use_cache=True, **kwargs)
    assert cached.shape[1] == 7
    assert torch.equal(cached, student.generate(prompt, use_cache=False, **kwargs))


def test_layer_subset_rejects_bad_layers(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="more than 50% of the teacher"):
        layer_subset(tiny_llama, [0, 1, 2, 3, 4], tmp_path / "s1")
    with pytest.raises(ValueError, match="distinct indices"):
        layer_subset(tiny_llama, [0, 9], tmp_path / "s2")


@pytest.mark.parametrize("student_init", ["base", "layers"])
def test_demo_pipeline_end_to_end_on_a_tiny_model(tiny_llama, tmp_path, monkeypatch, student_init):
    monkeypatch.chdir(tmp_path)  # the shipped CLI recipe reads the demo's outputs from ./speckd-demo
    config = DemoConfig(
        student_init=student_init,
        output_dir="speckd-demo",
        cache_dir=str(tmp_path / "cache"),
        base_model=str(tiny_llama),
        num_train=32,
        num_eval=8,
        teacher_steps=2,
        student_layers="0,5",
        distill_steps=4,
        batch_size=4,
        lora_r=4,
        max_new_tokens=3,
        teacher_quantization="int8" if student_init == "base" else "none",  # the default; full precision
        drafter_prompts=4,
        drafter_assistant_tokens=2,
    )
    summary = run_demo(config)
    if student_init == "base":  # the teacher the student learned from, beside the full-precision one
        teachers = {"teacher (full precision)", "teacher as distilled from (int8)"}
        assert summary["teacher_loaded_as"] == "int8"
    else:
        teachers = {"teacher"}
        assert summary["teacher_loaded_as"] == "full precision"
    assert set(summary["accuracy"]) == teachers | {"student before", "student after"}
    accuracy = summary["accuracy"]
    assert summary["student_gain_points"] == round(100 * (accuracy["student after"] - accuracy["student before"]), 1)
    out = tmp_path / "speckd-demo"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["accuracy"] == summary["accuracy"] and saved["acceptance_rate_curve"]
    assert set(saved["drafter"]) == {"before", "after"}
    for result in saved["drafter"].values():
        assert result["prompts"] == 4 and result["identical_fraction"] == 1.0  # greedy assisted == teacher greedy
        assert 1.0 <= result["mean_accepted_length"] <= 3 and result["speedup"] > 0
    for name in ("demo.png", "student-adapter/adapter_config.json", "student-merged/model.safetensors", "train.jsonl"):
        assert (out / name).is_file(), name
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(n.startswith("teacher-") for n in cached)
    # 'base' starts the student from the untuned base model itself; 'layers' caches a cut of the tuned teacher
    assert any(n.startswith("student-") for n in cached) == (student_init == "layers")
    student_init_dir = (out / "student-init").resolve()
    assert (student_init_dir == tiny_llama.resolve()) == (student_init == "base")

    # the plain CLI re-runs the distillation from the shipped recipe on what the demo left behind
    recipe = Path(__file__).resolve().parents[1] / "examples" / "distill_smollm2.yaml"
    assert main(["--config", str(recipe), "--max_steps", "2", "--per_device_train_batch_size", "2"]) == 0
    assert (out / "cli-run" / "adapter_config.json").is_file()


def test_demo_rejects_an_unknown_student_init(tmp_path):
    with pytest.raises(ValueError, match="student_init='cut'"):
        run_demo(DemoConfig(student_init="cut", cache_dir=str(tmp_path), output_dir=str(tmp_path / "out")))


def test_demo_help_lists_its_fields(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "--distill_steps" in text and "--student_layers" in text and "--student_init" in text and "--gate" in text


def test_healed_student_is_a_cut_of_the_base_healed_by_distillation(tiny_llama, tmp_path, monkeypatch):
    """`benchmarks/heal.py` on the tiny model: the base's sampled answers as heal data, the chosen layers, a few
    distillation steps that change the weights, its record, and the cache hit on a second call."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    heal = importlib.import_module("heal")
    monkeypatch.setattr(heal, "HEAL_PROMPTS", heal.HEAL_PROMPTS[:2])
    kwargs = dict(layers=(0, 5), steps=2, samples_per_prompt=2, max_new_tokens=4, max_fraction=0.9)
    healed = heal.healed_student(tiny_llama, tmp_path / "cache", **kwargs)
    record = json.loads((healed / "heal.json").read_text())
    assert record["layers"] == [0, 5] and record["rows"] == 4 and record["steps"] == 2
    student, base = AutoModelForCausalLM.from_pretrained(healed), AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert student.config.num_hidden_layers == 2
    cut = base.model.layers[5].mlp.down_proj.weight
    assert cut.shape == student.model.layers[1].mlp.down_proj.weight.shape
    assert not torch.equal(cut, student.model.layers[1].mlp.down_proj.weight)  # healed: trained
    assert heal.healed_student(tiny_llama, tmp_path / "cache", **kwargs) == healed  # cached
    sys.modules.pop("heal", None)
