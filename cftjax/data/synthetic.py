"""The synthetic critique world: additions with right or subtly wrong answers, column-by-column
critiques, RL rows and a small SentencePiece tokenizer, all deterministic by seed."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import tempfile
from typing import Any, Collection, Iterator, Mapping, Sequence

import jax
from jax.experimental import multihost_utils

from cftjax.data.critique import CritiqueRecord, get_template, rule_critique

log = logging.getLogger(__name__)

SOURCE = "synthetic_addition"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ERROR_KINDS = ("digit_off", "dropped_carry", "swapped_digits")
_TOKENIZER_CORPUS_TEMPLATES = ("cft", "crl", "math_cot")
_TOKENIZER_CORPUS_SIZE = 1000
WORLD_FILE = "world.json"
DEFAULT_WORLD_DIR = "world"  # under the run directory


def question_text(a: int, b: int) -> str:
  return f"What is {a} + {b}?"


def solution_text(a: int, b: int, claimed: str) -> str:
  return f"{a} + {b} = {claimed}"


def addition_critique(a: int, b: int, claimed: str, forget_carry_column: int | None = None) -> str:
  """The column-by-column check of `claimed` as the sum of a and b, ending in the verdict.

  Each column (from the right) is written "x+y+carry=TT vs D ok|no": TT is the two-digit column
  total, D the solution's digit in that column ("_" when it has none). Columns past the operands
  are written "carry C vs D ok|no"; a digit past the true sum's length never matches. The verdict
  follows the marks. `forget_carry_column` (counted from the right) makes the critique a fallible
  teacher's: that column adds 0 instead of its incoming carry and is marked against that total.
  """
  a_digits, b_digits = str(a)[::-1], str(b)[::-1]
  claimed_digits = claimed[::-1]
  num_columns = max(len(a_digits), len(b_digits))
  steps, marks, carry = [], [], 0
  for i in range(max(len(str(a + b)), len(claimed_digits))):
    if i < num_columns:
      x, y = _digit(a_digits, i), _digit(b_digits, i)
      carry_in = 0 if i == forget_carry_column else carry
      total = x + y + carry_in
      step, digit, carry = f"{x}+{y}+{carry_in}={total:02d}", total % 10, total // 10
    else:  # a carry column exists only when it holds a 1
      step, digit, carry = f"carry {carry}", carry if carry else None, 0
    said = claimed_digits[i] if i < len(claimed_digits) else "_"
    marks.append(digit is not None and said == str(digit))
    steps.append(f"{step} vs {said} {'ok' if marks[-1] else 'no'}")
  verdict = ("All digits match. Conclusion: right [END]" if all(marks)
             else "A digit does not match. Conclusion: wrong [END]")
  return "From the right: " + ", ".join(steps) + ". " + verdict


def addition_solution(a: int, b: int, forget_carry_column: int | None = None) -> str:
  """An actor's worked answer to "What is a + b?": the columns from the right ("x+y+carry=TT"), then
  the sum boxed, e.g. "4+1+0=05, 5+7+0=12, 2+2+1=05. \\boxed{525}". `forget_carry_column` (counted
  from the right) adds 0 there instead of the incoming carry, so the boxed sum is wrong when that
  column receives one."""
  a_digits, b_digits = str(a)[::-1], str(b)[::-1]
  steps, digits, carry = [], [], 0
  for i in range(max(len(a_digits), len(b_digits))):
    x, y = _digit(a_digits, i), _digit(b_digits, i)
    carry_in = 0 if i == forget_carry_column else carry
    total = x + y + carry_in
    steps.append(f"{x}+{y}+{carry_in}={total:02d}")
    digits.append(str(total % 10))
    carry = total // 10
  if carry:
    digits.append(str(carry))
  return ", ".join(steps) + ". \\boxed{" + "".join(digits[::-1]) + "}"


def has_leading_carry(a: int, b: int) -> bool:
  """Whether the leftmost column of a + b receives a carry (where the actor teacher slips)."""
  return _carry_in_columns(a, b)[max(len(str(a)), len(str(b))) - 1]


# The refinement prompt of the actor demo (configs/demo_critique_grpo.py): the question, the previous
# answer and its critique; rendered with the math_cot system prompt as in the initial prompt.
REFINEMENT_USER = "{question}\n{solution}\n{critique}"


def solver_rows(records: Sequence[CritiqueRecord]) -> list[CritiqueRecord]:
  """SFT rows of a model that adds (math_cot template: question -> the correct worked answer,
  `addition_solution`), one per problem: what a model of the world knows before it is taught to
  critique (the warm starts of configs/demo_step_critic.py and configs/demo_cft_lora.py). No
  candidate solution, critique or verdict."""
  return [CritiqueRecord(question=r.question, solution=addition_solution(*_operands(r)),
                         reference_answer=r.reference_answer, source=SOURCE + "_solver",
                         id=r.id + "-solve") for r in records]


def actor_rows(records: Sequence[CritiqueRecord]) -> list[CritiqueRecord]:
  """SFT rows for the actor demo, two per problem (math_cot template: question -> solution).

  An answer row: the question and an actor teacher's worked answer that ALWAYS forgets the carry
  into the leading column (wrong on every problem with one: the persistently failed prompts). A
  refinement row: REFINEMENT_USER with that answer and its rule-based critique with the reference
  answer (`critique.rule_critique`) as the question, and the correct worked answer as the target.
  """
  rows = []
  for r in records:
    a, b = _operands(r)
    leading = max(len(str(a)), len(str(b))) - 1
    slipped, right = addition_solution(a, b, leading), addition_solution(a, b)
    feedback = rule_critique(slipped == right, str(a + b))
    rows.append(CritiqueRecord(question=r.question, solution=slipped, reference_answer=str(a + b),
                               source=SOURCE + "_actor", id=r.id + "-answer"))
    rows.append(CritiqueRecord(
        question=REFINEMENT_USER.format(question=r.question, solution=slipped, critique=feedback),
        solution=right, reference_answer=str(a + b), source=SOURCE + "_actor", id=r.id + "-refine"))
  return rows


# Solutions as steps, for the step-level critic demo (configs/demo_step_critic.py): one step per column
# from the right, its total with the incoming carry ("12"), then the boxed sum. The steps after a slip
# follow from it (carries and digits as written), so a step is wrong only where a slip is. Steps show
# totals only, so a critic must redo each column from the question.
STEP_ERROR_KINDS = ("dropped_carry", "digit_off", "wrong_box")
# The step critic demo's prompt: the question and the steps as tagged paragraphs numbered from 1.
STEP_CRITIC_TEMPLATE = {"user": "{question}\n{steps}", "assistant": "{critique}"}


def step_solution(a: int, b: int, slips: Sequence[tuple[str, int, int]] = ()
                  ) -> tuple[list[str], int]:
  """The steps of a worked answer to "What is a + b?" and its first wrong step (0-based, -1: none).

  `slips`: (kind, column, delta) triples, at most one per column and one "wrong_box". "dropped_carry":
  `column` (from the right) adds 0 instead of its incoming carry (it must receive one, as written).
  "digit_off": `column`'s total is off by `delta`. "wrong_box": the boxed sum's digit `column` (from
  the right) is off by `delta`, mod 10. Each column takes the carry of the total before it as written.
  """
  for kind, _, _ in slips:
    if kind not in STEP_ERROR_KINDS:
      raise ValueError(f"step_solution: unknown slip kind {kind!r}; use one of {STEP_ERROR_KINDS}")
  dropped = {column for kind, column, _ in slips if kind == "dropped_carry"}
  columns = _column_sums(a, b, dropped, {column: delta for kind, column, delta in slips
                                         if kind == "digit_off"})
  for column in dropped:
    if column == 0 or columns[column - 1][3] < 10:
      raise ValueError(f"step_solution: column {column} of {a} + {b} receives no carry to drop")
  digits = [total % 10 for *_, total in columns]
  if columns[-1][3] >= 10:
    digits.append(columns[-1][3] // 10)
  for kind, column, delta in slips:
    if kind == "wrong_box":
      digits[column] = (digits[column] + delta) % 10
  steps = [f"{total:02d}" for *_, total in columns]
  steps.append("\\boxed{" + (str(int("".join(map(str, digits[::-1]))))) + "}")
  wrong = [len(columns) if kind == "wrong_box" else column for kind, column, _ in slips]
  return steps, min(wrong, default=-1)


def _column_sums(a: int, b: int, forget_carry_columns: Collection[int] = (),
                 off_by: Mapping[int, int] | None = None) -> list[tuple[int, int, int, int]]:
  """(x, y, carry in, total) of each column of a + b from the right, each column taking the carry of
  the total before it; the columns in `forget_carry_columns` add 0 instead, `off_by` (column ->
  delta) adds delta to that column's total (mod 20)."""
  a_digits, b_digits = str(a)[::-1], str(b)[::-1]
  off_by = off_by or {}
  columns, carry = [], 0
  for i in range(max(len(a_digits), len(b_digits))):
    x, y = _digit(a_digits, i), _digit(b_digits, i)
    carry_in = 0 if i in forget_carry_columns else carry
    total = (x + y + carry_in + off_by.get(i, 0)) % 20
    columns.append((x, y, carry_in, total))
    carry = total // 10
  return columns


def step_critique(a: int, b: int, steps: Sequence[str], forget_carry_column: int | None = None) -> str:
  """A deliberate step-wise critique of `steps` (as step_solution writes them) ending in the first
  wrong step, DeepCritic's "**Answer**: \\boxed{k}" counted from 1 (-1: every step right).

  Step k is redone from the question and written "k: x+y+carry=TT vs STEP ok|no" for a column,
  "k: \\boxed{SUM} vs STEP ok|no" for the boxed sum, up to the first "no". `forget_carry_column`
  (from the right) makes it a fallible teacher's: that column is redone without its incoming carry.
  """
  columns = _column_sums(a, b, () if forget_carry_column is None else (forget_carry_column,))
  digits = [total % 10 for *_, total in columns] + ([1] if columns[-1][3] >= 10 else [])
  redone = [f"{x}+{y}+{c}={total:02d}" for x, y, c, total in columns]
  redone.append("\\boxed{" + str(int("".join(map(str, digits[::-1])))) + "}")
  lines, first_wrong = [], -1
  for k, (step, own) in enumerate(zip(steps, redone), start=1):
    right = step == own.rpartition("=")[2] if k <= len(columns) else step == own
    lines.append(f"{k}: {own} vs {step} {'ok' if right else 'no'}")
    if not right:
      first_wrong = k
      break
  return "\n".join(lines) + f"\n**Answer**: \\boxed{{{first_wrong}}}"


def _one_slip(a: int, b: int, rng: random.Random) -> list[tuple[str, int, int]]:
  """One slip of a STEP_ERROR_KINDS kind, drawn uniformly among those the problem allows."""
  num_columns = max(len(str(a)), len(str(b)))
  carried = [i for i in range(num_columns) if _carry_in_columns(a, b)[i]]
  kind = rng.choice([k for k in STEP_ERROR_KINDS if k != "dropped_carry" or carried])
  column = rng.choice(carried) if kind == "dropped_carry" else rng.randrange(
      len(str(a + b)) if kind == "wrong_box" else num_columns)
  return [(kind, column, rng.choice((-1, 1)))]


def _independent_slips(a: int, b: int, rng: random.Random, slip_rate: float
                       ) -> list[tuple[str, int, int]]:
  """Each step slips with probability `slip_rate`, independently: a column drops its incoming carry
  (when it receives one, as written) or is off by one, the boxed sum has a digit off by one."""
  slips = []
  for column in range(max(len(str(a)), len(str(b)))):
    if rng.random() < slip_rate:
      steps, _ = step_solution(a, b, slips)
      carried = column > 0 and int(steps[column - 1]) >= 10
      kind = rng.choice(("dropped_carry", "digit_off") if carried else ("digit_off",))
      slips.append((kind, column, rng.choice((-1, 1))))
  if rng.random() < slip_rate:
    box = step_solution(a, b, slips)[0][-1]
    slips.append(("wrong_box", rng.randrange(len(box) - len("\\boxed{}")), rng.choice((-1, 1))))
  return slips


def step_rows(records: Sequence[CritiqueRecord], seed: int, teacher_leading_carry_slip: float,
              slip_rate: float = 0.0) -> list[CritiqueRecord]:
  """Step-labelled rows (task "step") for the problems of `records`; `error_step` (the first wrong
  step) 0-based, `critique` the (possibly fallible, see step_critique) teacher's.

  slip_rate 0: half the solutions right, half with one slip (see `_one_slip`). slip_rate > 0: every
  step slips independently with that probability (see `_independent_slips`), so a solution's own
  step values are often wrong and only a critic that redoes each step finds the first wrong one.
  """
  if not 0.0 <= slip_rate < 1.0:
    raise ValueError(f"data.world.step_slip_rate must be in [0, 1), got {slip_rate}")
  rng = random.Random(f"{seed}:steps")
  teacher_rng = random.Random(f"{seed}:step_teacher")
  labels = [i % 2 == 0 for i in range(len(records))]
  rng.shuffle(labels)
  rows = []
  for r, correct in zip(records, labels):
    a, b = _operands(r)
    if slip_rate:
      slips = _independent_slips(a, b, rng, slip_rate)
    else:
      slips = [] if correct else _one_slip(a, b, rng)
    steps, error_step = step_solution(a, b, slips)
    leading = max(len(str(a)), len(str(b))) - 1
    teacher_slips = (_carry_in_columns(a, b)[leading]
                     and teacher_rng.random() < teacher_leading_carry_slip)
    rows.append(CritiqueRecord(
        question=r.question, steps=tuple(steps), error_step=error_step, label=error_step == -1,
        critique=step_critique(a, b, steps, leading if teacher_slips else None),
        reference_answer=r.reference_answer, source=SOURCE + "_step", id=r.id + "-steps", task="step"))
  return rows


def processbench_row(record: CritiqueRecord) -> dict[str, Any]:
  """A step-labelled record as a ProcessBench row (what the `processbench` eval kind reads)."""
  return {"id": record.id, "problem": record.question, "steps": list(record.steps),
          "label": record.error_step, "final_answer_correct": record.error_step == -1}


def _digit(reversed_digits: str, i: int) -> int:
  return int(reversed_digits[i]) if i < len(reversed_digits) else 0


def plausible_wrong_sum(a: int, b: int, rng: random.Random, max_sum: int | None = None
                        ) -> tuple[str, str]:
  """A wrong sum of a and b that only recomputation reveals, and the kind of slip it is.

  The result has the same number of digits as a + b, stays inside the range of possible sums of
  two such operands (and <= max_sum), and keeps the leading digit of a multi-digit sum (leading
  digits of sums are not uniform, so a slip there would show in the first digit alone).
  """
  true_sum = str(a + b)
  width_a, width_b = len(str(a)), len(str(b))
  low, high = 10 ** (width_a - 1) + 10 ** (width_b - 1), 10 ** width_a + 10 ** width_b - 2
  high = high if max_sum is None else min(high, max_sum)
  carry_in = _carry_in_columns(a, b)
  positions = list(range(max(len(true_sum) - 1, 1)))  # counted from the right
  while True:
    kind = rng.choice(ERROR_KINDS)
    digits = list(true_sum[::-1])
    if kind == "digit_off":
      pos = rng.choice(positions)
      digits[pos] = str((int(digits[pos]) + rng.choice((-1, 1))) % 10)
    elif kind == "dropped_carry":
      carried = [p for p in positions if carry_in[p]]
      if not carried:
        continue
      pos = rng.choice(carried)
      digits[pos] = str((int(digits[pos]) - 1) % 10)
    else:
      pairs = [p for p in positions[:-1] if digits[p] != digits[p + 1]]
      if not pairs:
        continue
      pos = rng.choice(pairs)
      digits[pos], digits[pos + 1] = digits[pos + 1], digits[pos]
    wrong = "".join(reversed(digits))
    if wrong != true_sum and wrong[0] != "0" and low <= int(wrong) <= high:
      return wrong, kind


def _operands(record: CritiqueRecord) -> tuple[int, int]:
  a, b = record.question[len("What is "):-1].split(" + ")
  return int(a), int(b)


def _carry_in_columns(a: int, b: int) -> list[bool]:
  """carry_in[i]: whether column i (from the right) receives a carry from column i - 1."""
  a_digits, b_digits = str(a)[::-1], str(b)[::-1]
  flags, carry = [], 0
  for i in range(max(len(a_digits), len(b_digits)) + 1):
    flags.append(bool(carry))
    carry = (_digit(a_digits, i) + _digit(b_digits, i) + carry) // 10
  return flags


def make_world(seed: int = 0, num_train: int = 4000, num_heldout: int = 500, digits: int = 3,
               carry_out: bool = False, teacher_leading_carry_slip: float = 0.0
               ) -> dict[str, list[CritiqueRecord]]:
  """Critique records for splits "train" and "heldout": disjoint problems, half right, half wrong.

  A candidate "a + b = c" can only be judged by redoing the sum: a wrong c is a plausible slip
  (see plausible_wrong_sum) and the critique (see addition_critique) redoes the addition column by
  column, each step short, fixed-length and local, before its verdict. Problems add two
  `digits`-digit numbers; no unordered pair {a, b} appears twice. Unless `carry_out`, the sum
  keeps `digits` digits too, so every example has the same layout (a tiny model then finds each
  digit at a fixed distance).

  `teacher_leading_carry_slip` makes the critiques a fallible teacher's: with that probability a
  critique forgets the carry into the leading column (wrong answers never err there, so the slip
  only ever turns right answers into "wrong" verdicts). Labels stay exact; problems and answers do
  not depend on it.
  """
  if digits < 1:
    raise ValueError(f"digits must be >= 1, got {digits}")
  if not 0.0 <= teacher_leading_carry_slip <= 1.0:
    raise ValueError(f"teacher_leading_carry_slip must be in [0, 1], got {teacher_leading_carry_slip}")
  first, last = 10 ** (digits - 1), 10 ** digits - 1
  max_sum = 2 * last if carry_out else last
  ordered_pairs = sum(max(0, min(last, max_sum - a) - first + 1) for a in range(first, last + 1))
  if num_train + num_heldout > ordered_pairs // 4:
    raise ValueError(f"num_train + num_heldout = {num_train + num_heldout} is too many for "
                     f"digits={digits}, carry_out={carry_out} (at most {ordered_pairs // 4}); raise "
                     "digits or ask for fewer")
  rng = random.Random(seed)
  seen, problems = set(), []
  while len(problems) < num_train + num_heldout:
    a, b = rng.randint(first, last), rng.randint(first, last)
    if a + b <= max_sum and (min(a, b), max(a, b)) not in seen:
      seen.add((min(a, b), max(a, b)))
      problems.append((a, b))
  splits = {"train": problems[:num_train], "heldout": problems[num_train:]}
  teacher_rng = random.Random(f"{seed}:teacher")
  return {name: _label_and_critique(pairs, name, rng, max_sum, teacher_rng,
                                    teacher_leading_carry_slip)
          for name, pairs in splits.items()}


def _label_and_critique(pairs: Sequence[tuple[int, int]], split: str, rng: random.Random,
                        max_sum: int, teacher_rng: random.Random,
                        leading_carry_slip: float) -> list[CritiqueRecord]:
  labels = [i % 2 == 0 for i in range(len(pairs))]
  rng.shuffle(labels)
  records = []
  for i, ((a, b), label) in enumerate(zip(pairs, labels)):
    claimed = str(a + b) if label else plausible_wrong_sum(a, b, rng, max_sum)[0]
    leading = max(len(str(a)), len(str(b))) - 1
    slips = _carry_in_columns(a, b)[leading] and teacher_rng.random() < leading_carry_slip
    records.append(CritiqueRecord(
        question=question_text(a, b), solution=solution_text(a, b, claimed),
        critique=addition_critique(a, b, claimed, leading if slips else None), label=label,
        reference_answer=str(a + b), source=SOURCE, id=f"{split}-{i}"))
  return records


def math_rows(records: Sequence[CritiqueRecord]) -> list[CritiqueRecord]:
  """RL rows for ordinary math GRPO: the question and its reference answer only."""
  return [CritiqueRecord(question=r.question, reference_answer=r.reference_answer,
                         source=SOURCE + "_math", id=r.id) for r in records]


def crl_rows(records: Sequence[CritiqueRecord]) -> list[CritiqueRecord]:
  """RL rows for critique RL: question, candidate solution and correctness label, no critique."""
  return [CritiqueRecord(question=r.question, solution=r.solution, label=r.label,
                         reference_answer=r.reference_answer, source=SOURCE + "_crl", id=r.id)
          for r in records]


def train_tokenizer(records: Sequence[CritiqueRecord], out_dir: str, vocab_size: int = 384,
                    step_records: Sequence[CritiqueRecord] = ()) -> str:
  """Trains a byte-pair SentencePiece model on chat renderings of `records` (and of `step_records`
  with STEP_CRITIC_TEMPLATE); writes `out_dir`.

  Digits are always single tokens; the ChatML markers are user-defined symbols. Deterministic for
  the same records. Writes tokenizer.model and tokenizer_config.json (ChatML chat_template).
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel

  corpus = [_chatml_text(get_template(name).messages(r, with_target=True))
            for r in records[:_TOKENIZER_CORPUS_SIZE] for name in _TOKENIZER_CORPUS_TEMPLATES
            if _has_target_fields(name, r)]
  step_template = get_template(STEP_CRITIC_TEMPLATE)
  corpus += [_chatml_text(step_template.messages(r, with_target=True))
             for r in step_records[:_TOKENIZER_CORPUS_SIZE]]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      split_digits=True, user_defined_symbols=list(SPECIAL_TOKENS),
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      allow_whitespace_only_pieces=True, byte_fallback=False, character_coverage=1.0,
      hard_vocab_limit=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1,
      shuffle_input_sentence=False, max_sentence_length=1 << 16, minloglevel=2)
  log.info("trained a %d-piece SentencePiece model on %d texts", spm.SentencePieceProcessor(
      model_proto=model.getvalue()).vocab_size(), len(corpus))
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  config = {
      "chat_template": CHATML_TEMPLATE,
      "bos_token": None,
      "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>",
      "unk_token": "<unk>",
      "additional_special_tokens": list(SPECIAL_TOKENS),
      "model_max_length": 512,
  }
  _write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
  return out_dir


def _has_target_fields(template_name: str, record: CritiqueRecord) -> bool:
  return template_name != "math_cot" or bool(record.solution)


def _chatml_text(messages: Sequence[dict[str, str]]) -> str:
  return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def write_world(out_dir: str, seed: int = 0, num_train: int = 4000, num_heldout: int = 500,
                digits: int = 3, carry_out: bool = False, vocab_size: int = 384,
                teacher_leading_carry_slip: float = 0.0, step_solutions: bool = False,
                step_slip_rate: float = 0.0) -> dict[str, str]:
  """Writes the world under `out_dir` and returns the paths by name.

  Files: train.jsonl, heldout.jsonl (CFT records), rl_math_{split}.jsonl, rl_crl_{split}.jsonl
  (RL rows), actor_{split}.jsonl (the actor demo's SFT rows, `actor_rows`), solver_{split}.jsonl
  (question -> correct worked answer, `solver_rows`), rl_math_{split}_carry
  .jsonl / _nocarry.jsonl (math rows with / without a carry into the leading column) in cftjax's
  JSONL schema, tokenizer/, and last world.json (these arguments; see written_world_params). Same
  arguments -> same bytes.

  With `step_solutions`, also the step critic demo's rows of the same problems (`step_rows`, the
  teacher slipping as `teacher_leading_carry_slip` says): step_{split}.jsonl (with critiques),
  rl_step_{split}.jsonl (without) and step_{split}_processbench.jsonl (ProcessBench rows,
  `processbench_row`); the tokenizer then learns their renderings too. `step_slip_rate` > 0 gives
  the training split's step solutions independent slips at that rate per step (`step_rows`); the
  held-out split keeps the standard mix (half right, one slip).
  """
  world = make_world(seed, num_train, num_heldout, digits, carry_out, teacher_leading_carry_slip)
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for split, records in world.items():
    carry = [has_leading_carry(*_operands(r)) for r in records]
    for name, rows in ((split, records), (f"rl_math_{split}", math_rows(records)),
                       (f"rl_crl_{split}", crl_rows(records)), (f"actor_{split}", actor_rows(records)),
                       (f"solver_{split}", solver_rows(records)),
                       (f"rl_math_{split}_carry", math_rows([r for r, c in zip(records, carry) if c])),
                       (f"rl_math_{split}_nocarry",
                        math_rows([r for r, c in zip(records, carry) if not c]))):
      paths[name] = os.path.join(out_dir, f"{name}.jsonl")
      _write_text(paths[name], "".join(json.dumps(r.to_dict()) + "\n" for r in rows))
  if not 0.0 <= step_slip_rate < 1.0:
    raise ValueError(f"data.world.step_slip_rate must be in [0, 1), got {step_slip_rate}")
  steps = {split: step_rows(records, seed, teacher_leading_carry_slip,
                            step_slip_rate if split == "train" else 0.0) if step_solutions else []
           for split, records in world.items()}
  for split, rows in steps.items():
    if not rows:
      continue
    for name, text in ((f"step_{split}", [r.to_dict() for r in rows]),
                       (f"rl_step_{split}", [dataclasses.replace(r, critique=None).to_dict()
                                             for r in rows]),
                       (f"step_{split}_processbench", [processbench_row(r) for r in rows])):
      paths[name] = os.path.join(out_dir, f"{name}.jsonl")
      _write_text(paths[name], "".join(json.dumps(row) + "\n" for row in text))
  paths["tokenizer"] = train_tokenizer(world["train"], os.path.join(out_dir, "tokenizer"),
                                       vocab_size, steps["train"])
  log.info("wrote synthetic world (seed=%d, digits=%d, train=%d, heldout=%d, teacher leading-carry "
           "slip %.2f, step slip rate %.2f) to %s", seed, digits, num_train, num_heldout,
           teacher_leading_carry_slip, step_slip_rate, out_dir)
  params = {"seed": seed, "num_train": num_train, "num_heldout": num_heldout, "digits": digits,
            "carry_out": carry_out, "vocab_size": vocab_size,
            "teacher_leading_carry_slip": teacher_leading_carry_slip,
            "step_solutions": step_solutions, "step_slip_rate": step_slip_rate}
  _write_text(os.path.join(out_dir, WORLD_FILE), json.dumps(params, indent=2) + "\n")
  return paths


def written_world_params(out_dir: str) -> dict | None:
  """The write_world arguments of the world in `out_dir`, or None when no finished world is there."""
  path = os.path.join(out_dir, WORLD_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_text(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def world_needed(config: Any) -> bool:
  """Whether the run reads anything from the synthetic world: data.synthetic_world is set and
  data.train_path / data.sources, data.eval_path or the tokenizer (model.tokenizer_dir, else
  model.init_from's) is not given."""
  data, model = config.data, config.model
  return bool(data.synthetic_world) and not (
      (data.train_path or data.sources) and data.eval_path and (model.tokenizer_dir or model.init_from))


def ensure_world(config: Any) -> None:
  """Writes the world of a run config (data.world, seeded by data.seed) into data.world_dir (default
  RUN_DIR/world) unless one is there, and points unset data.train_path, data.eval_path and, for a
  model without model.init_from, model.tokenizer_dir at it. Process 0 writes; every host must see
  the directory. Nothing is written when the run needs nothing from the world (`world_needed`).

  A world already in data.world_dir is used as written: data.world keys that differ from it are
  logged and set to the written values, so the run's config.json describes the data it trained on.
  """
  if not world_needed(config):
    return
  world_dir = config.data.world_dir or os.path.join(config.train.run_dir, DEFAULT_WORLD_DIR)
  if jax.process_index() == 0 and written_world_params(world_dir) is None:
    write_world(world_dir, seed=config.data.seed, **config.data.world)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic world written")
  use_world(config, world_dir)


@contextlib.contextmanager
def world_for_inspection(config: Any) -> Iterator[Any]:
  """`config` pointed at its synthetic world without writing into the run: the world already in
  data.world_dir (default RUN_DIR/world) if there is one, else the same world (same data.world
  settings and seed, so the same rows and tokenizer) written to a temporary directory that is
  deleted on exit."""
  if not world_needed(config):
    yield config
    return
  world_dir = config.data.world_dir or os.path.join(config.train.run_dir, DEFAULT_WORLD_DIR)
  if written_world_params(world_dir) is not None:
    use_world(config, world_dir)
    yield config
    return
  with tempfile.TemporaryDirectory(prefix="cftjax_world_") as scratch:
    log.info("no synthetic world in %s yet (`cftjax train` writes it there); showing the same world "
             "written to a temporary directory", world_dir)
    write_world(scratch, seed=config.data.seed, **config.data.world)
    use_world(config, scratch)
    yield config


def use_world(config: Any, world_dir: str) -> None:
  """Points config's unset data paths (and, without model.init_from, model.tokenizer_dir) at the
  world written in `world_dir`, taking the written data.world settings."""
  world = config.data.world
  written = written_world_params(world_dir)
  if written is None:
    raise FileNotFoundError(f"no synthetic world in data.world_dir={world_dir!r} on process "
                            f"{jax.process_index()}: process 0 writes it, so it must be on a "
                            "filesystem every host sees")
  differing = {key: (value, written[key]) for key, value in world.items()
               if key in written and written[key] != value}
  if differing:
    log.warning("data.world_dir=%s holds a world written with other data.world settings (asked, "
                "written: %s); using it as written. Point data.world_dir at a fresh directory for "
                "a new world", world_dir, differing)
    for key, (_, value) in differing.items():
      world[key] = value
  if written["seed"] != config.data.seed:
    log.warning("data.world_dir=%s holds a world written with seed %d; data.seed=%d only seeds the "
                "shuffle here", world_dir, written["seed"], config.data.seed)
  config.data.world_dir = world_dir
  config.data.train_path = config.data.train_path or os.path.join(world_dir, "train.jsonl")
  config.data.eval_path = config.data.eval_path or os.path.join(world_dir, "heldout.jsonl")
  if not config.model.init_from:  # a converted checkpoint brings its own tokenizer
    config.model.tokenizer_dir = config.model.tokenizer_dir or os.path.join(world_dir, "tokenizer")
