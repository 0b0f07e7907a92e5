"""Tests of the critique-data readers on rows shaped like the published datasets, and on bad input."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cftjax.data import readers
from cftjax.data.readers import DataError, detect_format, load_records, parse_row, read_rows
from cftjax.data.critique import CritiqueRecord, get_template

CFT_INSTRUCTION = "Please critique whether the following solution to the question is correct.\n\n"
QUESTION = "Find the sum of the roots of $x^2 - 5x + 6 = 0$."
SOLUTION = "By Vieta's formulas the sum is $-(-5)/1 = 5$.\nThe answer is $\\boxed{5}$."
WRONG_CRITIQUE = ("The solution applies Vieta's formulas, but misreads the sign.\n\n"
                  "1. The sum of roots is $-b/a = 5$... wait, $b = -5$ gives $5$; the text then "
                  "states $-5$ in its last line.\n\nConclusion: wrong [END]")
RIGHT_CRITIQUE = ("The roots are 2 and 3, whose sum is 5, as the solution says.\n\n"
                  "Conclusion: right [END]")

# WebInstruct-CFT (TIGER-Lab/WebInstruct-CFT): Alpaca instruction / input / output.
WEBINSTRUCT_ROW = {
    "instruction": CFT_INSTRUCTION,
    "input": f"Question:\n{QUESTION}\n\nSolution:\n{SOLUTION}",
    "output": f"Critique:\n{WRONG_CRITIQUE}",
}
# One-shot CFT: chat messages (user = the CFT prompt, assistant = the critique).
ONESHOT_ROW = {
    "messages": [
        {"role": "user", "content": f"{CFT_INSTRUCTION}Question:\n{QUESTION}\n\nSolution:\n"
                                    f"{SOLUTION}\n\n"},
        {"role": "assistant", "content": f"Critique:\n{RIGHT_CRITIQUE}"},
    ],
}
CRL_PROMPT = (
    "You will be given a question (problem specification) and a submitted solution. Your task is to "
    "determine whether the solution is correct and fully satisfies the specification.\n\n"
    "Question:\nRead n and print n squared.\n\nSolution:\n```python\nn = int(input())\nprint(n * n)"
    "\n```\n\nConclude with \\conclusion{T} for correct, \\conclusion{F} for wrong.")
# verl parquet rows (Critique-Coder CRL row, PRIME-style code row, verl gsm8k math row).
VERL_CRL_ROW = {
    "data_source": "rstar_critique",
    "prompt": [{"role": "user", "content": CRL_PROMPT}],
    "ability": "code",
    "reward_model": {"ground_truth": "", "style": "rule"},
    "extra_info": {"correctness": True, "index": 17, "question": "Read n and print n squared.",
                   "solution": "```python\nn = int(input())\nprint(n * n)\n```"},
}
VERL_CODE_ROW = {
    "data_source": "taco",
    "prompt": [{"role": "system", "content": "You are a helpful programmer."},
               {"role": "user", "content": "Read two integers and print their sum."}],
    "ability": "code",
    "reward_model": {"ground_truth": "", "style": "rule"},
    "extra_info": {"index": 4, "inputs_outputs": json.dumps({"inputs": ["1 2\n", "5 7\n"],
                                                             "outputs": ["3\n", "12\n"]})},
}
VERL_MATH_ROW = {
    "data_source": "openai/gsm8k",
    "prompt": [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. "
                                           "How many in total? Let's think step by step and output "
                                           "the final answer after \"####\"."}],
    "ability": "math",
    "reward_model": {"ground_truth": "72", "style": "rule"},
    "extra_info": {"split": "train", "index": 0, "answer": "48/2 = 24\n48+24 = 72\n#### 72",
                   "question": "Natalia sold 48 clips in April and half as many in May. How many "
                               "in total?"},
}
# ProcessBench (Qwen/ProcessBench): earliest wrong step, -1 if none.
PROCESSBENCH_ROW = {
    "id": "gsm8k-3",
    "generator": "Qwen2-7B-Instruct",
    "problem": "Tom has 3 apples and buys 4 more. How many does he have?",
    "steps": ["Tom starts with 3 apples.", "He buys 4 more, so 3 + 4 = 8.", "The answer is 8."],
    "final_answer_correct": False,
    "label": 1,
}


def _write_jsonl(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
  return str(path)


# ----------------------------------------------------------------------------- each format


def test_webinstruct_row():
  record = parse_row(WEBINSTRUCT_ROW, "webinstruct", "cft.jsonl line 1")
  assert (record.question, record.solution) == (QUESTION, SOLUTION)
  assert record.critique == WRONG_CRITIQUE and record.label is False
  assert record.source == "webinstruct" and record.id == "cft.jsonl line 1"
  # The CFT template gives back the dataset's target text exactly.
  messages = get_template("cft").messages(record, with_target=True)
  assert messages[-1] == {"role": "assistant", "content": WEBINSTRUCT_ROW["output"]}


def test_webinstruct_row_with_single_newlines_and_right_verdict():
  row = {"instruction": CFT_INSTRUCTION, "input": f"Question:\n{QUESTION}\nSolution:\n{SOLUTION}\n",
         "output": f"Critique:\n{RIGHT_CRITIQUE}"}
  record = parse_row(row, "webinstruct", "w", source="mix_a")
  assert (record.question, record.solution, record.label) == (QUESTION, SOLUTION, True)
  assert record.source == "mix_a"


def test_oneshot_cft_row_round_trips_through_the_cft_template():
  record = parse_row(ONESHOT_ROW, "oneshot_cft", "oneshot.jsonl line 9")
  assert (record.question, record.solution, record.label) == (QUESTION, SOLUTION, True)
  assert get_template("cft").messages(record, with_target=True) == ONESHOT_ROW["messages"]


def test_verl_crl_row():
  record = parse_row(VERL_CRL_ROW, "verl", "crl.parquet row 0")
  assert record.label is True and record.question == "Read n and print n squared."
  assert record.solution.startswith("```python") and record.source == "rstar_critique"
  assert record.id == "rstar_critique-17" and record.critique is None


def test_verl_crl_row_without_question_fields_reads_them_from_the_prompt():
  row = {**VERL_CRL_ROW, "extra_info": {"correctness": "False"}}
  record = parse_row(row, "verl", "w")
  assert record.label is False
  assert record.question == "Read n and print n squared."
  assert record.solution == "```python\nn = int(input())\nprint(n * n)\n```"


def test_verl_code_and_math_rows():
  code = parse_row(VERL_CODE_ROW, "verl", "w")
  assert code.tests == {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}
  assert code.question == "Read two integers and print their sum." and code.label is None
  io_tests = {"inputs": ["2\n"], "outputs": ["4\n"]}
  in_ground_truth = {**VERL_CODE_ROW, "extra_info": {"index": 5},
                     "reward_model": {"ground_truth": json.dumps(io_tests), "style": "rule"}}
  assert parse_row(in_ground_truth, "verl", "w").tests == io_tests
  asserts = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
  as_test_cases = {**VERL_CODE_ROW, "extra_info": {"test_cases": asserts}}
  assert parse_row(as_test_cases, "verl", "w").tests == asserts
  math = parse_row(VERL_MATH_ROW, "verl", "w")
  assert math.reference_answer == "72" and math.tests is None and math.label is None
  assert math.question == VERL_MATH_ROW["extra_info"]["question"]
  assert math.id == "openai/gsm8k-0"


def test_processbench_row():
  record = parse_row(PROCESSBENCH_ROW, "processbench", "w")
  assert record.error_step == 1 and record.label is False
  assert record.steps == tuple(PROCESSBENCH_ROW["steps"]) and record.id == "gsm8k-3"
  assert record.solution == "\n\n".join(PROCESSBENCH_ROW["steps"])
  correct = parse_row({**PROCESSBENCH_ROW, "label": -1, "final_answer_correct": True},
                      "processbench", "w")
  assert correct.error_step == -1 and correct.label is True


# PRM800K (phase 2): one pre-generated completion per step, rated by the labeller; labelling stops
# at the first step rated -1, whose chosen_completion is null.
PRM800K_ROW = {
    "labeler": "340d89bc", "timestamp": "2022-08-05T17:00:29", "generation": 9,
    "is_quality_control_question": False, "is_initial_screening_question": False,
    "question": {"problem": "What is 2 + 3 * 4?", "ground_truth_answer": "14",
                 "ground_truth_solution": "3 * 4 = 12 and 2 + 12 = 14.",
                 "pre_generated_steps": ["3 * 4 = 12.", "2 + 12 = 15.", "# Answer\n\n15"]},
    "label": {"steps": [
        {"completions": [{"text": "3 * 4 = 12.", "rating": 1, "flagged": None}],
         "human_completion": None, "chosen_completion": 0},
        {"completions": [{"text": "2 + 12 = 15.", "rating": -1, "flagged": None}],
         "human_completion": None, "chosen_completion": None},
    ], "total_time": 41230, "finish_reason": "found_error"},
}
PRM800K_CORRECT_STEPS = [
    {"completions": [{"text": "3 * 4 = 12.", "rating": 1, "flagged": None}], "chosen_completion": 0},
    # Phase 1: several alternatives rated; the labeller continued with the second.
    {"completions": [{"text": "2 + 12 = 15.", "rating": -1, "flagged": None},
                     {"text": "2 + 12 = 14.", "rating": 1, "flagged": None}], "chosen_completion": 1},
    {"completions": [{"text": "# Answer\n\n14", "rating": 0, "flagged": None}], "chosen_completion": 0},
]


def test_prm800k_row_first_step_rated_minus_one_is_the_label():
  record = parse_row(PRM800K_ROW, "prm800k", "w")
  assert record.steps == ("3 * 4 = 12.", "2 + 12 = 15.") and record.error_step == 1
  assert record.label is False and record.task == "step" and record.reference_answer == "14"
  assert record.question == "What is 2 + 3 * 4?" and record.source == "prm800k"
  assert record.metadata["labeler"] == "340d89bc"
  correct = parse_row({**PRM800K_ROW, "label": {"steps": PRM800K_CORRECT_STEPS,
                                                "finish_reason": "solution"}}, "prm800k", "w")
  assert correct.steps == ("3 * 4 = 12.", "2 + 12 = 14.", "# Answer\n\n14")
  assert correct.error_step == -1 and correct.label is True


@pytest.mark.parametrize("label, message, reason", [
    ({"steps": PRM800K_CORRECT_STEPS, "finish_reason": "give_up"},
     "'label.finish_reason' is 'give_up', not 'solution'", "unlabelled"),
    ({"steps": [{"completions": [{"text": "a", "rating": 1}, {"text": "b", "rating": 0}],
                 "chosen_completion": None}], "finish_reason": "solution"},
     "'label.steps[0].chosen_completion' is null and the step has 2 completions", "bad_value"),
    ({"steps": [{"completions": [{"text": "a", "rating": 1}], "chosen_completion": 3}],
      "finish_reason": "solution"}, "'label.steps[0].chosen_completion' = 3", "bad_value"),
    ({"steps": [{"completions": [{"text": "a", "rating": 2}], "chosen_completion": 0}],
      "finish_reason": "solution"}, "rating' = 2 must be -1, 0, 1", "bad_value"),
    ({"steps": [], "finish_reason": "solution"}, "'label.steps' is empty", "empty_field"),
])
def test_prm800k_bad_rows(label, message, reason):
  with pytest.raises(DataError, match=re.escape(message)) as e:
    parse_row({**PRM800K_ROW, "label": label}, "prm800k", "f.jsonl line 4")
  assert "f.jsonl line 4" in str(e.value) and e.value.reason == reason


MATHCHECK_PROCESS_ROW = {
    "task_type": "process_judging",
    "question": "A pen costs $2 and a book $5. What do 2 pens and 1 book cost?",
    "solution": "Step 1: Two pens cost 2 * 2 = 4 dollars.\nStep 2: With the book, 4 + 5 = 10 dollars.\n"
                "Step 3: The answer is 10.",
    "answer": "Step 2",
}


def test_mathcheck_rows():
  record = parse_row(MATHCHECK_PROCESS_ROW, "mathcheck", "w")
  assert record.steps == ("Step 1: Two pens cost 2 * 2 = 4 dollars.",
                          "Step 2: With the book, 4 + 5 = 10 dollars.", "Step 3: The answer is 10.")
  assert record.error_step == 1 and record.label is False and record.task == "step"
  paragraphs = parse_row({**MATHCHECK_PROCESS_ROW, "solution": "a\n\nb\n \nc", "answer": "Step 3"},
                         "mathcheck", "w")
  assert paragraphs.steps == ("a", "b", "c") and paragraphs.error_step == 2
  outcome = parse_row({**MATHCHECK_PROCESS_ROW, "task_type": "outcome_judging", "answer": "Correct"},
                      "mathcheck", "w")
  assert outcome.label is True and outcome.task == "crl" and outcome.error_step is None
  assert parse_row({**MATHCHECK_PROCESS_ROW, "task_type": "outcome_judging", "answer": "Incorrect"},
                   "mathcheck", "w").label is False


@pytest.mark.parametrize("change, message, reason", [
    ({"answer": "Step 4"}, "'answer' = 'Step 4' names no step of the solution \\(it has 3\\)", "bad_value"),
    ({"answer": "Step 0"}, "names no step", "bad_value"),
    ({"answer": "Correct"}, "must be 'Step k'", "bad_value"),
    ({"task_type": "outcome_judging", "answer": "Maybe"}, "must be 'Correct' or 'Incorrect'", "bad_value"),
    ({"task_type": "answerable_judging", "answer": "Answerable"}, "only process_judging and",
     "other_task"),
    ({"task_type": "solving", "answer": "9"}, "only process_judging and", "other_task"),
])
def test_mathcheck_bad_rows(change, message, reason):
  with pytest.raises(DataError, match=message) as e:
    parse_row({**MATHCHECK_PROCESS_ROW, **change}, "mathcheck", "w")
  assert e.value.reason == reason


DEEPCRITIC_ROW = {"messages": [
    {"role": "user", "content": "The following is a math problem and a solution (split into paragraphs, "
                                "indexed from 1):\n\n[Math Problem]\n\nWhat is 2 + 3 * 4?\n\n[Solution]\n\n"
                                "<paragraph_1>\n3 * 4 = 12.\n</paragraph_1>\n\n<paragraph_2>\n2 + 12 = 15.\n"
                                "</paragraph_2>"},
    {"role": "assistant", "content": "### Paragraph 1\n3 * 4 = 12 is right.\n\n### Paragraph 2\n"
                                     "2 + 12 is 14, not 15.\n\n**Answer**: \\boxed{2}"}]}


def test_deepcritic_row():
  record = parse_row(DEEPCRITIC_ROW, "deepcritic", "w")
  assert record.error_step == 1 and record.label is False and record.task == "step"
  assert record.question == DEEPCRITIC_ROW["messages"][0]["content"]
  assert record.critique == DEEPCRITIC_ROW["messages"][1]["content"] and record.solution == ""
  messages = [{"role": "system", "content": "You are a math teacher."}, *DEEPCRITIC_ROW["messages"][:1],
              {"role": "assistant", "content": "All steps hold.\n\n**Answer**: \\boxed{-1}"}]
  correct = parse_row({"messages": messages}, "deepcritic", "w")
  assert correct.error_step == -1 and correct.label is True and correct.system == "You are a math teacher."
  for answer in ("no verdict", "**Answer**: \\boxed{0}"):
    bad = {"messages": [*DEEPCRITIC_ROW["messages"][:1], {"role": "assistant", "content": answer}]}
    with pytest.raises(DataError, match="no final .boxed.k. .k >= 1 or -1.") as e:
      parse_row(bad, "deepcritic", "w")
    assert e.value.reason == "no_step_verdict"


def test_named_only_formats_are_not_detected_but_load_when_named(tmp_path):
  assert detect_format(DEEPCRITIC_ROW) == "oneshot_cft"   # same fields: read only when named
  path = _write_jsonl(tmp_path / "prm.jsonl", [PRM800K_ROW, {**PRM800K_ROW, "label": {
      "steps": PRM800K_CORRECT_STEPS, "finish_reason": "give_up"}}])
  loaded = load_records(path, "prm800k", on_bad_row="skip")
  assert [r.error_step for r in loaded] == [1] and loaded.skipped == {"unlabelled": 1}


def test_cftjax_rows_round_trip(tmp_path):
  records = [
      CritiqueRecord(question="q1", solution="s", critique="c Conclusion: right [END]", label=True,
                     source="a", id="1"),
      CritiqueRecord(question="q2", steps=("x", "y"), error_step=0, reference_answer="4",
                     tests={"inputs": ["1"], "outputs": ["2"]}, id="2"),
  ]
  path = _write_jsonl(tmp_path / "r.jsonl", [r.to_dict() for r in records])
  loaded = load_records(path)
  assert [r.source for r in loaded] == ["a", "cftjax"]
  assert list(loaded) == [records[0], dataclasses.replace(records[1], source="cftjax")]


@pytest.mark.parametrize("row,fmt", [
    (WEBINSTRUCT_ROW, "webinstruct"), (ONESHOT_ROW, "oneshot_cft"), (VERL_CRL_ROW, "verl"),
    (VERL_MATH_ROW, "verl"), (PROCESSBENCH_ROW, "processbench"),
    (CritiqueRecord(question="q").to_dict(), "cftjax")])
def test_detect_format(row, fmt):
  assert detect_format(row) == fmt


def test_detect_format_error_lists_known_formats():
  with pytest.raises(DataError, match="known formats") as e:
    detect_format({"text": "hello"}, "x.jsonl line 2")
  assert "x.jsonl line 2" in str(e.value)
  for fmt in readers.KNOWN_FORMATS:
    assert fmt in str(e.value)


# ----------------------------------------------------------------------------- files


def test_jsonl_json_and_parquet_read_the_same_rows(tmp_path):
  rows = [VERL_CRL_ROW, {**VERL_CRL_ROW, "extra_info": {**VERL_CRL_ROW["extra_info"],
                                                         "correctness": False, "index": 18}}] * 3
  jsonl = _write_jsonl(tmp_path / "d.jsonl", rows)
  json_path = tmp_path / "d.json"
  json_path.write_text(json.dumps(rows))
  parquet = str(tmp_path / "d.parquet")
  pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=4)
  assert pq.ParquetFile(parquet).num_row_groups == 2
  by_kind = {p: load_records(p) for p in (jsonl, str(json_path), parquet)}
  first = list(by_kind[jsonl])
  assert [r.label for r in first] == [True, False] * 3
  for path, records in by_kind.items():
    assert records == first
    assert records.skipped == {}
  wheres = [where for where, _ in read_rows(parquet)]
  assert wheres == [f"{parquet} row {i}" for i in range(6)]
  assert [where for where, _ in read_rows(jsonl)][2] == f"{jsonl} line 3"


def test_unsupported_and_missing_files(tmp_path):
  (tmp_path / "d.csv").write_text("a,b\n")
  with pytest.raises(DataError, match="unsupported file type"):
    load_records(str(tmp_path / "d.csv"))
  with pytest.raises(DataError, match="no such file"):
    load_records(str(tmp_path / "nope.jsonl"))
  (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
    load_records(str(tmp_path / "bad.parquet"))
  (tmp_path / "obj.json").write_text(json.dumps({"rows": []}))
  with pytest.raises(DataError, match="must hold a list"):
    load_records(str(tmp_path / "obj.json"))


# ----------------------------------------------------------------------------- bad input

_GOOD = WEBINSTRUCT_ROW
BAD_LINES = {
    # reason: (line content, text the error must contain besides the file and line)
    "malformed_json": (b'{"instruction": "x", "input": \n', "malformed JSON"),
    "not_utf8": (b'{"instruction": "\xff\xfe"}\n', "not valid UTF-8"),
    "missing_field": ({k: v for k, v in _GOOD.items() if k != "output"}, "'output'"),
    "wrong_type": ({**_GOOD, "output": 17}, "'output' must be str, got int"),
    "empty_critique": ({**_GOOD, "output": "Critique:\n  \n"}, "'output': the critique is empty"),
    "not_an_object": (b"[1, 2]\n", "must be a JSON object"),
    "bad_value": ({**_GOOD, "input": "no sections here"}, "'input' has no 'Question:"),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_row_raises_naming_file_line_and_field(tmp_path, reason):
  line, expected = BAD_LINES[reason]
  path = _write_jsonl(tmp_path / "data.jsonl", [_GOOD, line, _GOOD])
  with pytest.raises(DataError) as e:
    load_records(path, fmt="webinstruct", on_bad_row="error")
  assert f"{path} line 2" in str(e.value) and expected in str(e.value)
  assert e.value.reason == reason and isinstance(e.value, ValueError)


def test_bad_rows_are_skipped_counted_and_logged(tmp_path, caplog):
  lines = [_GOOD] + [line for line, _ in BAD_LINES.values()] + [_GOOD, BAD_LINES["not_utf8"][0]]
  path = _write_jsonl(tmp_path / "data.jsonl", lines)
  with caplog.at_level(logging.WARNING, logger="cftjax.data.readers"):
    records = load_records(path, on_bad_row="skip")
  assert len(records) == 2 and all(r.label is False for r in records)
  assert records.skipped == {**{reason: 1 for reason in BAD_LINES}, "not_utf8": 2}
  assert "skipped 8 bad row(s)" in caplog.text and path in caplog.text


def test_bad_parquet_row_names_row_and_field(tmp_path):
  rows = [VERL_MATH_ROW, {**VERL_MATH_ROW, "reward_model": {"ground_truth": None, "style": "rule"}}]
  path = str(tmp_path / "m.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  with pytest.raises(DataError, match=r"m\.parquet row 1: field 'reward_model.ground_truth'"):
    load_records(path)
  assert len(load_records(path, on_bad_row="skip")) == 1


@pytest.mark.parametrize("row,fmt,expected", [
    ({**ONESHOT_ROW, "messages": ONESHOT_ROW["messages"][:1]}, "oneshot_cft", "user then an assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, "oneshot_cft", "'messages[0].content' must be str"),
    ({**VERL_CRL_ROW, "extra_info": {"correctness": "maybe"}}, "verl", "extra_info.correctness"),
    ({**VERL_CODE_ROW, "extra_info": {"inputs_outputs": "{not json"}}, "verl",
     "extra_info.inputs_outputs' is not valid JSON"),
    ({**VERL_CRL_ROW, "extra_info": {"correctness": True}, "prompt": [
        {"role": "user", "content": "just a question"}]}, "verl", "no extra_info.solution"),
    ({**PROCESSBENCH_ROW, "label": 3}, "processbench", "'label' = 3 must be -1 or a step index"),
    ({**PROCESSBENCH_ROW, "steps": ["a", 2]}, "processbench", "'steps[1]' must be str"),
    ({"question": "q", "critique": ""}, "cftjax", "the critique is empty"),
    ({"question": "q", "label": "yes"}, "cftjax", "'label' must be bool"),
    (WEBINSTRUCT_ROW, "alpaca", "unknown format 'alpaca'"),
])
def test_parse_row_errors(row, fmt, expected):
  with pytest.raises(DataError, match="f.jsonl line 4") as e:
    parse_row(row, fmt, "f.jsonl line 4")
  assert expected in str(e.value)


def test_no_usable_rows_is_an_error_in_both_modes(tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", [b"{oops\n", {**_GOOD, "output": ""}])
  with pytest.raises(DataError, match="no usable rows"):
    load_records(path, on_bad_row="skip")
  with pytest.raises(DataError, match="line 1: malformed JSON"):
    load_records(path, on_bad_row="error")
  empty = _write_jsonl(tmp_path / "empty.jsonl", [b"\n"])
  with pytest.raises(DataError, match="no usable rows"):
    load_records(empty)
  with pytest.raises(ValueError, match="on_bad_row"):
    load_records(path, on_bad_row="ignore")
