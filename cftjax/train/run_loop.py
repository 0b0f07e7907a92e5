"""The step loop shared by the CFT and GRPO trainers: logging, periodic eval, checkpoints, SIGTERM,
and the run summary written to RUN_DIR/summary.json."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax

from cftjax.train import checkpoint as checkpoint_lib

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


class RunLoop:
  """Base of a trainer's run. A subclass's __init__ sets config, run_dir, step, total_steps, state, data,
  writer, checkpoints, evaluator (or None) and config_record, and implements `train_step`."""

  config: Any
  run_dir: str
  step: int
  total_steps: int

  def train_step(self, log_now: bool) -> dict[str, float]:
    """Advances one optimizer step (raises StopIteration when the data ends); returns the metrics to log
    when `log_now` (the subclass may skip gathering them otherwise)."""
    raise NotImplementedError

  def on_start(self) -> None:
    """Called once before the first step, after the initial evaluation."""

  def evaluate(self) -> dict[str, float]:
    metrics = self.evaluator.evaluate(self.state.params)
    self.writer.write(self.step, metrics, split="eval")
    self.checkpoints.maybe_save_best(self.step, self.state.params, metrics)
    return metrics

  def save(self) -> None:
    self.checkpoints.save(self.step, self.state, self.data.get_state(), self.config_record)

  def loop(self) -> dict[str, Any]:
    config = self.config
    start_step, started = self.step, time.perf_counter()
    summary: dict[str, Any] = {"run_dir": self.run_dir, "start_step": start_step,
                               "total_steps": self.total_steps, "preempted": False}
    if self.evaluator is not None and config.eval.at_start and self.step == 0:
      summary["initial_eval"] = self.evaluate()
    last_metrics: dict[str, float] = {}
    self.on_start()
    with checkpoint_lib.PreemptionFlag(self.checkpoints) as preemption:
      while self.step < self.total_steps:
        final = self.step + 1 == self.total_steps
        log_now = _due(self.step + 1, config.logging.every_steps) or final
        try:
          metrics = self.train_step(log_now)
        except StopIteration:
          log.warning("training data ended at step %d of %d", self.step, self.total_steps)
          break
        self.step += 1
        self.writer.advance(self.step)
        if log_now:
          last_metrics = metrics
          self.writer.write(self.step, metrics)
        if self.evaluator is not None and _due(self.step, config.eval.every_steps) and not final:
          self.evaluate()
        summary["preempted"] = preemption.should_stop(self.step)
        if _due(self.step, config.checkpoint.every_steps) or summary["preempted"]:
          self.save()
        if summary["preempted"]:
          break
    if not summary["preempted"]:
      self.save()  # the final state (a no-op when this step was just saved)
      if self.evaluator is not None and self.step > start_step:
        summary["final_eval"] = self.evaluate()
    self.checkpoints.wait()
    summary.update(steps=self.step, final_train_metrics=last_metrics,
                   wall_time_s=time.perf_counter() - started, data_counts=self.data.length_counts,
                   best_value=self.checkpoints.best_value())
    return summary

  def close(self) -> None:
    self.writer.close()
    self.checkpoints.close()
    self.data.close()


def run_and_summarize(run: RunLoop) -> dict[str, Any]:
  """Runs `run.loop()`, closes the run, and writes the summary (process 0); returns it."""
  try:
    summary = run.loop()
  finally:
    run.close()
  if jax.process_index() == 0:
    with open(os.path.join(run.run_dir, SUMMARY_FILE), "w") as f:
      json.dump(summary, f, indent=2, default=float)
  return summary
