"""A setting's value over training: `Schedule`, constant or linear, read with `at(step, max_steps)` and `max`.

The configs hold each schedule as the strings and numbers a user writes (`gate_top_k_schedule="linear"`,
`gate_top_k_start`, `gate_top_k_end`) and resolve them into one of these (`GateConfigMixin.modes`); the trainers read the resolved
object, never the schedule's name. A new schedule is one class, added to `SCHEDULES`. It imports nothing from
the package.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar


def _linear(start: float, end: float, step: int, max_steps: int) -> float:
    """``start`` at step 0, ``end`` at step ``max_steps - 1`` (the last one), linear in between."""
    if max_steps <= 1:
        return float(start)
    return start + (end - start) * min(max(step, 0), max_steps - 1) / (max_steps - 1)


class Schedule(ABC):
    """A setting's value at each optimizer step.

    Attributes:
        name (`str`): the value of the config's `*_schedule` field that selects it.
        reads_ends (`bool`): whether it reads the `*_start` and `*_end` fields (else the setting's own field).
    """

    name: ClassVar[str]
    reads_ends: ClassVar[bool]

    @classmethod
    @abstractmethod
    def from_fields(cls, value: float, start: float | None, end: float | None, *, rounded: bool) -> Schedule:
        """The schedule from a config's fields: the setting's own `value` and its `start` and `end`; `rounded` for a
        count."""

    @abstractmethod
    def at(self, step: int, max_steps: int) -> float:
        """The value at optimizer step `step` of `max_steps`."""

    @property
    @abstractmethod
    def max(self) -> float:
        """The largest value over the run."""

    @property
    @abstractmethod
    def min(self) -> float:
        """The smallest value over the run."""

    @abstractmethod
    def fields(self, setting: str) -> dict[str, float]:
        """The config fields the schedule reads for `setting` (e.g. ``"gate_top_k"``), by name, with their values."""


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """``"constant"``: `value` throughout."""

    name: ClassVar[str] = "constant"
    reads_ends: ClassVar[bool] = False
    value: float

    @classmethod
    def from_fields(cls, value, start, end, *, rounded):
        return cls(value)

    def at(self, step: int, max_steps: int) -> float:
        return self.value

    @property
    def max(self) -> float:
        return self.value

    @property
    def min(self) -> float:
        return self.value

    def fields(self, setting: str) -> dict[str, float]:
        return {setting: self.value}


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """``"linear"``: `start` at step 0, `end` at the last step, linear in between; with `rounded`, rounded half up
    and at least 1 (a count, e.g. the gate's k)."""

    name: ClassVar[str] = "linear"
    reads_ends: ClassVar[bool] = True
    start: float
    end: float
    rounded: bool = False

    @classmethod
    def from_fields(cls, value, start, end, *, rounded):
        return cls(start, end, rounded=rounded)

    def at(self, step: int, max_steps: int) -> float:
        value = _linear(self.start, self.end, step, max_steps)
        return max(1, math.floor(value + 0.5)) if self.rounded else value

    # (an end left unset is skipped: a config reads `max` before it checks that both are set)
    @property
    def max(self) -> float:
        return max(v for v in (self.start, self.end) if v is not None)

    @property
    def min(self) -> float:
        return min(v for v in (self.start, self.end) if v is not None)

    def fields(self, setting: str) -> dict[str, float]:
        return {f"{setting}_start": self.start, f"{setting}_end": self.end}


SCHEDULES: dict[str, type[Schedule]] = {cls.name: cls for cls in (ConstantSchedule, LinearSchedule)}
