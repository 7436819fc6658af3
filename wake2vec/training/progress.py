"""The training loop's progress report: the log window, each kind of time kept apart, the ETA."""

from __future__ import annotations

import logging

import numpy as np

from wake2vec.config import RunConfig


class Progress:
    """Tracks the log window and prints step, losses, the step's own throughput and the ETA.

    Every duration is measured around a call that blocks on its result, and each kind is
    kept apart: the step time covers building the batch through the step's outputs being
    ready, so compilation (timed once, ahead of time), evaluation and checkpoint saves never
    leak into tokens/s, as they did when the rate was the log window's wall time.
    """

    def __init__(self, cfg: RunConfig, tokens_per_step: int, compile_s: float):
        self.cfg, self.tokens_per_step = cfg, tokens_per_step
        self.window_losses: list[float] = []
        self.window_terms: list[dict[str, float]] = []  # a regularised phase's terms, each alone
        self.window_step_s: list[float] = []
        self.run_step_s: list[float] = []
        self.compile_s: float | None = compile_s  # reported once, with this run's first log event
        self.eval_s = self.save_s = 0.0  # the latest of each, for the ETA
        self.last_train: float | None = None
        self.prev_eval: tuple[float, float | None] | None = None

    def note_step(self, loss: float, seconds: float, terms: dict[str, float] | None = None) -> None:
        self.window_losses.append(loss)
        self.window_terms.append(terms or {})
        self.window_step_s.append(seconds)
        self.run_step_s.append(seconds)

    def flush(self, step: int, lr: float) -> dict:
        mean = float(np.mean(self.window_losses))
        step_s = float(np.mean(self.window_step_s))
        tokens_per_s = self.tokens_per_step / max(step_s, 1e-9)
        logging.info("step %d/%d  train_loss %.4f  lr %.3g  %.2f s/step  %.0f tokens/s  ETA %s",
                     step, self.cfg.max_steps, mean, lr, step_s, tokens_per_s, duration(self.eta(step)))
        event = {"step": step, "train_loss": mean, "lr": lr, "tokens_per_s": tokens_per_s, "step_s": step_s}
        for name in self.window_terms[-1] if self.window_terms else ():
            event[f"train_{name}"] = float(np.mean([terms[name] for terms in self.window_terms]))
        if self.compile_s is not None:
            event["compile_s"], self.compile_s = self.compile_s, None
        self.window_losses, self.window_step_s, self.window_terms, self.last_train = [], [], [], mean
        return event

    def eta(self, step: int) -> float:
        """Remaining steps at this run's median step time, plus the evals and saves still due
        at their latest measured cost (the median: a step slowed by a busy host is not the rate)."""
        remaining = range(step + 1, self.cfg.max_steps + 1)
        evals = sum(1 for s in remaining if s % self.cfg.eval_every == 0 or s == self.cfg.max_steps)
        saves = sum(1 for s in remaining if s % self.cfg.save_every == 0 or s == self.cfg.max_steps)
        return len(remaining) * float(np.median(self.run_step_s)) + evals * self.eval_s + saves * self.save_s

    def note_eval(self, step: int, val_loss: float, seconds: float) -> dict:
        self.eval_s = seconds
        logging.info("step %d  val_loss %.4f  (eval %.2f s)", step, val_loss, seconds)
        if self.prev_eval is not None:
            prev_val, prev_train = self.prev_eval
            if val_loss > prev_val and self.last_train is not None and prev_train is not None and self.last_train < prev_train:
                logging.warning(
                    "step %d: validation loss rose (%.4f -> %.4f) while training loss fell (%.4f -> %.4f): "
                    "the memorisation gap Phase 1 produces by design; training continues",
                    step, prev_val, val_loss, prev_train, self.last_train)
        self.prev_eval = (val_loss, self.last_train)
        return {"step": step, "val_loss": val_loss, "eval_s": seconds}

    def note_save(self, step: int, seconds: float) -> dict:
        self.save_s = seconds
        logging.info("step %d  checkpoint save started (%.2f s blocking; it commits in the background)", step, seconds)
        return {"step": step, "save_s": seconds}


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
