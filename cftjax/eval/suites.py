"""Benchmark definitions of an eval suite and the readers of benchmark rows (math sets in their
published shapes, labelled critique sets, ProcessBench) into prompt records with their targets."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from ml_collections import config_dict

from cftjax.data import critique, readers
from cftjax.data.critique import CritiqueRecord
from cftjax.eval import metrics as metrics_lib
from cftjax.rewards.grading import extract_boxed

log = logging.getLogger(__name__)

KINDS = ("math", "critique", "processbench", "critic_rerank", "critique_refine")
# Kinds where an actor answers math problems and the evaluated model critiques its answers.
CRITIC_KINDS = ("critic_rerank", "critique_refine")
DEFAULT_TEMPLATES = {"math": "math_cot", "critique": "cft", "processbench": "processbench",
                     "critic_rerank": "cft", "critique_refine": "cft"}
# Stop tokens of the chat formats (REFERENCE §3), added to the tokenizer's own eos ids when its vocab
# has them: a base model prompted in ChatML ends its turn with <|im_end|>.
DEFAULT_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>")

# ProcessBench's critique task: the solution's steps as indexed paragraphs, the earliest wrong
# paragraph's index (or -1) in \boxed{}.
PROCESSBENCH_USER = (
    "The following is a math problem and a solution (split into paragraphs, enclosed with tags and "
    "indexed from 0):\n\n[Math Problem]\n\n{question}\n\n[Solution]\n\n{solution}\n\n"
    "Your task is to review and critique the solution paragraph by paragraph. Once you identify an "
    "error in a paragraph, return the index of the paragraph where the earliest error occurs. "
    "Otherwise, return the index of -1 (which typically denotes \"not found\").\n\n"
    "Please put your final answer (i.e., the index) in \\boxed{{}}."
)
PROCESSBENCH_TEMPLATE = critique.PromptTemplate("processbench", user=PROCESSBENCH_USER)

# Fields holding a math row's question / final answer, in the order they are looked up.
_QUESTION_FIELDS = ("problem", "question")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark of a suite; `from_config` validates a config entry into this.

  kind: "math" (last \\boxed{} answer graded by math-verify), "critique" (verdict vs correctness
  label), "processbench" (earliest wrong step), "critic_rerank" (an actor samples n_samples answers
  to each math problem, the evaluated critic judges each, one is picked by `pick`) or
  "critique_refine" (the actor answers, the critic critiques, the actor refines; `rounds` times).
  ks: the k of pass@k / maj@k (each <= n_samples).
  step_indexing: how a processbench completion counts steps in its \\boxed{k}: "processbench" (from
  0, the built-in processbench template) or "deepcritic" (from 1, the step_critique template).
  limit: the first `limit` examples only (0 = all). format: row format of a critique file
  (`cftjax.data.readers`; "auto" detects it).
  template: the evaluated model's prompt; for the critic kinds the critique prompt, while the actor
  (the checkpoint or run directory `actor`, "" = the evaluated model itself) answers with
  `actor_template` and refines with `refine_template`; n_samples, temperature, top_p, top_k and
  max_new_tokens are the actor's, and the critic critiques greedily up to critic_max_new_tokens.
  """

  name: str
  path: str
  kind: str
  template: Any = ""
  n_samples: int = 1
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 1024
  ks: tuple[int, ...] = (1,)
  verdict_style: str = "auto"
  step_indexing: str = "processbench"
  limit: int = 0
  format: str = "auto"
  actor: str = ""
  actor_template: Any = "math_cot"
  refine_template: Any = "refine"
  pick: str = "first"
  rounds: int = 1
  critic_max_new_tokens: int = 512

  @classmethod
  def from_config(cls, name: str, entry: Mapping[str, Any], where: str) -> "Benchmark":
    """Builds and checks a benchmark from its config entry; `where` names the entry (config key)."""
    entry = dict(entry)
    known = {f.name for f in dataclasses.fields(cls)} - {"name"}
    unknown = sorted(set(entry) - known)
    if unknown:
      raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    if "ks" in entry:
      entry["ks"] = tuple(int(k) for k in entry["ks"])
    for key in ("template", "actor_template", "refine_template"):
      if isinstance(entry.get(key), Mapping):
        entry[key] = dict(entry[key])
    bench = cls(name=name, **entry)
    bench.check(where)
    return bench

  def check(self, where: str) -> None:
    if self.kind not in KINDS:
      raise ValueError(f"{where}.kind={self.kind!r}; choose one of {KINDS}")
    if self.n_samples < 1:
      raise ValueError(f"{where}.n_samples={self.n_samples}; it must be >= 1")
    if self.temperature == 0 and self.n_samples > 1:
      raise ValueError(f"{where}: n_samples={self.n_samples} with temperature 0 gives identical "
                       "greedy samples; set a temperature > 0 or n_samples=1")
    bad_ks = [k for k in self.ks if not 1 <= k <= self.n_samples]
    if bad_ks or not self.ks:
      raise ValueError(f"{where}.ks={self.ks}: each k must be in [1, n_samples={self.n_samples}]")
    if self.max_new_tokens < 1:
      raise ValueError(f"{where}.max_new_tokens={self.max_new_tokens}; it must be >= 1")
    if self.limit < 0:
      raise ValueError(f"{where}.limit={self.limit}; use 0 for all examples or a positive count")
    if self.verdict_style not in critique.STYLES:
      raise ValueError(f"{where}.verdict_style={self.verdict_style!r}; choose one of {critique.STYLES}")
    if self.step_indexing not in critique.STEP_INDEXING:
      raise ValueError(f"{where}.step_indexing={self.step_indexing!r}; choose one of "
                       f"{sorted(critique.STEP_INDEXING)}")
    self.prompt_template()  # validates the template
    if self.kind in CRITIC_KINDS:
      self._check_critic_kind(where)

  def _check_critic_kind(self, where: str) -> None:
    if self.pick not in metrics_lib.PICK_RULES:
      raise ValueError(f"{where}.pick={self.pick!r}; choose one of {metrics_lib.PICK_RULES}")
    if self.rounds < 1:
      raise ValueError(f"{where}.rounds={self.rounds}; it must be >= 1")
    if self.critic_max_new_tokens < 1:
      raise ValueError(f"{where}.critic_max_new_tokens={self.critic_max_new_tokens}; it must be >= 1")
    if self.kind == "critique_refine" and self.n_samples != 1:
      raise ValueError(f"{where}.n_samples={self.n_samples}; critique_refine refines one answer per "
                       "problem (set n_samples=1)")
    for key in ("actor_template", "refine_template"):
      try:
        critique.get_template(getattr(self, key))
      except ValueError as e:
        raise ValueError(f"{where}.{key}: {e}") from None

  def prompt_template(self) -> critique.PromptTemplate:
    spec = self.template or DEFAULT_TEMPLATES[self.kind]
    return PROCESSBENCH_TEMPLATE if spec == "processbench" else critique.get_template(spec)

  def generation_settings(self) -> dict[str, Any]:
    """What makes two runs' completions comparable (a resumed run must match these)."""
    return {"path": os.path.abspath(self.path), "kind": self.kind, "template": self.template,
            "n_samples": self.n_samples, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "max_new_tokens": self.max_new_tokens,
            "verdict_style": self.verdict_style, "step_indexing": self.step_indexing,
            "format": self.format,
            "actor": os.path.abspath(self.actor) if self.actor else "", "actor_template": self.actor_template,
            "refine_template": self.refine_template, "pick": self.pick, "rounds": self.rounds,
            "critic_max_new_tokens": self.critic_max_new_tokens}


@dataclasses.dataclass(frozen=True)
class Example:
  """A benchmark item: the record the template renders and what a completion is scored against.

  target: the gold answer (math, str), the correctness label (critique, bool) or the earliest
  wrong step, -1 for none (processbench, int).
  """

  id: str
  record: CritiqueRecord
  target: Any


# ----------------------------------------------------------------------------- math rows


def math_answer(row: Mapping[str, Any], where: str) -> str:
  """The gold final answer of a math row in any of the published shapes: the first of
  readers.ANSWER_FIELDS (`readers.gold_answer`, the same fields math RL reads), else the last
  \\boxed{} of `solution` (MATH, Minerva)."""
  answer = readers.gold_answer(dict(row), where)
  if answer is not None:
    return answer
  solution = row.get("solution")
  boxed = extract_boxed(solution) if isinstance(solution, str) else None
  if boxed is None:
    raise ValueError(f"{where}: no gold answer: expected a field {list(readers.ANSWER_FIELDS)} or a "
                     "'solution' with a \\boxed{} answer")
  return boxed.strip()


def math_example(row: Mapping[str, Any], where: str) -> Example:
  question = next((row[f] for f in _QUESTION_FIELDS if isinstance(row.get(f), str) and row[f].strip()),
                  None)
  if question is None:
    raise ValueError(f"{where}: no question: expected a non-empty string field "
                     f"{' or '.join(repr(f) for f in _QUESTION_FIELDS)}")
  row_id = next((row[f] for f in ("id", "unique_id", "idx") if row.get(f) is not None), where)
  answer = math_answer(row, where)
  return Example(str(row_id), CritiqueRecord(question=question, reference_answer=answer), answer)


def read_math_examples(path: str) -> list[Example]:
  return [math_example(row, where) for where, row in readers.read_rows(path)]


# ----------------------------------------------------------------------------- critique rows


def critique_example(record: CritiqueRecord) -> Example:
  return Example(record.id, record, bool(record.label))


def read_critique_examples(path: str, fmt: str = "auto") -> list[Example]:
  """Labelled critique rows (any reader format); rows without a correctness label are skipped
  and counted."""
  records = readers.load_records(path, fmt)
  labelled = [r for r in records if r.label is not None]
  if len(labelled) < len(records):
    log.warning("%s: skipped %d of %d rows without a correctness label", path,
                len(records) - len(labelled), len(records))
  if not labelled:
    raise ValueError(f"{path}: no row has a correctness label; a critique benchmark scores "
                     "verdicts against labels")
  return [critique_example(r) for r in labelled]


# ----------------------------------------------------------------------------- ProcessBench rows


def read_processbench_examples(path: str) -> list[Example]:
  records = readers.load_records(path, "processbench")
  return [Example(r.id, dataclasses.replace(r, solution=critique.tagged_steps(r.steps)), r.error_step)
          for r in records]


def load_examples(bench: Benchmark) -> list[Example]:
  """The benchmark's examples (the first `limit` when set)."""
  if not os.path.exists(bench.path):
    raise FileNotFoundError(f"benchmark {bench.name!r}: {bench.path!r} does not exist; set "
                            f"--config.benchmarks.{bench.name}.path to the benchmark's JSONL file")
  if bench.kind == "math" or bench.kind in CRITIC_KINDS:
    examples = read_math_examples(bench.path)
  elif bench.kind == "critique":
    examples = read_critique_examples(bench.path, bench.format)
  else:
    examples = read_processbench_examples(bench.path)
  return examples[:bench.limit] if bench.limit else examples


# ----------------------------------------------------------------------------- suite configs


def benchmark_entry(path: str, kind: str, **fields: Any) -> config_dict.ConfigDict:
  """A config entry for `config.benchmarks.<name>` with every Benchmark key present (so each can
  be overridden on the command line) and the kind's default template filled in."""
  defaults = {f.name: f.default for f in dataclasses.fields(Benchmark)
              if f.name not in ("name", "path", "kind")}
  unknown = sorted(set(fields) - set(defaults))
  if unknown:
    raise ValueError(f"benchmark_entry: unknown key(s) {unknown}; known: {sorted(defaults)}")
  entry = {**defaults, "template": DEFAULT_TEMPLATES.get(kind, ""), **fields, "path": path, "kind": kind}
  entry["temperature"], entry["top_p"] = float(entry["temperature"]), float(entry["top_p"])
  entry["ks"] = tuple(entry["ks"])
  return config_dict.ConfigDict(entry)


def base_suite_config(name: str) -> config_dict.ConfigDict:
  """The keys every eval config has; add entries to `benchmarks` with `benchmark_entry`."""
  c = config_dict.ConfigDict()
  c.name = name  # results go to CKPT/eval/<name> unless output_dir is set
  c.output_dir = ""
  c.benchmarks = config_dict.ConfigDict()
  c.benchmarks_to_run = ""  # comma-separated names, in table order ("" = all, sorted by name)
  c.limit = 0  # > 0 caps every benchmark at this many examples (smoke runs)
  c.batch_size = 16  # prompts per generation call (fixed, so each prompt bucket compiles once)
  c.prompt_buckets = ()  # padded prompt lengths; () = powers of two >= 16
  c.dtype = ""  # compute dtype override, e.g. "bfloat16" on GPU / TPU ("" = the checkpoint's)
  c.cache_dtype = "float32"  # KV cache dtype: float32 | bfloat16
  c.seed = 0  # sampling seed (greedy ignores it)
  c.stop_tokens = DEFAULT_STOP_TOKENS  # added to the tokenizer's eos ids when in its vocab
  c.grader_workers = 2  # math-verify worker processes
  c.grader_timeout_s = 5.0  # per answer
  c.progress_bar = True
  c.tokenizer_dir = ""  # when the checkpoint has no tokenizer/
  return c
