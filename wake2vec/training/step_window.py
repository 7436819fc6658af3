"""The steps since the last boundary, kept on the device until the loop needs their figures.

The loop dispatches step k+1 without waiting for step k (JAX dispatch is asynchronous),
so the device never idles while the host reads a loss. The per-step metrics stay device
arrays in a `StepWindow` until a log, eval, save or snapshot boundary (and the last step),
where `resolve` reads them all at once, in step order: it raises on the FIRST non-finite
step of the window before the loop can save anything, logs the fp16 skips, and feeds the
losses to the progress log.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import jax


class StepWindow:
    def __init__(self):
        self.pending: list[tuple[int, dict]] = []
        self.started = time.perf_counter()

    def add(self, done: int, metrics: dict) -> None:
        self.pending.append((done, metrics))

    def resolve(self, progress, log_event: Callable[[dict], None], non_finite: Callable[[int, dict], BaseException]) -> dict:
        """Reads the window's steps on the host; returns the last step's metrics (host values).

        `non_finite(done, metrics)` builds the error raised for the first non-finite step."""
        if not self.pending:
            return {}
        host = jax.device_get([m for _, m in self.pending])  # one transfer; blocks until the last step is done
        seconds = (time.perf_counter() - self.started) / len(self.pending)  # the window's mean step time
        for (done, _), metrics in zip(self.pending, host):
            if not bool(metrics["finite"]):
                raise non_finite(done, metrics)
            if bool(metrics.get("skipped", False)):
                # An fp16 overflow of the loss scale: the optimiser skipped the update and halved the scale.
                logging.warning("step %d: the gradient overflowed float16 at loss scale %g; update skipped, scale halved",
                                done, float(metrics["loss_scale"]))
                log_event({"step": done, "skipped": True, "loss_scale": float(metrics["loss_scale"])})
            progress.note_step(float(metrics["loss"]), seconds, {k: float(v) for k, v in metrics.get("terms", {}).items()})
        self.pending, self.started = [], time.perf_counter()
        return host[-1]
