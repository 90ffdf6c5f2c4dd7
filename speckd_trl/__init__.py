"""speckd-trl: Speculative Knowledge Distillation for Hugging Face TRL.

Swap `GKDConfig` / `GKDTrainer` for `SpecKDConfig` / `SpecKDTrainer` (or TRL's `DistillationConfig` /
`DistillationTrainer` for `SpecKDDistillationConfig` / `SpecKDDistillationTrainer`): the student proposes a token at
every completion position, the teacher verifies it, and the generalized JSD is kept only where the teacher accepts.
"""

import logging
import os


# GKD lives in trl.experimental, which warns on import; SpecKD is the public API here.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _drop_missing_kernels_package(record: logging.LogRecord) -> bool:
    """bitsandbytes' CPU backend logs, when it is imported, that the optional `kernels` package (which fetches a
    faster CPU 4-bit kernel from the Hugging Face Hub) is missing; it then runs its own CPU kernels, as expected
    offline. PEFT imports bitsandbytes at its own import, so that line would be the first of every run: drop it.
    Any other failure to load those kernels is still reported."""
    return "No module named 'kernels'" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_missing_kernels_package)

from .config import (  # noqa: E402
    GateConfigMixin,
    SpecKDConfig,
    SpecKDDistillationConfig,
    SpecKDGOLDConfig,
    SpecKDServerDistillationConfig,
)
from .distillation_trainer import SpecKDDistillationTrainer  # noqa: E402
from .drafter import evaluate_drafter  # noqa: E402
from .generation import GenerationStats, speculative_generate, student_generate  # noqa: E402
from .gold_trainer import SpecKDGOLDTrainer  # noqa: E402
from .losses import SparseTeacher, normalize_loss, tail_bucket_target, weighted_generalized_jsd  # noqa: E402
from .metrics import sequence_rewards  # noqa: E402
from .plan import MemoryPlan, PlanConfig, estimate_memory, format_plan  # noqa: E402
from .reward import TeacherAcceptanceReward  # noqa: E402
from .rules import (  # noqa: E402
    GATE_RULES,
    GateRule,
    NoGate,
    SpecGate,
    TopKGate,
    accept_mask,
    propose,
    register_rule,
    teacher_rank,
)
from .server_trainer import SpecKDServerDistillationTrainer  # noqa: E402
from .teacher_cache import TeacherCache, write_teacher_cache  # noqa: E402
from .trainer import SpecKDTrainer  # noqa: E402
from .weighting import GatedBatch, TokenGate  # noqa: E402


__version__ = "0.1.0"

__all__ = [
    "SpecKDConfig",
    "SpecKDTrainer",
    "SpecKDDistillationConfig",
    "SpecKDDistillationTrainer",
    "SpecKDServerDistillationConfig",
    "SpecKDServerDistillationTrainer",
    "SpecKDGOLDConfig",
    "SpecKDGOLDTrainer",
    "GateConfigMixin",
    "GATE_RULES",
    "GateRule",
    "NoGate",
    "SpecGate",
    "TopKGate",
    "TeacherAcceptanceReward",
    "TeacherCache",
    "SparseTeacher",
    "tail_bucket_target",
    "write_teacher_cache",
    "register_rule",
    "GatedBatch",
    "TokenGate",
    "GenerationStats",
    "MemoryPlan",
    "PlanConfig",
    "accept_mask",
    "estimate_memory",
    "evaluate_drafter",
    "format_plan",
    "normalize_loss",
    "propose",
    "sequence_rewards",
    "speculative_generate",
    "student_generate",
    "teacher_rank",
    "weighted_generalized_jsd",
]
