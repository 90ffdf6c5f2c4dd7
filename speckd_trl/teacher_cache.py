"""A teacher computed once: its top-K log-probabilities at every completion position of a dataset, on disk.

```bash
speckd-trl cache-teacher --config recipe.yaml --teacher_cache teacher-cache --teacher_cache_top_k 32
speckd-trl --config recipe.yaml --teacher_cache teacher-cache --lmbda 0        # train from it: no teacher in memory
```

A cache is a directory: `speckd_teacher_cache.json` (what it is valid for, and its shards) and one `datasets` Arrow
dataset per shard of rows, `shard-00000/`, ... Each row holds, for every completion position of one dataset row
(collated exactly as training collates it), the teacher's top-K token ids (the smallest unsigned integer type that
holds the vocabulary), their log-probabilities and the log of the mass outside them (float16 by default), and the row's
*key*: a hash of its token ids, by which training finds it (so shuffling, batching and padding do not matter, and a
row tokenized differently is a clear miss, never a wrong row).

Building it (`write_teacher_cache`) runs the teacher shard by shard; an interrupted build resumes where it stopped,
keeping the finished shards. Training opens it with `TeacherCache.open`, which checks it against what the training
run uses (tokenizer, chat template, dataset, K, temperature, vocabulary; the teacher's config when a teacher is
loaded) and that every shard is there and whole.

The loss on a cached teacher is the divergence over the top-K support plus a tail bucket (TRL's server teacher's
approximation: `losses.tail_bucket_target`); the `topk` gate is exact for ``gate_top_k <= K``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .losses import SparseTeacher, jsd_log_probs, teacher_top_k


META_FILE = "speckd_teacher_cache.json"
CACHE_FORMAT = 1
VALUE_DTYPES = ("float16", "float32")
LOG_FLOOR = -1e4  # stored log-probabilities are clamped here (float16 holds it; its -65504 limit is far below)


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

    teacher: str  # name or path of the teacher that made it
    teacher_config_hash: str
    teacher_dtype: str  # the precision it ran in (informative: "nf4", "float32", ...)
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
    config = teacher.config
    quantization = getattr(config, "quantization_config", None)
    first = next(iter(teacher.parameters()), None)
    precision = "nf4" if quantization is not None else str(getattr(first, "dtype", "none")).replace("torch.", "")
    return CacheSpec(
        teacher=str(getattr(config, "_name_or_path", "") or type(teacher).__name__),
        teacher_dtype=precision,
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
    if meta.get("spec", {}).get("format") != CACHE_FORMAT:
        raise ValueError(
            f"teacher_cache={str(path)!r}: cache format {meta.get('spec', {}).get('format')!r}, this speckd-trl "
            f"reads format {CACHE_FORMAT}; build it again with `speckd-trl cache-teacher`."
        )
    names = {f.name for f in fields(CacheSpec)}
    return CacheSpec(**{k: v for k, v in meta["spec"].items() if k in names}), meta


def _write_meta(
    path: Path, spec: CacheSpec, shards: dict[str, int], positions: dict[str, int], complete: bool
) -> None:
    tmp = path / (META_FILE + ".tmp")
    meta = {"spec": asdict(spec), "shards": shards, "positions": positions, "complete": complete}
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

    Resumable: shards already on disk are kept (after checking that the cache there was made with the same `spec`),
    the rest computed; a shard is written to a temporary directory and renamed when whole.

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
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    path = Path(path)
    if len(dataset) != spec.num_rows:
        raise ValueError(f"write_teacher_cache: the dataset has {len(dataset)} rows, the spec {spec.num_rows}.")
    vocab_size = vocab_size or spec.vocab_size
    if path.exists() and (path / META_FILE).is_file():
        existing, meta = _read_spec(path)
        if existing != spec:
            differ = [f.name for f in fields(CacheSpec) if getattr(existing, f.name) != getattr(spec, f.name)]
            raise ValueError(
                f"teacher_cache={str(path)!r} holds a cache made with other settings ({', '.join(differ)} differ), "
                "so it cannot be resumed: remove the directory or choose another path."
            )
        shards, positions = dict(meta["shards"]), dict(meta.get("positions", {}))
    elif path.exists() and any(path.iterdir()):
        raise ValueError(
            f"teacher_cache={str(path)!r} exists and is not a teacher cache; choose an empty or new directory."
        )
    else:
        path.mkdir(parents=True, exist_ok=True)
        shards, positions = {}, {}
    _write_meta(path, spec, shards, positions, complete=False)
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
            ids, values, log_tail = teacher_top_k(log_probs, spec.top_k)
            for b in range(input_ids.size(0)):
                at = completion[b]
                columns["key"].append(row_key(input_ids[b][attention_mask[b].bool()].tolist()))
                columns["ids"].append(ids[b][at].cpu().numpy().astype(spec.ids_dtype))
                columns["values"].append(values[b][at].clamp_min(LOG_FLOOR).float().cpu().numpy())
                columns["log_tail"].append(log_tail[b][at].clamp_min(LOG_FLOOR).float().cpu().numpy())
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
        _write_meta(path, spec, shards, positions, complete=len(shards) == spec.num_shards)
    bar.close()
    teacher.train(was_training)
    _write_meta(path, spec, shards, positions, complete=True)
    return path


def _shard_ok(path: Path, name: str, shards: dict[str, int]) -> bool:
    return name in shards and (path / name / "dataset_info.json").is_file()


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
    def open(cls, path: str | os.PathLike, expect: dict[str, Any] | None = None, *, top_k: int | None = None):
        """Open the cache at `path`, checking it is whole and valid for a run with the `expect`ed `CacheSpec` values.

        Args:
            path: the cache directory.
            expect: `CacheSpec` field -> the training run's value (e.g. ``tokenizer_hash``, ``dataset_fingerprint``,
                ``teacher_config_hash`` when a teacher is loaded); a field left out is not checked.
            top_k: the largest k the run's gate or target filtering reads; must be <= the cache's K.

        Raises:
            ValueError: naming the mismatch, or the missing or damaged shard, and what to do.
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
        if top_k is not None and top_k > spec.top_k:
            raise ValueError(
                f"gate_top_k={top_k} is larger than the teacher cache's K={spec.top_k} ({str(path)!r}): the cache "
                f"knows only the teacher's top {spec.top_k} tokens. Use gate_top_k <= {spec.top_k}, or build the "
                f"cache with --teacher_cache_top_k >= {top_k}."
            )
        if not meta.get("complete"):
            done = len(meta.get("shards", {}))
            raise ValueError(
                f"teacher_cache={str(path)!r} is incomplete ({done} of {spec.num_shards} shards): its build was "
                "interrupted. Run the same `speckd-trl cache-teacher` command again; it resumes."
            )
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
