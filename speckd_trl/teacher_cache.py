"""A teacher computed once: its top-K log-probabilities at every completion position of a dataset, on disk.

```bash
speckd-trl cache-teacher --config recipe.yaml --teacher_cache teacher-cache --teacher_cache_top_k 32
speckd-trl --config recipe.yaml --teacher_cache teacher-cache --lmbda 0        # train from it: no teacher in memory
```

A cache is a directory: `speckd_teacher_cache.json` (what it is valid for, and its shards) and one `datasets` Arrow
dataset per shard of rows, `shard-00000/`, ... Each row holds, for every completion position of one dataset row
(collated exactly as training collates it), the teacher's top-K token ids (the smallest unsigned integer type that
holds the vocabulary), their log-probabilities and the log of the mass outside them (float16 by default), and the row's
*key*: a hash of its token ids, by which training finds it (so the trainer's sampler may shuffle, and batching and
padding do not matter; a row tokenized differently is a clear miss, never a wrong row). The dataset's rows and their
order as given must be the cache's (`dataset_fingerprint`): a dataset reordered before training is another dataset.

Building it (`write_teacher_cache`; from a `SpecKDTrainer`, `cache_teacher`) runs the teacher shard by shard,
holding a lock on the directory (a second writer is refused at once); an interrupted build resumes where it stopped,
keeping the finished shards, each of which records the teacher that wrote it. Training opens it with `TeacherCache.open`, which checks it against what the
training run uses (tokenizer, chat template, dataset, K, temperature, vocabulary; the teacher's config and a
fingerprint of its weights when a teacher is loaded, its name or path when none is: `check_teacher`) and that every
shard is there, whole and of the same teacher.

The teacher's identity: its name or path (a local directory as an absolute path), the precision it ran in, and
`weights_fingerprint`, samples of the weights a quantized load leaves in full precision (embeddings, norms, output
layer), so that the float32 teacher and its NF4 copy are the same teacher.

The loss on a cached teacher is the divergence over the top-K support plus a tail bucket (TRL's server teacher's
approximation: `sparse_teacher.tail_bucket_target`), a lower bound of the full divergence; the top-K is the `topk`
rule's (ties toward the lower id, `sparse_teacher.teacher_top_k`), so the `topk` gate is exact for
``gate_top_k <= K``, ties included. A run that reads a cache cuts its live teacher the same way on the other batches
(`TeacherCache.live`, `cached_top_k`): one loss scale.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .divergence import jsd_log_probs
from .models import output_vocab_size
from .sparse_teacher import SparseTeacher, teacher_top_k


META_FILE = "speckd_teacher_cache.json"
LOCK_FILE = "speckd_teacher_cache.lock"  # held by the one process that writes the cache
CACHE_FORMAT = 2  # 2: the teacher's weights fingerprint, per-shard teachers, the rule's top-K order
READABLE_FORMATS = (1, 2)  # a format-1 cache has no fingerprint: `check_teacher` refuses it against a loaded teacher
VALUE_DTYPES = ("float16", "float32")
LOG_FLOOR = -1e4  # stored log-probabilities are clamped here (float16 holds it; its -65504 limit is far below)

logger = logging.get_logger(__name__)


def row_key(token_ids: Iterable[int]) -> str:
    """The key of a dataset row in a cache: a hash of its token ids (without padding)."""
    return hashlib.sha1(np.asarray(list(token_ids), dtype=np.int64).tobytes()).hexdigest()


def ids_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer type that holds every token id of a `vocab_size` vocabulary."""
    for name, bits in (("uint8", 8), ("uint16", 16), ("uint32", 32)):
        if vocab_size <= 2**bits:
            return name
    return "int64"


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer: Any) -> str:
    """A hash of what the tokenizer maps text to: its vocabulary, merges, normalizer and special tokens (not its
    transient truncation and padding settings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = sorted(tokenizer.get_vocab().items())
    return _sha([state, tokenizer.special_tokens_map, tokenizer.pad_token_id])


def config_hash(config: Any) -> str:
    """A hash of a model config's architecture (not its name, path, dtype, quantization or transformers version)."""
    values = config.to_dict()
    for key in (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "quantization_config",
        "_commit_hash",
    ):
        values.pop(key, None)
    return _sha(values)


def teacher_name(name_or_path: str) -> str:
    """A teacher's name as a cache records it: a local directory as its absolute path, a hub id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if name_or_path and path.is_dir() else name_or_path


def model_name(model: Any) -> str:
    """The name or path a loaded model came from (`teacher_name`), or its class name when it was built in memory."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return teacher_name(name) if name else type(model).__name__


def teacher_precision(model: Any) -> str:
    """The precision a loaded model runs in: its quantization (``"nf4"``, ``"fp4"``, ``"int8"``, or another method's
    name), else the dtype of its weights (``"float32"``, ``"bfloat16"``, ...)."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization is not None:
        q = quantization if isinstance(quantization, dict) else quantization.to_dict()
        if q.get("load_in_4bit"):
            return str(q.get("bnb_4bit_quant_type", "nf4"))
        if q.get("load_in_8bit"):
            return "int8"
        return str(q.get("quant_method", "quantized"))
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return str(getattr(first, "dtype", "none")).replace("torch.", "")


FINGERPRINT_SAMPLES = {"embedding": 1024, "norm": 32}  # values sampled per tensor (at fixed random places)
FINGERPRINT_RTOL = 2.0**-6  # across dtypes: two bfloat16 steps (a float32 value against its float16/bfloat16 copy)
FINGERPRINT_ATOL = 1e-6  # float16's smallest normal is 6e-5: below it a copy keeps only absolute precision


def _fingerprint_tensors(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The weights a quantized load keeps in full precision, by role: the input and (untied) output embeddings, then
    every norm's weight in module order. bitsandbytes (and GPTQ, AWQ, ...) quantize the decoder's linear layers
    only; a tensor that is not floating point here (a quantized output layer) is left out."""
    tensors = []
    embed_in = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for role, module in (("input_embeddings", embed_in), ("output_embeddings", embed_out)):
        weight = getattr(module, "weight", None)
        if weight is None or not weight.is_floating_point():
            continue
        if tensors and weight is tensors[0][1]:  # tied to the input embedding
            continue
        tensors.append((role, weight))
    norms = [m for m in model.modules() if type(m).__name__.lower().endswith("norm")]
    for index, module in enumerate(norms):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            tensors.append((f"norm.{index}", weight))
    return tensors


@torch.no_grad()
def weights_fingerprint(model: Any) -> dict[str, dict[str, Any]] | None:
    """A fingerprint of a teacher's weights that does not depend on the precision it was loaded in.

    For each tensor of `_fingerprint_tensors` (embeddings, norms, output layer: what bitsandbytes leaves unquantized),
    its shape, dtype and values at fixed random places (`FINGERPRINT_SAMPLES`, drawn from a fixed seed, so the same
    places for the same shape), as float32. Cheap for an 8B NF4 model (a few thousand values read); compared by
    `fingerprint_mismatch`.

    Returns:
        role -> ``{"shape", "dtype", "values"}`` (values: base64 of float32 bytes), or None when a tensor is not in
        this process whole (sharded under FSDP or ZeRO-3, or on the meta device): the caller then compares names.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        DTensor = ()  # noqa: N806
    out = {}
    for role, weight in _fingerprint_tensors(model):
        if isinstance(weight, DTensor) or weight.is_meta or weight.numel() == 0 or hasattr(weight, "ds_shape"):
            return None
        flat = weight.detach().reshape(-1)
        count = FINGERPRINT_SAMPLES["embedding" if role.endswith("embeddings") else "norm"]
        generator = torch.Generator().manual_seed(0)
        places = torch.randint(flat.numel(), (min(count, flat.numel()),), generator=generator)
        values = flat[places.to(flat.device)].float().cpu().numpy()
        out[role] = {
            "shape": list(weight.shape),
            "dtype": str(weight.dtype).replace("torch.", ""),
            "values": base64.b64encode(values.astype("<f4").tobytes()).decode(),
        }
    return out


def fingerprint_mismatch(cached: dict[str, Any], run: dict[str, Any]) -> str | None:
    """None when two `weights_fingerprint`s name the same checkpoint; else what differs.

    Tensors of the same dtype must match exactly; of different dtypes (the float32 teacher against its copy in
    bfloat16 or float16, as a 4-bit load may keep them), within two bfloat16 steps (`FINGERPRINT_RTOL`). An output
    layer that one of the two quantized is left out."""
    roles = set(cached) | set(run)
    if "input_embeddings" not in set(cached) & set(run):
        return "no input embedding to compare"
    for role in sorted(roles):
        if role not in cached or role not in run:
            if role == "output_embeddings":
                continue
            return f"{role} is in only one of them"
        a, b = cached[role], run[role]
        if a["shape"] != b["shape"]:
            return f"{role} has shape {a['shape']} in the cache, {b['shape']} here"
        x = np.frombuffer(base64.b64decode(a["values"]), dtype="<f4")
        y = np.frombuffer(base64.b64decode(b["values"]), dtype="<f4")
        if a["dtype"] == b["dtype"]:
            same = np.array_equal(x, y)
        else:
            same = bool(
                np.all(np.abs(x - y) <= FINGERPRINT_ATOL + FINGERPRINT_RTOL * np.maximum(np.abs(x), np.abs(y)))
            )
        if not same:
            return f"{role} ({a['dtype']} in the cache, {b['dtype']} here) holds other values"
    return None


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of a dataset's rows, in order (content, not the `datasets` cache fingerprint, which is random for a
    dataset built in memory)."""
    digest = hashlib.sha256()
    for batch in dataset.iter(batch_size=1000):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


@dataclass
class CacheSpec:
    """What a teacher cache is valid for (its metadata file, with the shards' row counts)."""

    teacher: str  # name or path of the teacher that made it (`teacher_name`: a local directory's absolute path)
    teacher_config_hash: str
    teacher_dtype: str  # the precision it was written at (`teacher_precision`: "nf4", "float32", ...)
    tokenizer_hash: str
    chat_template_hash: str
    dataset_fingerprint: str
    num_rows: int
    max_length: int | None
    top_k: int
    temperature: float
    vocab_size: int
    ids_dtype: str
    values_dtype: str
    shard_rows: int
    teacher_fingerprint: dict[str, Any] | None = None  # `weights_fingerprint` (None: format 1, or a sharded teacher)
    format: int = CACHE_FORMAT

    # the fields a training run must match, and how to name each in an error
    CHECKED = {
        "tokenizer_hash": "tokenizer",
        "chat_template_hash": "chat template",
        "dataset_fingerprint": "dataset",
        "num_rows": "dataset rows",
        "max_length": "max_length",
        "temperature": "temperature",
        "vocab_size": "vocabulary size",
    }

    @property
    def num_shards(self) -> int:
        return (self.num_rows + self.shard_rows - 1) // self.shard_rows


def run_fields(*, tokenizer: Any, dataset: Any, max_length: int | None, teacher: Any = None) -> dict[str, Any]:
    """The `CacheSpec` fields a training run determines (tokenizer, chat template, dataset, max_length, and the
    teacher's config when there is a teacher): what a cache must match to serve the run."""
    if not hasattr(dataset, "__len__"):
        raise ValueError(
            f"A teacher cache needs a dataset with a length and row indices (a `datasets.Dataset`), got "
            f"{type(dataset).__name__}; load the dataset without streaming."
        )
    fields_ = {
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "chat_template_hash": _sha(getattr(tokenizer, "chat_template", None)),
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "num_rows": len(dataset),
        "max_length": max_length,
    }
    if teacher is not None:
        fields_["teacher_config_hash"] = config_hash(teacher.config)
    return fields_


def cache_spec(
    *,
    teacher: Any,
    tokenizer: Any,
    dataset: Any,
    top_k: int,
    vocab_size: int,
    max_length: int | None,
    temperature: float = 1.0,
    values_dtype: str = "float16",
    shard_rows: int = 1024,
) -> CacheSpec:
    """The `CacheSpec` of a cache of `teacher` on `dataset` (rows as training reads them, before collation)."""
    if values_dtype not in VALUE_DTYPES:
        raise ValueError(f"teacher_cache_dtype={values_dtype!r}: choose one of {VALUE_DTYPES}.")
    if top_k < 1:
        raise ValueError(f"teacher_cache_top_k={top_k} must be >= 1.")
    if shard_rows < 1:
        raise ValueError(f"shard_rows={shard_rows} must be >= 1.")
    return CacheSpec(
        teacher=model_name(teacher),
        teacher_dtype=teacher_precision(teacher),
        teacher_fingerprint=weights_fingerprint(teacher),
        **run_fields(tokenizer=tokenizer, dataset=dataset, max_length=max_length, teacher=teacher),
        top_k=min(top_k, vocab_size),
        temperature=float(temperature),
        vocab_size=vocab_size,
        ids_dtype=ids_dtype(vocab_size),
        values_dtype=values_dtype,
        shard_rows=shard_rows,
    )


def _read_spec(path: Path) -> tuple[CacheSpec, dict[str, Any]]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"teacher_cache={str(path)!r}: no {META_FILE} there; it is not a teacher cache (or its build never "
            "started). Build one with `speckd-trl cache-teacher`."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("spec", {}).get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"teacher_cache={str(path)!r}: cache format {meta.get('spec', {}).get('format')!r}, this speckd-trl "
            f"reads format {CACHE_FORMAT}; build it again with `speckd-trl cache-teacher`."
        )
    names = {f.name for f in fields(CacheSpec)}
    return CacheSpec(**{k: v for k, v in meta["spec"].items() if k in names}), meta


def cached_top_k(log_probs: torch.Tensor, spec: CacheSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's log-probabilities as a cache of `spec` holds them: its top K (`teacher_top_k`, the `topk` rule's
    order), their values and the log of the tail mass, clamped at `LOG_FLOOR` and rounded to the storage type
    (`spec.values_dtype`). What `write_teacher_cache` stores, and what a run reading the cache makes of its live
    teacher (`TeacherCache.live`), so that both give the same loss on the same rows.

    Args:
        log_probs (`torch.Tensor` of shape `[..., V]`): the teacher's log-probabilities at the cache's temperature.
        spec (`CacheSpec`): the cache's K and storage type.

    Returns:
        ``ids`` `[..., K]` (long), ``values`` `[..., K]` and ``log_tail`` `[...]` (float32, as read back).
    """
    ids, values, log_tail = teacher_top_k(log_probs, spec.top_k)
    stored = getattr(torch, spec.values_dtype)
    values, log_tail = (t.clamp_min(LOG_FLOOR).to(stored).float() for t in (values, log_tail))
    return ids, values, log_tail


def fingerprint_digest(spec: CacheSpec) -> str:
    """A short hash of the spec's teacher (its weights' fingerprint, or its name when it has none): what each shard
    records as the teacher that wrote it."""
    return _sha(spec.teacher_fingerprint if spec.teacher_fingerprint is not None else spec.teacher)


def _write_meta(
    path: Path,
    spec: CacheSpec,
    shards: dict[str, int],
    positions: dict[str, int],
    complete: bool,
    shard_teachers: dict[str, str] | None = None,
) -> None:
    """Write the metadata file atomically. `shard_teachers`: shard -> `fingerprint_digest` of the teacher that wrote
    it (every shard the spec's teacher when None)."""
    if shard_teachers is None:
        shard_teachers = dict.fromkeys(shards, fingerprint_digest(spec))
    tmp = path / (META_FILE + ".tmp")
    meta = {
        "spec": asdict(spec),
        "shards": shards,
        "positions": positions,
        "shard_teachers": {name: shard_teachers.get(name) for name in shards},
        "complete": complete,
    }
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / META_FILE)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _shard_features(spec: CacheSpec):
    from datasets import Features, Sequence, Value

    return Features(
        {
            "key": Value("string"),
            "ids": Sequence(Sequence(Value(spec.ids_dtype))),
            "values": Sequence(Sequence(Value(spec.values_dtype))),
            "log_tail": Sequence(Value(spec.values_dtype)),
        }
    )


@torch.no_grad()
def write_teacher_cache(
    path: str | os.PathLike,
    *,
    teacher: Any,
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    spec: CacheSpec,
    batch_size: int = 8,
    vocab_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Run `teacher` over `dataset` and write its top-K at every completion position to `path`, shard by shard.

    Resumable: shards already on disk are kept (after checking that the cache there was made with the same `spec`,
    the same teacher's weights included, and that each of them records that teacher), the rest computed; a shard is
    written to a temporary directory and renamed when whole. One writer at a time: the build holds a lock on
    `path` (`LOCK_FILE`), and a second one is refused at once.

    Args:
        path: the cache directory (created).
        teacher: the teacher model (any precision, on any device; run in evaluation mode).
        dataset: the rows as training reads them (`prepare_prompt_completion`'s output), in order.
        collate: training's data collator (`DataCollatorForChatML`): rows -> ``input_ids``, ``attention_mask``,
            ``labels`` (-100 off the completion).
        spec: what the cache is valid for (`cache_spec`).
        batch_size: rows per teacher forward.
        vocab_size: the vocabulary the loss uses (the teacher's logits are cut to it); `spec.vocab_size` by default.
        progress: show a progress bar.

    Returns:
        The cache directory.

    Raises:
        ValueError: another process is writing `path`; `path` holds something else, or a cache of other settings
            or of another teacher.
    """
    path = Path(path)
    if len(dataset) != spec.num_rows:
        raise ValueError(f"write_teacher_cache: the dataset has {len(dataset)} rows, the spec {spec.num_rows}.")
    if path.exists() and not (path / META_FILE).is_file() and any(p.name != LOCK_FILE for p in path.iterdir()):
        raise ValueError(
            f"teacher_cache={str(path)!r} exists and is not a teacher cache; choose an empty or new directory."
        )
    path.mkdir(parents=True, exist_ok=True)
    lock = _writer_lock(path)
    try:
        state = _resume_state(path, spec)
        _write_shards(
            path, teacher, dataset, collate, spec, batch_size, vocab_size or spec.vocab_size, progress, state
        )
    finally:
        lock.release()
    return path


def _try_lock(path: Path) -> Any:
    """The cache directory's lock, acquired at once; None when another process holds it (is writing the cache)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _writer_lock(path: Path) -> Any:
    """The cache directory's lock for a writer, or the error that another process holds it."""
    lock = _try_lock(path)
    if lock is None:
        raise ValueError(
            f"teacher_cache={str(path)!r} is in use by another process (it holds {LOCK_FILE} there): another "
            "`speckd-trl cache-teacher` is writing this cache. Wait for it to finish (a rerun then resumes or finds "
            "the cache done), or write to another directory."
        )
    return lock


def _in_use(path: Path) -> bool:
    """Whether another process holds the cache directory's lock (is writing it now)."""
    try:
        lock = _try_lock(path)
    except OSError:  # a read-only directory: nobody writes there
        return False
    if lock is None:
        return True
    lock.release()
    return False


def _resume_state(path: Path, spec: CacheSpec) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """The finished shards of a build to resume at `path` (rows, positions, teacher per shard; empty for a new one).

    Raises:
        ValueError: the cache there has other settings, another teacher, or shards that another teacher wrote.
    """
    if not (path / META_FILE).is_file():
        return {}, {}, {}
    existing, meta = _read_spec(path)
    if existing != spec:
        differ = [f.name for f in fields(CacheSpec) if getattr(existing, f.name) != getattr(spec, f.name)]
        if "teacher_fingerprint" in differ and existing.teacher_fingerprint is not None:
            raise ValueError(
                f"teacher_cache={str(path)!r} holds shards of another teacher ({existing.teacher!r} at "
                f"{existing.teacher_dtype}; this build's teacher {spec.teacher!r} at {spec.teacher_dtype} has other "
                "weights), so it cannot be resumed: remove the directory or choose another path."
            )
        raise ValueError(
            f"teacher_cache={str(path)!r} holds a cache made with other settings ({', '.join(differ)} differ), "
            "so it cannot be resumed: remove the directory or choose another path."
        )
    shards, positions = dict(meta["shards"]), dict(meta.get("positions", {}))
    teachers = dict(meta.get("shard_teachers", {}))
    digest = fingerprint_digest(spec)
    others = [name for name in sorted(shards) if _shard_ok(path, name, shards) and teachers.get(name) != digest]
    if others:
        raise ValueError(
            f"teacher_cache={str(path)!r}: {len(others)} finished shard(s) ({', '.join(others[:3])}) were written by "
            f"another teacher than this build's ({spec.teacher!r}), so the build cannot resume on them: remove the "
            "directory and build it again."
        )
    return shards, positions, teachers


def _write_shards(
    path: Path,
    teacher: Any,
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    spec: CacheSpec,
    batch_size: int,
    vocab_size: int,
    progress: bool,
    state: tuple[dict[str, int], dict[str, int], dict[str, str]],
) -> None:
    """`write_teacher_cache`'s work, under its lock: the shards not finished yet, then the metadata."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    shards, positions, teachers = state
    digest = fingerprint_digest(spec)
    _write_meta(path, spec, shards, positions, complete=False, shard_teachers=teachers)
    features = _shard_features(spec)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    todo = [i for i in range(spec.num_shards) if not _shard_ok(path, _shard_name(i), shards)]
    bar = tqdm(total=len(todo) * spec.shard_rows, desc="caching the teacher", unit="row", disable=not progress)
    for index in todo:
        start, stop = index * spec.shard_rows, min((index + 1) * spec.shard_rows, spec.num_rows)
        columns = {"key": [], "ids": [], "values": [], "log_tail": []}
        for first in range(start, stop, batch_size):
            rows = [dataset[i] for i in range(first, min(first + batch_size, stop))]
            batch = collate(rows)
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :vocab_size]
            log_probs = jsd_log_probs(logits, spec.temperature)
            completion = batch["labels"][:, 1:].to(device) != -100
            ids, values, log_tail = cached_top_k(log_probs, spec)
            for b in range(input_ids.size(0)):
                at = completion[b]
                columns["key"].append(row_key(input_ids[b][attention_mask[b].bool()].tolist()))
                columns["ids"].append(ids[b][at].cpu().numpy().astype(spec.ids_dtype))
                columns["values"].append(values[b][at].cpu().numpy())
                columns["log_tail"].append(log_tail[b][at].cpu().numpy())
            bar.update(len(rows))
        name = _shard_name(index)
        tmp = path / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        columns = {k: [np.asarray(v).tolist() for v in vals] if k != "key" else vals for k, vals in columns.items()}
        Dataset.from_dict(columns, features=features).save_to_disk(str(tmp))
        shutil.rmtree(path / name, ignore_errors=True)
        os.replace(tmp, path / name)
        shards[name] = stop - start
        positions[name] = sum(len(t) for t in columns["log_tail"])
        teachers[name] = digest
        _write_meta(path, spec, shards, positions, len(shards) == spec.num_shards, shard_teachers=teachers)
    bar.close()
    teacher.train(was_training)
    _write_meta(path, spec, shards, positions, complete=True, shard_teachers=teachers)


def _shard_ok(path: Path, name: str, shards: dict[str, int]) -> bool:
    return name in shards and (path / name / "dataset_info.json").is_file()


def check_teacher(path: Path, spec: CacheSpec, *, teacher: Any = None, name: str | None = None) -> None:
    """Raise unless the cache at `path` (its `spec`) was made by the run's teacher.

    With a loaded `teacher`: its `weights_fingerprint` against the cache's (`fingerprint_mismatch`; the same checkpoint
    in any precision matches). A teacher sharded across processes has none here: its name is compared instead. With
    only a `name` (the run's ``teacher_model_name_or_path``, not loaded): the names (`teacher_name`: a local directory
    as its absolute path). With neither: nothing to compare.

    Raises:
        ValueError: naming both teachers, and the fix or the override (``teacher_cache_check_teacher=False``).
    """
    where = f"teacher_cache={str(path)!r}"
    fix = (
        "Build the cache again with this run's teacher (`speckd-trl cache-teacher` with the training recipe), or set "
        "teacher_cache_check_teacher=False if it is this teacher, moved or renamed on purpose."
    )
    if teacher is not None:
        run = weights_fingerprint(teacher)
        if run is None:  # sharded here: its name stands for it
            name = model_name(teacher)
        elif spec.teacher_fingerprint is None:
            raise ValueError(
                f"{where} records no fingerprint of its teacher's weights (cache format {spec.format}, written by an "
                f"older speckd-trl), so it cannot be checked against this run's teacher {model_name(teacher)!r}. {fix}"
            )
        else:
            differs = fingerprint_mismatch(spec.teacher_fingerprint, run)
            if differs is not None:
                raise ValueError(
                    f"{where} was made by another teacher: the cache's {spec.teacher!r} ({spec.teacher_dtype}), this "
                    f"run's {model_name(teacher)!r} ({teacher_precision(teacher)}); their weights differ ({differs}). "
                    f"{fix}"
                )
            if model_name(teacher) != spec.teacher:
                warnings.warn(
                    f"{where} was made by {spec.teacher!r} and this run's teacher is {model_name(teacher)!r}: their "
                    "embeddings, norms and output layer match (the same checkpoint, moved, or a fine-tune that changed "
                    "only the other weights, e.g. a merged LoRA adapter: then build the cache again).",
                    stacklevel=3,
                )
            return
    if name is not None and teacher_name(name) != spec.teacher:
        raise ValueError(
            f"{where} was made by the teacher {spec.teacher!r}, and this run's teacher is {teacher_name(name)!r} "
            f"(teacher_model_name_or_path, compared by name: it is not loaded). {fix}"
        )


def report_cache_teacher(cache: TeacherCache, teacher: Any = None, *, checked: bool = True) -> None:
    """Log which teacher the cache holds and at what precision, beside the run's live teacher when there is one (a
    float32 cache beside an NF4 live teacher is the same teacher, read at two precisions); warn when the teacher
    check was turned off."""
    spec = cache.spec
    line = f"teacher_cache={str(cache.path)!r}: the teacher {spec.teacher!r} at {spec.teacher_dtype} (K={spec.top_k})"
    if teacher is not None:
        line += f"; the live teacher {model_name(teacher)!r} at {teacher_precision(teacher)}"
    if not checked:
        logger.warning(f"{line}. teacher_cache_check_teacher=False: not checked to be this run's teacher.")
    elif teacher is not None and teacher_precision(teacher) != spec.teacher_dtype:
        logger.warning(f"{line}: dataset batches read the cached precision, the others the live one.")
    else:
        logger.info(line)


def _check_shard_teachers(path: Path, spec: CacheSpec, meta: dict[str, Any]) -> None:
    """Raise when a shard records another teacher than the cache's (format 1 records none: not checked)."""
    teachers = meta.get("shard_teachers")
    if teachers is None:
        return
    digest = fingerprint_digest(spec)
    others = sorted(name for name in meta["shards"] if teachers.get(name) != digest)
    if others:
        raise ValueError(
            f"teacher_cache={str(path)!r}: {len(others)} shard(s) ({', '.join(others[:3])}) were written by another "
            f"teacher than the cache's {spec.teacher!r}. Remove the directory and build the cache again."
        )


class TeacherCache:
    """A teacher cache opened for training: rows found by key, placed at a batch's completion positions.

    Use `TeacherCache.open`, which checks the cache against the training run.
    """

    def __init__(self, path: Path, spec: CacheSpec, shards: list[Any], positions: int = 0):
        self.path, self.spec, self._shards = path, spec, shards
        self.positions = positions  # completion positions cached
        self._where: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(shards):
            for i, key in enumerate(shard["key"]):
                self._where.setdefault(key, (s, i))

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expect: dict[str, Any] | None = None,
        *,
        top_k: int | None = None,
        teacher: Any = None,
        teacher_name: str | None = None,
    ):
        """Open the cache at `path`, checking it is whole and valid for a run with the `expect`ed `CacheSpec` values.

        Args:
            path: the cache directory.
            expect: `CacheSpec` field -> the training run's value (e.g. ``tokenizer_hash``, ``dataset_fingerprint``,
                ``teacher_config_hash`` when a teacher is loaded); a field left out is not checked.
            top_k: the largest k the run's gate or target filtering reads; must be <= the cache's K.
            teacher: the run's loaded teacher, checked against the cache's by its weights (`check_teacher`).
            teacher_name: the run's teacher name or path when none is loaded, checked against the cache's.

        Raises:
            ValueError: naming the mismatch (another teacher: both named), or the missing or damaged shard, and what
                to do.
        """
        from datasets import load_from_disk

        path = Path(path)
        spec, meta = _read_spec(path)
        names = {"teacher_config_hash": "teacher (config)", **CacheSpec.CHECKED}
        for field_name, value in (expect or {}).items():
            cached = getattr(spec, field_name)
            if cached != value:
                raise ValueError(
                    f"teacher_cache={str(path)!r} was made with another {names.get(field_name, field_name)} than this "
                    f"run uses ({field_name}: cache {cached!r}, run {value!r}). Build the cache again for this run "
                    "(`speckd-trl cache-teacher` with the training recipe), or train with the settings it was made for."
                )
        check_teacher(path, spec, teacher=teacher, name=teacher_name)
        if top_k is not None and top_k > spec.top_k:
            raise ValueError(
                f"gate_top_k={top_k} is larger than the teacher cache's K={spec.top_k} ({str(path)!r}): the cache "
                f"knows only the teacher's top {spec.top_k} tokens. Use gate_top_k <= {spec.top_k}, or build the "
                f"cache with --teacher_cache_top_k >= {top_k}."
            )
        if not meta.get("complete"):
            done = len(meta.get("shards", {}))
            if _in_use(path):
                raise ValueError(
                    f"teacher_cache={str(path)!r} is incomplete ({done} of {spec.num_shards} shards) and in use by "
                    "another process, which is writing it now: wait for its `speckd-trl cache-teacher` to finish."
                )
            raise ValueError(
                f"teacher_cache={str(path)!r} is incomplete ({done} of {spec.num_shards} shards): its build was "
                "interrupted. Run the same `speckd-trl cache-teacher` command again; it resumes."
            )
        _check_shard_teachers(path, spec, meta)
        shards = []
        for index in range(spec.num_shards):
            name = _shard_name(index)
            expected = meta["shards"].get(name)
            try:
                shard = load_from_disk(str(path / name))
            except Exception as err:  # noqa: BLE001 - any damage: missing files, truncated Arrow
                raise ValueError(
                    f"teacher_cache={str(path)!r}: shard {name} is missing or damaged ({type(err).__name__}: {err}). "
                    "Remove it and run `speckd-trl cache-teacher` again: it recomputes the missing shards only."
                ) from None
            if expected is None or len(shard) != expected:
                raise ValueError(
                    f"teacher_cache={str(path)!r}: shard {name} has {len(shard)} rows, the metadata says {expected}. "
                    "Remove it and run `speckd-trl cache-teacher` again: it recomputes the missing shards only."
                )
            shards.append(shard.with_format("numpy"))
        return cls(path, spec, shards, sum(meta.get("positions", {}).values()))

    def __len__(self) -> int:
        return self.spec.num_rows

    def live(self, log_probs: torch.Tensor) -> SparseTeacher:
        """A live teacher cut as this cache cuts it (`cached_top_k`: the same K, ties, floor and storage rounding):
        what a run that reads the cache uses on every other batch (on-policy, mixed, evaluation), so that its loss is
        the same top-K + tail divergence whether a row comes from the cache or from the teacher.

        Args:
            log_probs (`torch.Tensor` of shape `[..., V]`): the live teacher's log-probabilities (temperature 1, the
                cache's ``V`` ids).

        Returns:
            A `SparseTeacher` of shape `[..., K]`.
        """
        if log_probs.size(-1) != self.spec.vocab_size:
            raise ValueError(
                f"teacher_cache={str(self.path)!r} holds {self.spec.vocab_size} ids per position, and the live "
                f"teacher's log-probabilities here have {log_probs.size(-1)}: build the cache for this teacher."
            )
        return SparseTeacher(*cached_top_k(log_probs, self.spec), self.spec.vocab_size)

    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion: torch.Tensor) -> SparseTeacher:
        """The cached teacher at a micro-batch's completion positions.

        Args:
            input_ids (`torch.LongTensor` of shape `[B, L]`), attention_mask (`torch.LongTensor` of shape `[B, L]`):
                the collated rows.
            completion (`torch.BoolTensor` of shape `[B, T]`): the completion positions (``labels[:, 1:] != -100``).

        Returns:
            A `SparseTeacher` of shape `[B, T, K]` on `input_ids`' device; positions off the completion hold token 0
            at `LOG_FLOOR` (their weight is 0).

        Raises:
            ValueError: a row that is not in the cache, or whose completion has another length there.
        """
        B, T = completion.shape
        K, device = self.spec.top_k, input_ids.device
        ids = torch.zeros(B, T, K, dtype=torch.long)
        values = torch.full((B, T, K), LOG_FLOOR, dtype=torch.float32)
        log_tail = torch.full((B, T), LOG_FLOOR, dtype=torch.float32)
        for b in range(B):
            key = row_key(input_ids[b][attention_mask[b].bool()].tolist())
            where = self._where.get(key)
            if where is None:
                raise ValueError(
                    f"teacher_cache={str(self.path)!r} has no row for a training row (key {key[:12]}): the cache was "
                    "made from another dataset, tokenizer, chat template or max_length than this run. Build it again "
                    "with `speckd-trl cache-teacher` and the training recipe."
                )
            row = self._shards[where[0]][int(where[1])]
            at = completion[b].nonzero().squeeze(-1).cpu()
            if len(row["log_tail"]) != at.numel():
                raise ValueError(
                    f"teacher_cache={str(self.path)!r}: a training row has {at.numel()} completion tokens, its cached "
                    f"row {len(row['log_tail'])}: the completions are masked differently than when the cache was "
                    "made. Build it again with the training recipe."
                )
            if at.numel():
                ids[b, at] = torch.as_tensor(np.stack(row["ids"]).astype(np.int64))
                values[b, at] = torch.as_tensor(np.stack(row["values"]).astype(np.float32))
                log_tail[b, at] = torch.as_tensor(np.asarray(row["log_tail"], dtype=np.float32))
        return SparseTeacher(ids.to(device), values.to(device), log_tail.to(device), self.spec.vocab_size)


def cache_teacher(
    trainer: Any,
    path: str | os.PathLike,
    *,
    top_k: int | None = None,
    values_dtype: str | None = None,
    shard_rows: int = 1024,
    batch_size: int | None = None,
) -> TeacherCache:
    """Run a `SpecKDTrainer`'s teacher over its training dataset, collated as training collates it, and write its
    top-K log-probabilities at every completion position to `path` (`write_teacher_cache`; resumable). What
    `SpecKDTrainer.cache_teacher` and `speckd-trl cache-teacher` run.

    Args:
        trainer: the `SpecKDTrainer`, built with its teacher, on one process.
        path: the cache directory.
        top_k: K (default `args.teacher_cache_top_k`).
        values_dtype: `"float16"` or `"float32"` (default `args.teacher_cache_dtype`).
        shard_rows: dataset rows per shard (the unit of resuming).
        batch_size: rows per teacher forward (default `args.per_device_eval_batch_size`).

    Returns:
        The cache, opened and checked for this trainer.
    """
    if trainer.teacher_model is None:
        raise ValueError("cache_teacher needs the teacher: build the trainer with `teacher_model=`.")
    if trainer.accelerator.num_processes > 1:
        raise ValueError(
            f"cache_teacher runs on one process ({trainer.accelerator.num_processes} here would write the same "
            "shards): run `speckd-trl cache-teacher` without `accelerate launch`; training from the cache may then "
            "use every process."
        )
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    vocab_size = trainer._shared_vocab or output_vocab_size(trainer.accelerator.unwrap_model(trainer.model))
    spec = cache_spec(
        teacher=teacher,
        tokenizer=tokenizer,
        dataset=trainer.train_dataset,
        top_k=top_k or trainer.args.teacher_cache_top_k,
        vocab_size=vocab_size,
        max_length=trainer.args.max_length,
        values_dtype=values_dtype or trainer.args.teacher_cache_dtype,
        shard_rows=shard_rows,
    )
    write_teacher_cache(
        path,
        teacher=teacher,
        dataset=trainer.train_dataset,
        collate=trainer.data_collator,
        spec=spec,
        batch_size=batch_size or trainer.args.per_device_eval_batch_size,
        progress=not trainer.args.disable_tqdm,
    )
    expect = run_fields(tokenizer=tokenizer, dataset=trainer.train_dataset, max_length=trainer.args.max_length,
                        teacher=teacher)  # fmt: skip
    return TeacherCache.open(path, expect, teacher=teacher)
