"""Per-step wall time and loss from inside an HF `Trainer` (HF Trainer and ms-swift, which builds on it)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Wall time between consecutive optimizer-step ends: the whole step, data loading and the
    Trainer's own bookkeeping included (the first interval starts at on_train_begin)."""

    def __init__(self):
        self.step_s, self.losses, self._last = [], [], None

    def on_train_begin(self, args, state, control, **kw):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self.step_s.append(now - self._last)
        self._last = now

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
