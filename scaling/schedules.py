"""Batch-size schedules and how the learning rate follows the batch size (modular phases).

A :class:`scaling.config.BatchSchedule` gives the batch size at every step of a run; a configuration's
``batch_size`` is its *reference*: the batch at which its ``lr`` holds. The LR rule scales the LR in force
with the batch in force B: ``none`` leaves it, ``sqrt`` multiplies it by √(B / batch_size) (the rule for
Adam-type optimizers when the gradient noise dominates, Malladi et al. 2022), ``linear`` by B / batch_size
(Goyal et al. 2017's rule for SGD).
"""

from __future__ import annotations

import math

import numpy as np

from scaling.config import BatchSchedule


def batch_size_at(schedule: BatchSchedule, step: int, steps: int, base: int) -> int:
    """The batch size at ``step`` (0-based) of a ``steps``-step run whose reference batch is ``base``.

    Ramps reach ``end`` at the last step: B = start + (end − start)·t (linear) or start·(end/start)^t
    (exponential), t = step / (steps − 1), rounded to the nearest integer."""
    if schedule.kind == "constant":
        return schedule.batch or base
    if schedule.kind == "step":
        return [b for s, b in schedule.steps if s <= step][-1]
    t = 1.0 if steps <= 1 else min(1.0, step / (steps - 1))
    a, b = schedule.start, schedule.end
    value = a + (b - a) * t if schedule.kind == "linear" else a * (b / a) ** t
    return int(round(value))


def batch_sizes(schedule: BatchSchedule, steps: int, base: int) -> np.ndarray:
    """The batch size of every step of the run, as int64."""
    return np.array([batch_size_at(schedule, s, steps, base) for s in range(steps)], dtype=np.int64)


def lr_factor(rule: str, batch: int, base: int) -> float:
    """How much the LR is scaled at batch ``batch`` when it holds at ``base``."""
    if rule == "sqrt":
        return math.sqrt(batch / base)
    if rule == "linear":
        return batch / base
    return 1.0
