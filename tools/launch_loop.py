"""Launch the 2-process CPU job many times and count the exit statuses: does every launch that trained exit 0?

```bash
python tools/launch_loop.py --launches 200                 # the shipped entry point (`-m speckd_trl`)
python tools/launch_loop.py --launches 100 --unguarded     # the same job exiting through the interpreter's teardown
```

Each launch is `accelerate launch --config_file examples/accelerate/multi_cpu.yaml -m speckd_trl --use_cpu ...`, as
docs/multi-gpu.md documents it and `tests/test_accelerate_launch.py` runs it once: tiny models saved to a scratch directory,
8 chat rows, one epoch of 2 optimizer steps on 2 gloo processes, on-policy batches included, a checkpoint and the
student saved. A launch counts as trained when the student was saved; it passes when it also exited 0. With
`--unguarded` the processes run `sys.exit(speckd_trl.cli.main())` instead of the shipped `run()`, which exits a
multi-process job through `cli.exit_distributed_job` (see its docstring): the comparison shows what that exit
prevents. Prints one line per launch that failed, a table, and a final JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from speckd_trl.tools.testing import accelerate_launch, make_dataset, make_model, make_tokenizer  # noqa: E402


CONFIG = REPO / "examples" / "accelerate" / "multi_cpu.yaml"
UNGUARDED = "import sys\nfrom speckd_trl.cli import main\n\nsys.exit(main())\n"


def workspace(root: Path) -> None:
    """Tiny student and teacher (with the tokenizer) and 8 chat rows on disk, as `tests/conftest.py`'s fixture."""
    tokenizer = make_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        make_model(seed, tokenizer).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with open(root / "train.jsonl", "w") as f:
        for row in make_dataset(8):
            f.write(json.dumps(row) + "\n")


def launch(root: Path, out: Path, unguarded: bool):
    entry = [str(root / "unguarded.py")] if unguarded else ["-m", "speckd_trl"]
    command = [
        *entry,
        "--model_name_or_path", str(root / "student"),
        "--teacher_model_name_or_path", str(root / "teacher"),
        "--dataset_name", str(root / "train.jsonl"),
        "--output_dir", str(out), "--use_cpu", "--report_to", "none", "--seed", "0",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--save_strategy", "epoch", "--save_only_model",
        "--max_new_tokens", "4", "--lmbda", "0.5", "--gate", "topk", "--gate_top_k", "10",
    ]  # fmt: skip
    return accelerate_launch(CONFIG, command, timeout=300, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=200)
    parser.add_argument("--unguarded", action="store_true", help="exit through the interpreter's teardown")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="speckd-launch-loop-"))
    workspace(root)
    (root / "unguarded.py").write_text(UNGUARDED)
    statuses: collections.Counter[int] = collections.Counter()
    trained_not_zero = 0
    start = time.time()
    for i in range(args.launches):
        out = root / f"out{i}"
        result = launch(root, out, args.unguarded)
        trained = (out / "model.safetensors").is_file()
        statuses[result.returncode] += 1
        if result.returncode != 0:
            trained_not_zero += trained
            tail = (result.stderr.strip().splitlines() or [""])[-1][:200]
            print(f"launch {i}: exit {result.returncode}, student saved: {trained}; last line: {tail}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        if (i + 1) % 20 == 0:
            print(f"{i + 1} launches, exit statuses so far {dict(statuses)}", flush=True)
    minutes = (time.time() - start) / 60
    entry = "sys.exit(main()) (unguarded)" if args.unguarded else "-m speckd_trl (run, shipped)"
    print(f"\n{'entry point':<32} {'launches':>8} {'exit 0':>7} {'other':>6} {'trained, not 0':>15} {'minutes':>8}")
    other = args.launches - statuses[0]
    print(f"{entry:<32} {args.launches:>8} {statuses[0]:>7} {other:>6} {trained_not_zero:>15} {minutes:>8.1f}")
    print(
        json.dumps(
            {
                "entry": "unguarded" if args.unguarded else "run",
                "launches": args.launches,
                "exit_statuses": {str(k): v for k, v in sorted(statuses.items())},
                "trained_but_nonzero": trained_not_zero,
                "minutes": round(minutes, 1),
            }
        )
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
