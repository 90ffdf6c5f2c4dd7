"""`speckd_trl.compat` repeats private TRL code: these tests fail when the TRL source it copies changes, so that the
copy is re-read against the new code (then update `compat.UPSTREAM`), and check the copy against TRL's own loss."""

import hashlib
import importlib
import inspect

import pytest

from speckd_trl.compat import UPSTREAM


def _resolve(qualified_name: str):
    parts = qualified_name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(qualified_name)


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_the_trl_code_we_repeat_has_not_changed(name):
    source = inspect.getsource(_resolve(name))
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert digest == UPSTREAM[name], (
        f"TRL's {name} changed (sha256 {digest}). speckd_trl/compat.py repeats part of it: read the new source, bring "
        "the copy in line (tests/test_distillation_trainer.py compares the losses), then set UPSTREAM[name] to the new "
        "digest."
    )
