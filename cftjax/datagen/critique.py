"""`cftjax data critique`: critique training data from a verifiable set.

Per problem (math rows with a reference answer, code rows with tests; any `cftjax.data.readers`
format): every generator writes `samples_per_problem` candidate solutions; each distinct candidate is
labelled by math-verify or by the code reward's sandboxed pass rate (right when > label_min_pass_rate);
every teacher critiques each distinct candidate. A problem's work is appended to OUT/work.jsonl as
soon as it is done, so a killed run resumes at the next problem; its randomness depends only on the
seed and the problem's index, so the outputs equal an uninterrupted run's. At the end the work is
assembled (`assemble`) into OUT/crl.jsonl (labelled candidates, balanced right / wrong per problem),
OUT/cft.jsonl (critiques whose verdict agrees with the label, deduplicated, capped per problem) and
OUT/manifest.json (sources, settings, counts, drops by reason). With step_rollouts > 0, OUT/steps.jsonl
holds step labels of the labelled math candidates (`step_labels`). With output_format "array_record"
the rows go to OUT/crl.array_record, ... instead (one JSON row per record, as
`cftjax.data.sources.write_array_record` writes them; the trainer's Grain pipeline reads either). The
output format is not part of a run's settings: rerunning a finished directory with the other format
re-assembles its rows without generating anything.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import tqdm
from ml_collections import config_dict

from cftjax import config as config_lib
from cftjax.data import critique, readers, sources
from cftjax.data.critique import CritiqueRecord
from cftjax.datagen.chat import CheckpointChat, EndpointChat, chat_model
from cftjax.datagen.rule_teacher import SyntheticAdditionTeacher, rule_teacher
from cftjax.rewards import registry
from cftjax.rewards.grading import MathGrader

log = logging.getLogger(__name__)

WORK_FILE, SETTINGS_FILE, MANIFEST_FILE = "work.jsonl", "settings.json", "manifest.json"
OUTPUT_FORMATS = {"jsonl": ".jsonl", "array_record": ".array_record"}  # -> the row files' extension
ROW_KINDS = ("crl", "cft", "steps")


def base_config() -> config_dict.ConfigDict:
  """Every key of a `cftjax data critique` config (a config file's get_config starts from this)."""
  c = config_dict.ConfigDict()
  c.input = ""  # the verifiable set
  c.format = "auto"  # its row format (cftjax.data.readers)
  c.limit = 0  # > 0: the first `limit` problems only (1 with several generators and teachers: One-Shot CFT)
  c.generators = config_dict.ConfigDict()  # name -> {"ckpt": DIR} or {"endpoint": URL, "model": NAME}
  c.teachers = config_dict.ConfigDict()  # same, or {"rule": "synthetic_addition"} (a rule-based stand-in); none = CRL rows only
  c.samples_per_problem = 8  # candidates per problem from each generator
  c.temperature = 1.0
  c.max_new_tokens = 1024
  c.math_template = "math_cot"  # the generators' prompt for math rows
  c.code_template = "code"  # ... and for code rows
  c.label_min_pass_rate = 0.8  # code: a candidate is right when its test pass rate is above this
  c.code_wall_s = 5.0  # per test, in the sandbox
  c.crl_max_per_problem = 8  # CRL rows per problem, half right and half wrong where possible
  c.crl_keep_unbalanced = True  # a problem with one label only keeps up to half the cap of it
  c.teacher_template = "cft"  # the teachers' critique prompt
  c.teacher_temperature = 0.0
  c.teacher_max_new_tokens = 1024
  c.verdict_style = "auto"  # how the teachers' verdicts are parsed
  c.cft_max_per_problem = 4  # CFT rows kept per problem (in candidate, then teacher order)
  c.step_rollouts = 0  # > 0: Monte-Carlo step labels of math candidates, this many rollouts per prefix (DeepCritic: 8)
  c.step_temperature = 0.7  # the rollouts' temperature (DeepCritic: 0.7)
  c.seed = 0
  c.output_format = "jsonl"  # or "array_record": the row files' format
  c.grader_workers = 2
  c.grader_timeout_s = 5.0
  c.progress_bar = True
  return c


# ------------------------------------------------------------------------------------------------
# Assembling the rows from the per-problem work.


def balance_crl(candidates: Sequence[Mapping[str, Any]], max_rows: int, keep_unbalanced: bool
                ) -> tuple[list[int], collections.Counter]:
  """Indices of the candidates kept as CRL rows, and the drops by reason.

  Candidates (each with a `label`, None when it could not be labelled) keep their order; with both
  labels present the first k right and the first k wrong are kept, k = min(#right, #wrong,
  max_rows // 2); with one label only, the first max_rows // 2 of it when keep_unbalanced, else none.
  """
  drops: collections.Counter = collections.Counter()
  right = [i for i, c in enumerate(candidates) if c["label"] is True]
  wrong = [i for i, c in enumerate(candidates) if c["label"] is False]
  drops["unlabelled"] += len(candidates) - len(right) - len(wrong)
  half = max_rows // 2
  if right and wrong:
    k = min(len(right), len(wrong), half)
    kept = sorted(right[:k] + wrong[:k])
    drops["crl_balance"] += len(right) + len(wrong) - 2 * k
  elif keep_unbalanced:
    kept = (right or wrong)[:half]
    drops["crl_balance"] += len(right) + len(wrong) - len(kept)
  else:
    kept = []
    drops["crl_one_label"] += len(right) + len(wrong)
  return kept, +drops  # unary plus: only positive counts


def filter_critiques(candidates: Sequence[Mapping[str, Any]], critiques: Sequence[Mapping[str, Any]],
                     max_rows: int) -> tuple[list[int], collections.Counter]:
  """Indices of the critiques kept as CFT rows, and the drops by reason, in this order: the
  candidate has no label (unlabelled_candidate), no verdict (no_verdict), a verdict that disagrees
  with the label (verdict_disagrees), the same text as a kept critique of the same candidate
  (duplicate_critique), beyond max_rows for the problem (cft_problem_cap)."""
  drops: collections.Counter = collections.Counter()
  kept, seen = [], set()
  for i, c in enumerate(critiques):
    label = candidates[c["candidate"]]["label"]
    if label is None:
      reason = "unlabelled_candidate"
    elif c["verdict"] is None:
      reason = "no_verdict"
    elif c["verdict"] != label:
      reason = "verdict_disagrees"
    elif (c["candidate"], c["critique"].strip()) in seen:
      reason = "duplicate_critique"
    elif len(kept) >= max_rows:
      reason = "cft_problem_cap"
    else:
      kept.append(i)
      seen.add((c["candidate"], c["critique"].strip()))
      continue
    drops[reason] += 1
  return kept, drops


def assemble(problems: Sequence[CritiqueRecord], work: Sequence[Mapping[str, Any]], config: Any
             ) -> tuple[list[CritiqueRecord], list[CritiqueRecord], list[CritiqueRecord], dict[str, Any]]:
  """(CRL rows, CFT rows, step-label rows, counts with drops by reason) from the problems' work records."""
  crl, cft, steps = [], [], []
  drops: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  for problem, item in zip(problems, work):
    candidates = item["candidates"]
    counts["candidates"] += item["num_samples"]
    drops["duplicate_solution"] += item["num_samples"] - len(candidates)
    counts["right"] += sum(c["label"] is True for c in candidates)
    counts["wrong"] += sum(c["label"] is False for c in candidates)
    kept, crl_drops = balance_crl(candidates, config.crl_max_per_problem, config.crl_keep_unbalanced)
    drops.update(crl_drops)
    base = dict(question=problem.question, reference_answer=problem.reference_answer, tests=problem.tests)
    crl += [CritiqueRecord(**base, solution=candidates[i]["solution"], label=candidates[i]["label"], source="crl",
                           id=f"{problem.id}/crl/{i}") for i in kept]
    kept, cft_drops = filter_critiques(candidates, item["critiques"], config.cft_max_per_problem)
    drops.update(cft_drops)
    for i in kept:
      c = item["critiques"][i]
      candidate = candidates[c["candidate"]]
      cft.append(CritiqueRecord(**base, solution=candidate["solution"], critique=c["critique"],
                                label=candidate["label"], source="cft", id=f"{problem.id}/cft/{i}"))
    counts["critiques"] += len(item["critiques"])
    steps += [CritiqueRecord(**base, solution=cand["solution"], label=cand["label"], steps=tuple(cand["steps"]),
                             error_step=cand["error_step"], source="steps", id=f"{problem.id}/steps/{j}")
              for j, cand in enumerate(candidates) if "error_step" in cand]
  counts.update(problems=len(work), crl_rows=len(crl), cft_rows=len(cft), step_rows=len(steps),
                crl_right=sum(r.label for r in crl), crl_wrong=sum(not r.label for r in crl))
  return crl, cft, steps, {"counts": dict(sorted(counts.items())), "drops": dict(sorted((k, v) for k, v in drops.items() if v))}


def split_steps(solution: str) -> list[str]:
  """A solution's steps: its paragraphs (separated by blank lines), stripped, empty ones dropped."""
  return [step.strip() for step in solution.split("\n\n") if step.strip()]


def first_error_step(values: Sequence[float]) -> int:
  """The 0-based index of the first step whose prefix no rollout completes correctly (value 0), -1 when
  every prefix has value > 0 (DeepCritic's / Math-Shepherd's hard estimate)."""
  return next((k for k, value in enumerate(values) if value == 0.0), -1)


# ------------------------------------------------------------------------------------------------
# One problem's work.


class Builder:
  """The models and graders of a run; `work(index, problem)` -> its work record."""

  def __init__(self, config: Any):
    self.config = config
    self.generators = {name: chat_model(spec, f"config.generators.{name}") for name, spec in config.generators.items()}
    self.teachers = {name: _teacher(spec, f"config.teachers.{name}") for name, spec in config.teachers.items()}
    self.grader = MathGrader(config.grader_workers, config.grader_timeout_s)

  def close(self) -> None:
    self.grader.close()

  def _labels(self, problem: CritiqueRecord, solutions: Sequence[str]) -> list[tuple[bool | None, str]]:
    if problem.reference_answer is not None:
      return [(ok, reason) for ok, reason in
              self.grader.grade_many([problem.reference_answer] * len(solutions), list(solutions))]
    results = registry.score_batch("code", solutions, [problem] * len(solutions), wall_s=self.config.code_wall_s)
    return [(None, r.reason) if r.error else (r.score > self.config.label_min_pass_rate, r.reason)
            for r in results]

  def work(self, index: int, problem: CritiqueRecord) -> dict[str, Any]:
    c = self.config
    template = c.math_template if problem.reference_answer is not None else c.code_template
    messages = critique.get_template(template).messages(problem, with_target=False)
    samples = []
    for g, (name, model) in enumerate(sorted(self.generators.items())):
      texts = model.complete(messages, c.samples_per_problem, c.temperature, c.max_new_tokens,
                             seed=_seed(c.seed, index, g))
      samples += [(name, text) for text in texts]
    first_writer: dict[str, str] = {}
    for name, text in samples:
      first_writer.setdefault(text, name)
    unique = list(first_writer.items())  # distinct texts in first-seen order
    labels = self._labels(problem, [text for text, _ in unique])
    candidates = [{"generator": name, "solution": text, "label": label, "reason": reason}
                  for (text, name), (label, reason) in zip(unique, labels)]
    if c.step_rollouts and problem.reference_answer is not None:
      for j, candidate in enumerate(candidates):
        if candidate["label"] is not None:
          candidate.update(self.step_labels(problem, messages, candidate, seed=_seed(c.seed, index, 2000 + j)))
    critiques = []
    teacher_template = critique.get_template(c.teacher_template)
    conversations = [teacher_template.messages(CritiqueRecord(question=problem.question, solution=cand["solution"]),
                                               with_target=False) for cand in candidates]
    for t, (name, model) in enumerate(sorted(self.teachers.items())):
      if isinstance(model, SyntheticAdditionTeacher):
        texts = model.critique_each(problem.question, [cand["solution"] for cand in candidates])
      else:
        texts = model.complete_each(conversations, c.teacher_temperature, c.teacher_max_new_tokens,
                                    seed=_seed(c.seed, index, 1000 + t))
      critiques += [{"candidate": j, "teacher": name, "critique": text,
                     "verdict": critique.parse_verdict(text, c.verdict_style)} for j, text in enumerate(texts)]
    return {"index": index, "id": problem.id, "num_samples": len(samples), "candidates": candidates,
            "critiques": critiques}


  def step_labels(self, problem: CritiqueRecord, messages: Any, candidate: Mapping[str, Any], seed: int
                  ) -> dict[str, Any]:
    """{steps, step_values, error_step} of a labelled candidate: value k is the fraction of step_rollouts
    continuations of steps[:k+1] (by the candidate's generator, in process or through its endpoint's
    `continue_final_message`, at step_temperature) that math-verify
    grades right; the last step's value is the candidate's own label. Rollouts stop at the first
    value 0 (`first_error_step`)."""
    c = self.config
    steps, values = split_steps(candidate["solution"]), []
    model = self.generators[candidate["generator"]]
    for k in range(len(steps)):
      if k == len(steps) - 1:
        values.append(float(candidate["label"]))
        break
      prefix = "\n\n".join(steps[:k + 1]) + "\n\n"
      rollouts = model.complete(messages, c.step_rollouts, c.step_temperature, c.max_new_tokens,
                                seed=_seed(seed, k), prefix=prefix)
      grades = self.grader.grade_many([problem.reference_answer] * len(rollouts), [prefix + r for r in rollouts])
      values.append(sum(ok for ok, _ in grades) / len(grades))
      if values[-1] == 0.0:
        break
    return {"steps": steps, "step_values": values, "error_step": first_error_step(values)}


def _teacher(spec: Mapping[str, Any], where: str) -> CheckpointChat | EndpointChat | SyntheticAdditionTeacher:
  """A teacher from its config entry: a chat model (`chat_model`) or {"rule": NAME}, a rule-based stand-in."""
  if "rule" in spec:
    if len(spec) != 1:
      raise ValueError(f"{where}: a rule teacher takes only 'rule', got {dict(spec)}")
    return rule_teacher(spec["rule"], where)
  return chat_model(spec, where)


def _seed(*parts: int) -> int:
  """A 31-bit seed from integers (stable across runs and processes)."""
  value = 0
  for part in parts:
    value = (value * 1_000_003 + part + 1) % (2 ** 31 - 1)
  return value


# ------------------------------------------------------------------------------------------------
# The run: resume, outputs, manifest.


def _settings(config: Any) -> dict[str, Any]:
  """What decides a run's work (an earlier run resumes only with the same): the config less its
  progress bar, grader workers and output format."""
  settings = config.to_dict()
  for key in ("progress_bar", "grader_workers", "output_format"):
    settings.pop(key, None)
  settings["input"] = os.path.abspath(settings["input"])
  return json.loads(json.dumps(settings, default=str))


def _load_work(out_dir: str, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
  """The finished problems of an earlier run with the same settings (a torn last line is dropped)."""
  settings_path, work_path = os.path.join(out_dir, SETTINGS_FILE), os.path.join(out_dir, WORK_FILE)
  if os.path.exists(settings_path):
    with open(settings_path, encoding="utf-8") as f:
      saved = json.load(f)
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
      raise ValueError(f"{out_dir} holds a run with other settings ({', '.join(f'config.{k}' for k in changed)}); "
                       "use another output directory or delete it to start afresh")
  else:
    os.makedirs(out_dir, exist_ok=True)
    with open(settings_path, "w", encoding="utf-8") as f:
      json.dump(settings, f, indent=2, sort_keys=True)
  done, lines, torn = {}, [], 0
  if os.path.exists(work_path):
    with open(work_path, encoding="utf-8") as f:
      for line in f:
        try:
          item = json.loads(line)
        except json.JSONDecodeError:
          torn += 1
          continue
        done[item["index"]] = item
        lines.append(line if line.endswith("\n") else line + "\n")
    if torn:
      log.warning("%s: dropped %d torn line(s) of an interrupted run; redoing those problems", work_path, torn)
      with open(work_path, "w", encoding="utf-8") as f:
        f.writelines(lines)
  return done


def _write_rows(path: str, rows: Sequence[dict[str, Any]], output_format: str) -> None:
  """Rows to `path` as JSONL or ArrayRecord, written beside it and renamed into place when complete."""
  tmp = path + ".tmp"
  if output_format == "jsonl":
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
  else:
    sources.write_array_record(rows, tmp)
  os.replace(tmp, path)


def _write_outputs(out_dir: str, output_format: str, rows: Mapping[str, Sequence[CritiqueRecord]]
                   ) -> dict[str, str]:
  """Writes each kind's rows as OUT/<kind><extension>, removes row files of the other format (so the
  directory holds what the manifest names), and returns {kind: file name}."""
  files = {kind: kind + OUTPUT_FORMATS[output_format] for kind in rows}
  for kind, kind_rows in rows.items():
    _write_rows(os.path.join(out_dir, files[kind]), [r.to_dict() for r in kind_rows], output_format)
  for kind in ROW_KINDS:
    for extension in OUTPUT_FORMATS.values():
      stale = os.path.join(out_dir, kind + extension)
      if files.get(kind) != kind + extension and os.path.exists(stale):
        os.remove(stale)
  return files


def run(config: Any, out_dir: str) -> dict[str, Any]:
  """Builds (or resumes) the data in out_dir; returns the manifest plus `seconds` and `problems_per_min`."""
  if not config.input or not os.path.exists(config.input):
    raise FileNotFoundError(f"config.input={config.input!r} does not exist; set it to a verifiable set "
                            "(math rows with answers or code rows with tests)")
  if config.output_format not in OUTPUT_FORMATS:
    raise config_lib.ConfigError(f"config.output_format={config.output_format!r} is not one of "
                                 f"{sorted(OUTPUT_FORMATS)}; set --config.output_format=jsonl")
  if not config.generators:
    raise config_lib.ConfigError("config.generators is empty; add one, e.g. "
                                 "--config.generators.policy.ckpt=DIR (or .endpoint=http://HOST:PORT/v1)")
  loaded = readers.load_records(config.input, config.format, on_bad_row="skip")
  problems = [r for r in loaded if r.reference_answer is not None or r.tests is not None]
  unverifiable = len(loaded) - len(problems)
  if unverifiable:
    log.warning("%s: skipped %d rows with neither a reference answer nor tests", config.input, unverifiable)
  problems = problems[:config.limit] if config.limit else problems
  settings = _settings(config)
  done = _load_work(out_dir, settings)
  pending = [i for i in range(len(problems)) if i not in done]
  began = time.perf_counter()
  builder = Builder(config) if pending else None  # a finished run only re-assembles its rows
  try:
    with open(os.path.join(out_dir, WORK_FILE), "a", encoding="utf-8") as work_file, \
         tqdm.tqdm(total=len(problems), initial=len(problems) - len(pending), desc="critique data", unit="problem",
                   disable=not config.progress_bar, dynamic_ncols=True) as bar:
      for i in pending:
        item = builder.work(i, problems[i])
        work_file.write(json.dumps(item, ensure_ascii=False) + "\n")
        work_file.flush()
        done[i] = item
        bar.update(1)
  finally:
    if builder is not None:
      builder.close()
  seconds = time.perf_counter() - began
  crl, cft, steps, stats = assemble(problems, [done[i] for i in range(len(problems))], config)
  files = _write_outputs(out_dir, config.output_format,
                         {"crl": crl, "cft": cft, **({"steps": steps} if config.step_rollouts else {})})
  manifest = {"sources": {"input": settings["input"], "format": config.format,
                          "generators": settings["generators"], "teachers": settings["teachers"]},
              "settings": settings, **stats,
              "input_rows": {"read": len(loaded), "bad": dict(loaded.skipped), "unverifiable": unverifiable},
              "output_format": config.output_format, "files": files}
  with open(os.path.join(out_dir, MANIFEST_FILE + ".tmp"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  os.replace(os.path.join(out_dir, MANIFEST_FILE + ".tmp"), os.path.join(out_dir, MANIFEST_FILE))
  return {**manifest, "seconds": seconds, "problems_per_min": 60 * len(pending) / seconds if pending else 0.0}


def report(result: Mapping[str, Any]) -> str:
  """The stats report printed at the end of a run."""
  lines = [f"{k}: {v}" for k, v in result["counts"].items()]
  lines += [f"dropped ({k}): {v}" for k, v in result["drops"].items()]
  lines.append(f"{result['problems_per_min']:.1f} problems/min over {result['seconds']:.1f} s")
  return "\n".join(lines)


def run_command(args: Any, overrides: list[tuple[str, str]]) -> int:
  """`cftjax data critique --config FILE --out DIR [--config.key=value ...]`."""
  config = config_lib.load_config(args.config, overrides)
  result = run(config, args.out)
  print(report(result), flush=True)
  print(f"rows and manifest.json in {os.path.abspath(args.out)}", flush=True)
  return 0
