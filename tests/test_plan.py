"""The memory planner: exact parameter counts, the arithmetic's direction, suggestions, the CLI, and the estimate
against measured peak memory of small models on a CPU (each measured in a fresh subprocess)."""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from speckd_trl.cli import main
from speckd_trl.plan import (
    GIB,
    M_CHUNK,
    PlanConfig,
    estimate_memory,
    format_plan,
    load_model_config,
    model_shape,
)


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
LLAMA_8B, LLAMA_1B, SMOLLM2 = (str(CONFIGS / f) for f in ("llama3-8b.json", "llama3.2-1b.json", "smollm2-135m.json"))


def _plan_check():
    spec = importlib.util.spec_from_file_location("plan_check", ROOT / "benchmarks" / "plan_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(model_type="qwen2", vocab=500, tied=False, **overrides):
    config = dict(model_type=model_type, vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    return {**config, **overrides}


@pytest.fixture(scope="module")
def shapes():
    return {name: model_shape(path) for name, path in (("8b", LLAMA_8B), ("1b", LLAMA_1B), ("smol", SMOLLM2))}


def test_parameter_counts_are_the_published_ones(shapes):
    assert shapes["8b"].num_parameters == 8_030_261_248  # Llama-3.1-8B
    assert shapes["1b"].num_parameters == 1_235_814_400  # Llama-3.2-1B (tied)
    assert shapes["smol"].num_parameters == 134_515_008  # SmolLM2-135M (tied)
    assert shapes["1b"].tie_word_embeddings and not shapes["8b"].tie_word_embeddings
    assert shapes["8b"].output_parameters == 128256 * 4096 and shapes["1b"].output_parameters == 0


@pytest.mark.parametrize(
    "config",
    [tiny(), tiny(tied=True), tiny("llama", head_dim=32), tiny("llama", vocab=300, num_key_value_heads=4)],
)
def test_counts_match_a_real_model_and_peft(config):
    shape = model_shape(config)
    model = AutoModelForCausalLM.from_config(load_model_config(config))
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())
    assert shape.embedding_parameters == model.get_input_embeddings().weight.numel()
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert 8 * shape.lora_parameters_per_rank == trainable


def test_config_sources_agree(tmp_path):
    config = tiny()
    (tmp_path / "config.json").write_text(json.dumps(config))
    AutoModelForCausalLM.from_config(load_model_config(config)).save_pretrained(tmp_path / "model")
    from_dict, from_file, from_dir = (
        model_shape(source) for source in (config, tmp_path / "config.json", tmp_path / "model")
    )
    assert from_dict.num_parameters == from_file.num_parameters == from_dir.num_parameters
    with pytest.raises(FileNotFoundError):
        model_shape(tmp_path / "missing.json")


def test_nf4_teacher_matches_the_h100_measurement(shapes):
    plan = estimate_memory(PlanConfig(teacher=shapes["8b"], student=shapes["1b"], teacher_quant="nf4"))
    assert plan.terms["teacher weights"] / GIB == pytest.approx(5.32, rel=0.02)  # benchmarks/README.md
    bf16 = estimate_memory(PlanConfig(teacher=shapes["8b"], student=shapes["1b"]))
    assert bf16.terms["teacher weights"] == 2 * 8_030_261_248


def test_monotone_in_every_size(shapes):
    base = PlanConfig(teacher=shapes["8b"], student=shapes["1b"], teacher_quant="nf4", lmbda=0.5, loss_path="eager")
    total = estimate_memory(base).total
    for change in (dict(batch_size=4), dict(seq_len=1024), dict(max_new_tokens=512), dict(lora_r=64),
                   dict(student_mode="full"), dict(teacher_quant="none"), dict(dtype="float32")):  # fmt: skip
        assert estimate_memory(replace(base, **change)).total > total, change
    for change in (dict(gradient_checkpointing=True), dict(loss_path="chunked"), dict(student_mode="qlora")):
        assert estimate_memory(replace(base, **change)).total < total, change
    full = replace(base, student_mode="full")
    assert estimate_memory(replace(full, optimizer="adamw_8bit")).total < estimate_memory(full).total
    assert estimate_memory(replace(full, optimizer="sgd")).total < estimate_memory(full).total


def test_chunked_is_far_smaller_at_a_large_vocabulary(shapes):
    eager = estimate_memory(
        PlanConfig(teacher=shapes["8b"], student=shapes["1b"], teacher_quant="nf4", seq_len=1024, loss_path="eager")
    )
    chunked = estimate_memory(replace(eager.config, loss_path="chunked"))
    assert chunked.terms["logits (both models)"] < eager.terms["logits (both models)"] / 5
    assert chunked.total < eager.total


def test_suggestions_fit_when_re_estimated(shapes):
    plan = estimate_memory(
        PlanConfig(teacher=shapes["8b"], student=shapes["1b"], teacher_quant="none", batch_size=4, seq_len=1024)
    )
    assert not plan.fits(24)
    suggestions = plan.suggestions(24)
    assert suggestions
    for suggestion in suggestions:
        assert suggestion.plan.fits(24)
        assert estimate_memory(suggestion.config).total == pytest.approx(suggestion.plan.total)
    assert estimate_memory(replace(plan.config, batch_size=1, loss_path="chunked")).suggestions(24) == []
    small = estimate_memory(PlanConfig(teacher=shapes["smol"], student=shapes["smol"], student_mode="full"))
    assert small.fits(24) and small.suggestions(24) == []
    text = format_plan(plan, 24)
    assert "DOES NOT FIT" in text and "--" in text.split("Changes that make it fit")[1]


def test_combined_suggestion_when_no_single_change_fits(shapes):
    plan = estimate_memory(
        PlanConfig(teacher=shapes["8b"], student=shapes["8b"], student_mode="full", batch_size=8, seq_len=2048)
    )
    (suggestion,) = plan.suggestions(24)
    assert suggestion.plan.fits(24) and " + " in suggestion.text
    flags = [part.split()[0] for part in suggestion.text.split(" + ")]
    assert len(flags) == len(set(flags))  # a flag appears once, with its final value


def test_generation_cache_is_counted_for_on_policy(shapes):
    on = estimate_memory(PlanConfig(teacher=shapes["8b"], student=shapes["1b"], lmbda=1.0, max_new_tokens=256))
    off = estimate_memory(replace(on.config, lmbda=0.0))
    assert on.kv_cache == 2 * 16 * 8 * 64 * (128 + 256) * 2 * 2 and off.kv_cache == 0
    assert set(on.phases) == {"on-policy step", "generation"} and set(off.phases) == {"off-policy step"}


# ----------------------------------------------------------------------------- the CLI


def test_plan_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--teacher", "--student", "--teacher-quant", "--student-mode", "--lora-r", "--batch-size",
                 "--seq-len", "--max-new-tokens", "--gradient-checkpointing", "--optimizer", "--loss-path",
                 "--dtype", "--budget-gib"):  # fmt: skip
        assert flag in text


def test_plan_prints_a_table_and_a_verdict(capsys):
    argv = ["plan", "--teacher", LLAMA_8B, "--student", LLAMA_1B, "--teacher-quant", "nf4", "--seq-len", "1024"]
    argv += ["--loss-path", "eager"]  # the default, chunked, fits: the eager loss shows the suggestions
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "teacher weights" in out and "logits (both models)" in out and "DOES NOT FIT a 24 GiB GPU" in out
    assert "--loss-path chunked" in out
    assert main([*argv, "--loss-path", "chunked", "--gradient-checkpointing"]) == 0
    assert "FITS a 24 GiB GPU" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--teacher", "no/such/config.json", "--student", LLAMA_1B], "no such file or directory"),
        (["--teacher", LLAMA_8B, "--student", SMOLLM2], "vocabulary"),
    ],
)
def test_plan_errors_are_one_line(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("speckd-trl: error:") and message in err[0]


# ----------------------------------------------------------------------------- estimate vs measured (CPU)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
@pytest.mark.parametrize(
    "name",
    [
        "test-full-eager-off",
        "test-lora-chunked-off",
        "test-lora-eager-on",
        "test-full-chunked-on",
        "test-lora-chunked-off-cache",
    ],
)
def test_estimate_is_within_25_percent_of_the_measured_peak(name):
    row = _plan_check().run_child(name, steps=2)
    assert row["measured_mib"] > 100  # something real was measured
    assert 0.75 <= row["ratio"] <= 1.25, row


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_m_chunk_is_the_measured_growth_per_chunk_row():
    """The chunked loss's tile constant against what it models: the peak's growth with `loss_chunk_size` (2 x 256
    tokens, 384 completion tokens, so every size is a full chunk). A loss change that keeps more `[chunk, V]` tiles
    alive, or fewer, fails here before the planner's figures drift."""
    plan_check = _plan_check()
    sizes = [64, 256]
    rows = [plan_check.run_child("test-lora-chunked-off", 2, {"loss_chunk_size": size}) for size in sizes]
    _, m_chunk = plan_check.fit_m_chunk(sizes, [row["measured_mib"] for row in rows], plan_check.VOCAB)
    assert 0.75 * M_CHUNK <= m_chunk <= 1.25 * M_CHUNK, (m_chunk, rows)


# ----------------------------------------------------------------------------- several processes (per-process plans)

SHARDED_TERMS = ("teacher weights", "student weights", "LoRA weights", "optimizer states", "gradients")
PER_PROCESS_TERMS = ("activations", "logits (both models)", "generation KV cache")


@pytest.mark.parametrize("student_mode", ["full", "lora"])
def test_fsdp2_splits_the_sharded_terms_and_ddp_does_not(shapes, student_mode):
    single = estimate_memory(PlanConfig(teacher=shapes["8b"], student=shapes["1b"], student_mode=student_mode))
    ddp = estimate_memory(replace(single.config, num_processes=4, engine="ddp"))
    fsdp = estimate_memory(replace(single.config, num_processes=4, engine="fsdp2"))
    for name in SHARDED_TERMS:
        assert ddp.terms[name] == single.terms[name], name  # DDP: every process holds everything
        assert fsdp.terms[name] == pytest.approx(single.terms[name] / 4), name  # the frozen LoRA base too
    for name in PER_PROCESS_TERMS:
        assert fsdp.terms[name] == ddp.terms[name] == single.terms[name], name
    assert "all-gathered units" not in single.terms and "all-gathered units" not in ddp.terms
    layer_t = shapes["8b"].linear_parameters / shapes["8b"].num_layers * 2 * 3 / 4  # bf16, 3/4 of a layer gathered
    assert fsdp.terms["all-gathered units"] > 2 * layer_t
    assert fsdp.total < single.total
    two = estimate_memory(replace(fsdp.config, num_processes=2))
    assert two.terms["optimizer states"] == pytest.approx(2 * fsdp.terms["optimizer states"])
    one = estimate_memory(replace(fsdp.config, num_processes=1))  # FSDP2 on one process shards nothing
    assert one.total == pytest.approx(single.total)


def test_quantized_teacher_is_not_sharded(shapes):
    base = PlanConfig(teacher=shapes["8b"], student=shapes["1b"], teacher_quant="nf4")
    single, fsdp = estimate_memory(base), estimate_memory(replace(base, num_processes=2, engine="fsdp2"))
    assert fsdp.terms["teacher weights"] == single.terms["teacher weights"]
    assert fsdp.terms["student weights"] == pytest.approx(single.terms["student weights"] / 2)
    assert any("not sharded" in note for note in fsdp.notes)


def test_teacher_offload_removes_the_teacher_and_says_what_it_costs(shapes):
    base = PlanConfig(teacher=shapes["8b"], student=shapes["1b"])
    plan, offloaded = estimate_memory(base), estimate_memory(replace(base, teacher_offload=True))
    assert offloaded.terms["teacher weights"] == 0
    t = shapes["8b"]
    root, layer = (t.num_parameters - t.linear_parameters) * 2, t.linear_parameters * 2 / t.num_layers
    assert offloaded.terms["teacher streamed from host"] == pytest.approx(root + 2 * layer)
    assert plan.total - offloaded.total == pytest.approx(2 * 8_030_261_248 - root - 2 * layer)
    (note,) = offloaded.notes
    assert "14.96 GiB of its weights per process in host memory" in note and "s at 25 GB/s" in note
    sharded = estimate_memory(replace(base, teacher_offload=True, num_processes=2, engine="fsdp2"))
    assert sharded.terms["teacher weights"] == 0 and "7.48 GiB" in sharded.notes[0]
    assert "teacher streamed from host" not in plan.terms


def test_zero3_is_marked_as_an_untested_estimate(shapes):
    base = PlanConfig(teacher=shapes["8b"], student=shapes["1b"], num_processes=2)
    zero3, fsdp = estimate_memory(replace(base, engine="zero3")), estimate_memory(replace(base, engine="fsdp2"))
    assert zero3.total == pytest.approx(fsdp.total)
    assert any("ZeRO-3" in note and "not measured" in note for note in zero3.notes)
    assert not fsdp.notes


@pytest.mark.parametrize(
    "change",
    [
        dict(engine="fsdp"),
        dict(num_processes=0),
        dict(num_processes=1.5),
        dict(engine="zero3", teacher_quant="nf4"),  # the trainers refuse a quantized teacher under ZeRO-3
    ],
)
def test_bad_layout_values_are_refused(shapes, change):
    with pytest.raises(ValueError, match="engine|num_processes"):
        PlanConfig(teacher=shapes["8b"], student=shapes["1b"], **change)


def test_plan_cli_per_process(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--num-processes", "--engine", "--teacher-offload"))
    argv = ["plan", "--teacher", LLAMA_8B, "--student", LLAMA_1B, "--seq-len", "1024"]
    assert main(argv) == 0
    single = capsys.readouterr().out
    assert "PER PROCESS" not in single and "all-gathered" not in single
    assert main([*argv, "--num-processes", "4", "--engine", "fsdp2", "--teacher-offload"]) == 0
    out = capsys.readouterr().out
    assert "4 process(es), fsdp2, weights / gradients / optimizer states split 4 ways, teacher offload on" in out
    assert "all-gathered units" in out and "note: Teacher offloaded" in out
    assert main([*argv, "--num_processes", "2", "--loss-path", "chunked", "--budget-gib", "20"]) == 0
    assert "--engine fsdp2" in capsys.readouterr().out  # DDP: sharding is one of the changes that fit
    assert main([*argv, "--num-processes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_processes" in err[0]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--engine", "fsdp"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "quant, double, skip",
    [("nf4", True, 0), ("nf4", False, 0), ("fp4", True, 0), ("int8", True, 0), ("nf4", False, 1), ("int8", True, 2)],
)
def test_teacher_weights_match_what_bitsandbytes_holds(tmp_path, quant, double, skip):
    """Every `teacher_quantization` setting (`teacher_quant`, double quantization, layers kept in full precision): the
    planner's teacher weights against the footprint of the same model loaded that way (bitsandbytes' CPU backend)."""
    pytest.importorskip("bitsandbytes")
    from speckd_trl import SpecKDConfig
    from speckd_trl.models import load_teacher
    from speckd_trl.teacher_check import weights_bytes
    from speckd_trl.tools.testing import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    make_model(1, tokenizer, layers=3).save_pretrained(tmp_path / "teacher")
    args = SpecKDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", teacher_quantization=quant,
                        teacher_bnb_4bit_use_double_quant=double, teacher_bnb_4bit_compute_dtype="float32",
                        teacher_quantization_skip_modules=[f"model.layers.{i}" for i in range(skip)] or None)  # fmt: skip
    loaded = load_teacher(str(tmp_path / "teacher"), args)
    plan = estimate_memory(PlanConfig(teacher=str(tmp_path / "teacher"), student=str(tmp_path / "teacher"),
                                      teacher_quant=quant, teacher_double_quant=double, teacher_full_layers=skip,
                                      dtype="float32"))  # fmt: skip
    assert plan.terms["teacher weights"] == pytest.approx(weights_bytes(loaded), rel=0.01)


def test_gptq_teacher_weights_match_the_measured_ones(shapes):
    """GPTQ 4-bit, groups of 64 (`GPTQConfig(bits=4, group_size=64)` through gptqmodel, which the suite does not
    install): the SmolLM2-135M teacher held 163.30 MiB of stored tensors on CPU
    (benchmarks/results/teacher_quant-calibrated.log, `gptq4`); its codes, scales, zeros and group indices by hand."""
    plan = estimate_memory(PlanConfig(teacher=shapes["smol"], student=shapes["smol"], teacher_quant="gptq",
                                      dtype="float32"))  # fmt: skip
    assert plan.terms["teacher weights"] == pytest.approx(163.2985 * 2**20, rel=1e-3)
    smol = shapes["smol"]
    columns = smol.lora_parameters_per_rank - smol.linear_rows  # sum of in_features
    by_hand = (
        smol.linear_parameters * (0.5 + 2.5 / 64) + columns * 4 + (smol.num_parameters - smol.linear_parameters) * 4
    )
    assert plan.terms["teacher weights"] == pytest.approx(by_hand)


def test_teacher_full_layers_needs_a_quantized_teacher(shapes):
    with pytest.raises(ValueError, match="teacher_full_layers=2 keeps layers of a quantized teacher"):
        PlanConfig(teacher=shapes["8b"], student=shapes["1b"], teacher_full_layers=2)
    nf4 = estimate_memory(PlanConfig(teacher=shapes["8b"], student=shapes["1b"], teacher_quant="nf4"))
    kept = estimate_memory(PlanConfig(teacher=shapes["8b"], student=shapes["1b"], teacher_quant="nf4",
                                      teacher_full_layers=4))  # fmt: skip
    per_layer = shapes["8b"].linear_parameters / shapes["8b"].num_layers
    extra = kept.terms["teacher weights"] - nf4.terms["teacher weights"]
    assert extra == pytest.approx(4 * per_layer * (2 - (0.5 + 1 / 64 + 4 / (64 * 256))))
