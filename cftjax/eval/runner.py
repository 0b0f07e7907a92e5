"""Benchmark runner: batched generation, scoring, resumable per-example JSONL, summary and table for
`cftjax eval`, and the same suites as a periodic in-training hook (`PeriodicEval`)."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import numpy as np
import tqdm

from cftjax import config as config_lib
from cftjax.data import critique
from cftjax.data.critique import CritiqueRecord
from cftjax.eval import critics
from cftjax.eval import metrics as metrics_lib
from cftjax.eval.generation import Completion, Model, generate_completions
from cftjax.eval.metrics import vote_key
from cftjax.rewards.grading import MathGrader, extract_boxed
from cftjax.eval.suites import (CRITIC_KINDS, Benchmark, Example, base_suite_config, critique_example,
                                load_examples)
from cftjax.models import ModelConfig
from cftjax.models import checkpoint_io

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
# The metrics printed in the table, per benchmark kind (pass@k / maj@k are added from `ks`).
TABLE_METRICS = {"critique": ("accuracy", "balanced_accuracy", "f1_right", "f1_wrong", "missing_rate"),
                 "processbench": ("f1", "error_acc", "correct_acc", "missing_rate"),
                 "critic_rerank": ("pass@1", "actor_pass@1", "majority", "gain_over_majority",
                                   "critic_precision", "critic_recall"),
                 "critique_refine": ("gain", "wrong_to_right", "right_to_wrong")}


@dataclasses.dataclass
class PreparedBenchmark:
  """A benchmark with its examples and their prompt ids (rendered once)."""

  bench: Benchmark
  examples: list[Example]
  prompts: list[np.ndarray]  # each [prompt_len] int32 (none for the critic kinds: they render per stage)


# ------------------------------------------------------------------------------------------------
# Suite configs.


def suite_benchmarks(config: Any) -> list[Benchmark]:
  """The benchmarks of an eval suite config (`suites.base_suite_config`), in `config.benchmarks_to_run`
  order, else sorted by name; raises ConfigError naming the key of an unusable entry, an empty
  config.benchmarks or config.batch_size.

  A global `config.limit` > 0 caps every benchmark's limit.
  """
  if config.batch_size < 1:
    raise config_lib.ConfigError(f"config.batch_size={config.batch_size}; it must be >= 1")
  entries = config.benchmarks
  if not entries:
    raise config_lib.ConfigError(
        f"config.benchmarks of eval suite {config.get('name', '')!r} is empty: nothing to evaluate; add "
        "entries (config.benchmarks.NAME = benchmark_entry(path, kind), as in configs/eval_demo.py)")
  names = [n.strip() for n in config.benchmarks_to_run.split(",") if n.strip()]
  names = names or sorted(entries.keys())
  unknown = [n for n in names if n not in entries]
  if unknown:
    raise config_lib.ConfigError(f"config.benchmarks_to_run names {unknown}, which are not in "
                                 f"config.benchmarks ({sorted(entries.keys())})")
  cap = config.limit
  benchmarks = []
  for name in names:
    entry = entries[name]
    entry = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
    bench = Benchmark.from_config(name, entry, f"config.benchmarks.{name}")
    if cap:
      bench = dataclasses.replace(bench, limit=min(bench.limit, cap) if bench.limit else cap)
    benchmarks.append(bench)
  return benchmarks


def prepare(bench: Benchmark, tokenizer: Any, examples: list[Example] | None = None) -> PreparedBenchmark:
  """Loads the examples (unless given) and renders their prompts."""
  examples = load_examples(bench) if examples is None else examples
  if bench.kind in CRITIC_KINDS:
    return PreparedBenchmark(bench, examples, [])
  template = bench.prompt_template()
  prompts = [critique.render_prompt(e.record, template, tokenizer) for e in examples]
  return PreparedBenchmark(bench, examples, prompts)


# ------------------------------------------------------------------------------------------------
# Scoring one example's samples, and summaries over records.


def score_samples(bench: Benchmark, examples: Sequence[Example], completions: Sequence[Sequence[Completion]],
                  grader: MathGrader | None) -> list[list[dict[str, Any]]]:
  """Per example, per sample: {completion, prediction, correct, num_tokens, truncated[, reason]}."""
  flat = [(e, c) for e, samples in zip(examples, completions) for c in samples]
  if bench.kind == "math":
    grades = grader.grade_many([str(e.target) for e, _ in flat], [c.text for _, c in flat])
    scored = [{"prediction": extract_boxed(c.text), "correct": ok, "reason": reason}
              for (_, c), (ok, reason) in zip(flat, grades)]
  elif bench.kind == "critique":
    scored = []
    for e, c in flat:
      verdict = critique.parse_verdict(c.text, bench.verdict_style)
      scored.append({"prediction": verdict, "correct": verdict is not None and verdict == e.target})
  else:
    scored = []
    for e, c in flat:
      step = critique.parse_first_wrong_step(c.text, indexing=bench.step_indexing)
      scored.append({"prediction": step, "correct": step is not None and step == e.target})
  samples = [{"completion": c.text, **s, "num_tokens": c.num_tokens, "truncated": c.truncated}
             for (_, c), s in zip(flat, scored)]
  out, at = [], 0
  for sample_list in completions:
    out.append(samples[at:at + len(sample_list)])
    at += len(sample_list)
  return out


def _math_summary(bench: Benchmark, records: Sequence[dict[str, Any]]) -> dict[str, float]:
  summary = {}
  for k in bench.ks:
    summary[f"pass@{k}"] = float(np.mean([
        metrics_lib.pass_at_k(len(r["samples"]), sum(s["correct"] for s in r["samples"]), k)
        for r in records]))
  for k in bench.ks:
    if k > 1:
      summary[f"maj@{k}"] = float(np.mean([
          metrics_lib.maj_at_k([vote_key(s["prediction"]) for s in r["samples"][:k]],
                               [s["correct"] for s in r["samples"][:k]]) for r in records]))
  samples = [s for r in records for s in r["samples"]]
  summary["no_answer_rate"] = float(np.mean([s["prediction"] is None for s in samples]))
  summary["grader_timeout_rate"] = float(np.mean([s.get("reason") == "timeout" for s in samples]))
  return summary


def _critique_summary(bench: Benchmark, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  pairs = [(s, r["target"]) for r in records for s in r["samples"]]
  summary: dict[str, Any] = metrics_lib.verdict_metrics([s["prediction"] for s, _ in pairs],
                                                        [label for _, label in pairs])
  del summary["num_examples"]
  by_style = {}
  for style in critique.STYLES:
    parsed = [critique.parse_verdict(s["completion"], style) for s, _ in pairs]
    right = [p is not None and p == label for p, (_, label) in zip(parsed, pairs)]
    by_style[style] = {"accuracy": float(np.mean(right)),
                       "missing_rate": float(np.mean([p is None for p in parsed]))}
  summary["by_style"] = by_style
  return summary


def _processbench_summary(bench: Benchmark, records: Sequence[dict[str, Any]]) -> dict[str, float]:
  """F1 / error_acc / correct_acc over every sample; for each k > 1 in `ks`, the same over each
  example's majority vote of its first k parsed indices (ProcessBench's voting: samples without an
  index do not vote, ties go to the index seen first, an example with no index is wrong), as
  maj@k_f1, maj@k_error_acc, maj@k_correct_acc."""
  pairs = [(s["prediction"], r["target"]) for r in records for s in r["samples"]]
  summary = metrics_lib.processbench_f1([p for p, _ in pairs], [label for _, label in pairs])
  summary["missing_rate"] = float(np.mean([p is None for p, _ in pairs]))
  targets = [r["target"] for r in records]
  for k in bench.ks:
    if k > 1:
      voted = [metrics_lib.majority_vote([s["prediction"] for s in r["samples"][:k]]) for r in records]
      voted_metrics = metrics_lib.processbench_f1(voted, targets)
      for name in ("f1", "error_acc", "correct_acc"):
        summary[f"maj@{k}_{name}"] = voted_metrics[name]
  return summary


_SUMMARIES: dict[str, Callable[[Benchmark, Sequence[dict[str, Any]]], dict[str, Any]]] = {
    "math": _math_summary, "critique": _critique_summary, "processbench": _processbench_summary,
    "critic_rerank": critics.rerank_summary, "critique_refine": critics.refine_summary}


def summarize(bench: Benchmark, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The benchmark's metrics over its per-example records (fractions in [0, 1])."""
  if not records:
    raise ValueError(f"benchmark {bench.name!r}: no records to summarise")
  samples = [s for r in records for s in r["samples"]]
  return {"kind": bench.kind, "num_examples": len(records), "num_samples": len(samples),
          **_SUMMARIES[bench.kind](bench, records),
          "mean_tokens": float(np.mean([s["num_tokens"] for s in samples])),
          "truncated_rate": float(np.mean([s["truncated"] for s in samples]))}


# ------------------------------------------------------------------------------------------------
# The per-example JSONL (resume) and one benchmark's run.


class RecordFile:
  """OUT/<name>.jsonl (one record per example) and OUT/<name>.settings.json (what produced it).

  `load` returns the records already written, keyed by example index, after checking that they
  came from the same generation settings and checkpoint; a line cut short by a crash is dropped
  (counted and logged) and the file rewritten without it.
  """

  def __init__(self, out_dir: str, bench: Benchmark, identity: dict[str, Any], write: bool = True):
    self.path = os.path.join(out_dir, f"{bench.name}.jsonl")
    self._settings_path = os.path.join(out_dir, f"{bench.name}.settings.json")
    self._identity = json.loads(json.dumps(identity))  # as it reads back from the file
    self._write = write

  def load(self, examples: Sequence[Example]) -> dict[int, dict[str, Any]]:
    if not os.path.exists(self.path):
      return {}
    self._check_settings()
    done, kept_lines, bad_lines = {}, [], 0
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          bad_lines += 1
          continue
        index = record["index"]
        if index < len(examples) and record["id"] != examples[index].id:
          raise ValueError(f"{self.path}: record {index} has id {record['id']!r} but the benchmark's "
                           f"example {index} is {examples[index].id!r}; the benchmark file changed. "
                           "Delete the JSONL or use another output_dir")
        done[index] = record
        kept_lines.append(line if line.endswith("\n") else line + "\n")
    if bad_lines:
      log.warning("%s: dropped %d unreadable line(s) (an interrupted write); they will be redone",
                  self.path, bad_lines)
      if self._write:
        with open(self.path, "w", encoding="utf-8") as f:
          f.writelines(kept_lines)
    return done

  def _check_settings(self) -> None:
    if not os.path.exists(self._settings_path):
      return
    with open(self._settings_path, encoding="utf-8") as f:
      saved = json.load(f)
    changed = sorted(k for k in set(saved) | set(self._identity) if saved.get(k) != self._identity.get(k))
    if changed:
      differences = ", ".join(f"{k}: {saved.get(k)!r} then, {self._identity.get(k)!r} now" for k in changed)
      raise ValueError(f"{self.path} was written with other settings ({differences}); delete it or set "
                       "another output_dir to start afresh")

  def append(self, records: Sequence[dict[str, Any]]) -> None:
    if not self._write or not records:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    if not os.path.exists(self._settings_path):
      with open(self._settings_path, "w", encoding="utf-8") as f:
        json.dump(self._identity, f, indent=2, sort_keys=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
      f.flush()


def run_benchmark(params: Any, model_cfg: ModelConfig, tokenizer: Any, prepared: PreparedBenchmark,
                  suite: Any, grader: MathGrader | None, record_file: RecordFile | None = None
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Generates and scores the examples not yet in `record_file`; returns (summary, all records).

  suite: the eval suite config (generation settings as in `generate_completions`, progress_bar).

  Each example gets `n_samples` completions (its samples sit in consecutive rows); a record is
  written as soon as all of its samples are scored.
  """
  bench = prepared.bench
  _check_prompt_lengths(prepared, suite.prompt_buckets)
  done = record_file.load(prepared.examples) if record_file else {}
  done = {i: r for i, r in done.items() if i < len(prepared.examples)}
  pending = [i for i in range(len(prepared.examples)) if i not in done]
  if done:
    log.info("%s: %d of %d examples already done; generating %d", bench.name, len(done),
             len(prepared.examples), len(pending))
  units = [(i, s) for i in pending for s in range(bench.n_samples)]  # (example, sample)
  partial: dict[int, list[Completion]] = collections.defaultdict(list)
  generated_tokens, generation_s = 0, 0.0

  def score_and_write(indices: list[int], completions: list[list[Completion]]) -> None:
    new_records = _make_records(prepared, tokenizer, indices, completions, grader)
    done.update(zip(indices, new_records))
    if record_file:
      record_file.append(new_records)

  # Scoring (math-verify in worker processes) runs in one background thread, in order, while the
  # next batch generates; an error there stops the loop at the next batch.
  bar = tqdm.tqdm(total=len(units), desc=bench.name, unit="sample", disable=not suite.progress_bar,
                  dynamic_ncols=True)
  with bar, concurrent.futures.ThreadPoolExecutor(1, "cftjax-eval-score") as scorer:
    scoring: list[concurrent.futures.Future] = []
    batches = generate_completions(params, model_cfg, tokenizer, [prepared.prompts[i] for i, _ in units],
                                   bench, suite)
    for positions, completions, seconds in batches:
      for future in scoring:
        if future.done():
          future.result()
      finished = []
      for position, completion in zip(positions, completions):
        example = units[position][0]
        partial[example].append(completion)
        if len(partial[example]) == bench.n_samples:
          finished.append(example)
      scoring.append(scorer.submit(score_and_write, finished, [partial.pop(i) for i in finished]))
      generated_tokens += sum(c.num_tokens for c in completions)
      generation_s += seconds
      bar.update(len(positions))
      bar.set_postfix(tok_s=f"{generated_tokens / max(generation_s, 1e-9):.0f}")
    for future in scoring:
      future.result()
  records = [done[i] for i in sorted(done)]
  summary = summarize(bench, records)
  summary.update(generated_tokens=generated_tokens, generation_s=generation_s,
                 tokens_per_s=generated_tokens / generation_s if generation_s else 0.0)
  return summary, records


_CRITIC_RECORDS = {"critic_rerank": critics.rerank_records, "critique_refine": critics.refine_records}


def run_critic_benchmark(critic: Model, actor: Model, prepared: PreparedBenchmark, suite: Any,
                         grader: MathGrader, record_file: RecordFile | None = None
                         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """A critic-kind benchmark (`cftjax.eval.critics`): the examples not yet in `record_file`, in groups
  of suite.batch_size, each group through every stage and written when done; (summary, all records)."""
  bench = prepared.bench
  done = record_file.load(prepared.examples) if record_file else {}
  done = {i: r for i, r in done.items() if i < len(prepared.examples)}
  pending = [i for i in range(len(prepared.examples)) if i not in done]
  make_records = _CRITIC_RECORDS[bench.kind]
  began = time.perf_counter()
  with tqdm.tqdm(total=len(pending), desc=bench.name, unit="problem", disable=not suite.progress_bar,
                 dynamic_ncols=True) as bar:
    for start in range(0, len(pending), suite.batch_size):
      indices = pending[start:start + suite.batch_size]
      records = make_records(bench, actor, critic, suite, grader, indices,
                             [prepared.examples[i] for i in indices])
      done.update(zip(indices, records))
      if record_file:
        record_file.append(records)
      bar.update(len(indices))
  records = [done[i] for i in sorted(done)]
  summary = summarize(bench, records)
  seconds = time.perf_counter() - began
  summary.update(generation_s=seconds, problems_per_min=60 * len(pending) / seconds if pending else 0.0)
  return summary, records


def _check_prompt_lengths(prepared: PreparedBenchmark, buckets: Sequence[int] | None) -> None:
  if not buckets:
    return
  too_long = [(e.id, len(p)) for e, p in zip(prepared.examples, prepared.prompts) if len(p) > max(buckets)]
  if too_long:
    raise ValueError(f"benchmark {prepared.bench.name!r}: {len(too_long)} prompt(s) are longer than the "
                     f"largest of config.prompt_buckets={tuple(buckets)} (first: {too_long[0][0]!r}, "
                     f"{too_long[0][1]} tokens); add a larger bucket")


def _make_records(prepared: PreparedBenchmark, tokenizer: Any, indices: Sequence[int],
                  completions: Sequence[list[Completion]], grader: MathGrader | None) -> list[dict[str, Any]]:
  """One record per example: the prompt as the model saw it, the target and the scored samples."""
  examples = [prepared.examples[i] for i in indices]
  scored = score_samples(prepared.bench, examples, completions, grader)
  return [{"index": i, "id": e.id, "prompt": tokenizer.decode(prepared.prompts[i]), "target": e.target,
           "samples": s} for i, e, s in zip(indices, examples, scored)]


# ------------------------------------------------------------------------------------------------
# A whole suite: `cftjax eval` and the in-training hook.


def run_suite(params: Any, model_cfg: ModelConfig, tokenizer: Any, prepared: Sequence[PreparedBenchmark],
              suite: Any, grader: MathGrader | None, out_dir: str | None = None,
              identity: Mapping[str, Any] | None = None, actors: Mapping[str, Model] | None = None
              ) -> dict[str, dict[str, Any]]:
  """{benchmark name: summary} for every prepared benchmark; writes records under out_dir if set.

  actors: {bench.actor: loaded actor} for the critic kinds (`load_actors`); the evaluated model acts
  for a benchmark whose `actor` is "".
  """
  write = jax.process_index() == 0
  summaries = {}
  for p in prepared:
    record_file = None
    if out_dir:
      record_file = RecordFile(out_dir, p.bench, {**(identity or {}), **p.bench.generation_settings()},
                               write=write)
    if p.bench.kind in CRITIC_KINDS:
      evaluated = Model(params, model_cfg, tokenizer)
      actor = (actors or {}).get(p.bench.actor) if p.bench.actor else evaluated
      if actor is None:
        raise ValueError(f"benchmark {p.bench.name!r}: actor {p.bench.actor!r} was not loaded (load_actors)")
      summaries[p.bench.name], _ = run_critic_benchmark(evaluated, actor, p, suite, grader, record_file)
    else:
      summaries[p.bench.name], _ = run_benchmark(params, model_cfg, tokenizer, p, suite, grader, record_file)
  return summaries


def math_average(summaries: Mapping[str, Mapping[str, Any]]) -> float | None:
  """Mean pass@1 over the math benchmarks (the papers' "average"), None without any."""
  scores = [s["pass@1"] for s in summaries.values() if s["kind"] == "math"]
  return float(np.mean(scores)) if scores else None


def _needs_grader(benchmarks: Sequence[Benchmark]) -> bool:
  return any(b.kind == "math" or b.kind in CRITIC_KINDS for b in benchmarks)


def load_actors(benchmarks: Sequence[Benchmark], config: Any) -> dict[str, Model]:
  """{path: loaded model} of every critic-kind benchmark's `actor`: a checkpoint, or a run directory with
  an optional selector (RUN_DIR:best, :latest, :step=N) as for `--ckpt`."""
  paths = sorted({b.actor for b in benchmarks if b.kind in CRITIC_KINDS and b.actor})
  actors = {}
  for path in paths:
    if not os.path.isdir(checkpoint_io.parse_checkpoint_ref(path).path):
      raise FileNotFoundError(f"actor {path!r} (config.benchmarks.*.actor) is not a directory; point it at a "
                              "cftjax model checkpoint or a training run directory")
    cfg, params, tokenizer = load_for_eval(path, config)
    actors[path] = Model(params, cfg, tokenizer)
  return actors


def load_for_eval(ckpt_dir: str, config: Any) -> tuple[ModelConfig, Any, Any]:
  """(model config with config.dtype applied, params, tokenizer) of a model checkpoint or the params a
  checkpoint selector picks in a training run (RUN_DIR, RUN_DIR:best, RUN_DIR:latest,
  RUN_DIR:step=N); see `cftjax.models.checkpoint_io.load_model`."""
  return checkpoint_io.load_model(ckpt_dir, dtype=config.get("dtype") or None,
                                  tokenizer_dir=config.get("tokenizer_dir") or None)


def default_output_dir(ckpt_dir: str, suite_name: str) -> str:
  """Where `cftjax eval` writes without config.output_dir, never inside a model checkpoint: a
  training run's RUN_DIR/eval/<suite> (<suite>@latest, <suite>@step=N for those selectors), else
  ./eval_results/<checkpoint dir name>/<suite>."""
  ref = checkpoint_io.parse_checkpoint_ref(ckpt_dir)
  if checkpoint_io.is_run_dir(ref.path):
    selector = str(ref)[len(ref.path) + 1:]
    return os.path.join(ref.path, "eval", f"{suite_name}@{selector}" if selector else suite_name)
  return os.path.join("eval_results", os.path.basename(os.path.normpath(ref.path)), suite_name)


def run_eval(config: Any, ckpt_dir: str) -> dict[str, Any]:
  """Runs the config's suite on the model checkpoint in `ckpt_dir` (`cftjax convert` / export).

  Writes OUT/<benchmark>.jsonl (per-example records; a re-run skips the examples already there),
  OUT/summary.json, and returns the summary {ckpt, output_dir, benchmarks: {name: metrics},
  math_average}. OUT is `default_output_dir` unless config.output_dir is set.
  """
  benchmarks = suite_benchmarks(config)
  out_dir = config.get("output_dir") or default_output_dir(ckpt_dir, config.get("name", "suite"))
  model_cfg, params, tokenizer = load_for_eval(ckpt_dir, config)
  prepared = [prepare(b, tokenizer) for b in benchmarks]
  identity = {"ckpt": os.path.abspath(ckpt_dir)}
  grader = None
  if _needs_grader(benchmarks):
    grader = MathGrader(config.grader_workers, config.grader_timeout_s)
  try:
    summaries = run_suite(params, model_cfg, tokenizer, prepared, config, grader, out_dir, identity,
                          load_actors(benchmarks, config))
  finally:
    if grader is not None:
      grader.close()
  summary = {"ckpt": os.path.abspath(ckpt_dir), "output_dir": os.path.abspath(out_dir),
             "benchmarks": summaries, "math_average": math_average(summaries)}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
  return summary


def format_table(summary: Mapping[str, Any]) -> str:
  """A plain-text table: one row per benchmark, headline metrics in percent."""
  rows = []
  for name, s in summary["benchmarks"].items():
    if s["kind"] == "math":
      keys = [k for k in s if k.startswith(("pass@", "maj@"))]
    elif s["kind"] == "critique_refine":
      keys = [k for k in s if k.startswith("accuracy_round_")] + list(TABLE_METRICS[s["kind"]])
    else:
      keys = [*TABLE_METRICS[s["kind"]], *(k for k in s if k.startswith("maj@"))]
    cells = "  ".join(f"{k} {100 * s[k]:5.1f}" for k in keys)
    speed = (f"{s['problems_per_min']:.1f} problems/min" if "problems_per_min" in s
             else f"{s['tokens_per_s']:.0f} tok/s")
    rows.append((name, s["kind"], str(s["num_examples"]), cells, speed))
  header = ("benchmark", "kind", "n", "metrics (%)", "speed")
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
  if summary.get("math_average") is not None:
    lines.append(f"math average pass@1: {100 * summary['math_average']:.1f}")
  return "\n".join(lines)


def run_command(args: Any, overrides: list[tuple[str, str]]) -> int:
  """`cftjax eval --config FILE --ckpt DIR [--config.key=value ...]`: runs, prints the table."""
  config = config_lib.load_config(args.config, overrides)
  summary = run_eval(config, args.ckpt)
  print(format_table(summary), flush=True)
  print(f"records and summary.json in {summary['output_dir']}", flush=True)
  return 0


class PeriodicEval:
  """The suite of `suite_cfg` (examples and prompts prepared once) run on the current params, with
  the progress bar as suite_cfg.progress_bar says.

  Call with (params, step) -> {"<benchmark>/<metric>": value}; with suite_cfg.output_dir set, the
  records of each call go to OUTPUT_DIR/step_<step>/. Call close() (or use `with`) to stop the
  math grader's workers.
  """

  def __init__(self, suite_cfg: Any, tokenizer: Any, model_cfg: ModelConfig):
    benchmarks = suite_benchmarks(suite_cfg)
    self._suite, self._tokenizer, self._model_cfg = suite_cfg, tokenizer, model_cfg
    self._prepared = [prepare(b, tokenizer) for b in benchmarks]
    self._actors = load_actors(benchmarks, suite_cfg)
    self._grader = (MathGrader(suite_cfg.grader_workers, suite_cfg.grader_timeout_s)
                    if _needs_grader(benchmarks) else None)

  def __call__(self, params: Any, step: int) -> dict[str, float]:
    out_dir = os.path.join(self._suite.output_dir, f"step_{step}") if self._suite.output_dir else None
    summaries = run_suite(params, self._model_cfg, self._tokenizer, self._prepared, self._suite,
                          self._grader, out_dir, actors=self._actors)
    return flatten_metrics(summaries)

  def close(self) -> None:
    if self._grader is not None:
      self._grader.close()

  def __enter__(self) -> "PeriodicEval":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def flatten_metrics(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """{"<benchmark>/<metric>[/<sub>...]": float} of the numeric entries of the summaries."""
  flat = {}

  def visit(prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
      for key, item in value.items():
        visit(f"{prefix}/{key}", item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      flat[prefix] = float(value)

  for name, summary in summaries.items():
    visit(name, summary)
  return flat


def score_critiques(params: Any, model_cfg: ModelConfig, tokenizer: Any, records: Sequence[CritiqueRecord], *,
                    template: Any, verdict_style: str, batch_size: int, max_new_tokens: int,
                    seed: int = 0, prompt_buckets: Sequence[int] | None = None
                    ) -> tuple[dict[str, Any], list[str]]:
  """Greedy critiques of labelled records, scored: (critique summary as `summarize`, the critiques).

  The one "generate critiques and score verdicts" path; the CFT trainer's held-out verdict
  accuracy calls it.
  """
  bench = Benchmark(name="heldout_verdicts", path="", kind="critique", template=template,
                    max_new_tokens=max_new_tokens, verdict_style=verdict_style)
  bench.check("score_critiques")
  prepared = prepare(bench, tokenizer, [critique_example(r) for r in records])
  suite = base_suite_config(bench.name)
  suite.batch_size, suite.seed, suite.progress_bar = batch_size, seed, False
  suite.prompt_buckets = tuple(prompt_buckets or ())
  summary, done = run_benchmark(params, model_cfg, tokenizer, prepared, suite, grader=None)
  return summary, [r["samples"][0]["completion"] for r in done]
