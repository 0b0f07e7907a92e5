"""Row formats as users bring them: extra fields, answer field names, system / instruction turns,
the inline Critique-Coder prompt, mixed verl files, rows a template cannot render."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cftjax.data import critique, readers
from cftjax.data.critique import CFT_INSTRUCTION
from cftjax.data.readers import DataError, load_records, parse_row
from cftjax.eval import suites
from cftjax.tokenizer import Tokenizer
from tests.pipeline_helpers import cft_iterator, rl_iterator
from tests.tokenizer_fixtures import write_qwen_dir

QUESTION = "What is 2 + 3?"
SOLUTION = "2 + 3 = 5. The answer is \\boxed{5}."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return Tokenizer.from_dir(write_qwen_dir(tmp_path_factory.mktemp("qwen")))


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
  return str(path)


def test_cftjax_rows_keep_extra_fields_as_metadata(tmp_path, caplog):
  row = {"question": QUESTION, "answer": "5", "level": "Level 1", "unique_id": "test/algebra/1.json"}
  with caplog.at_level(logging.INFO, logger="cftjax.data.readers"):
    [record] = load_records(_write_jsonl(tmp_path / "math.jsonl", [row]))
  assert record.reference_answer == "5"
  assert record.metadata == {"level": "Level 1", "unique_id": "test/algebra/1.json"}
  assert "['level', 'unique_id']" in caplog.text  # said once per file, so a typo is visible


@pytest.mark.parametrize("field", readers.ANSWER_FIELDS)
def test_math_rl_and_math_eval_read_the_same_answer_fields(field):
  record = parse_row({"question": QUESTION, field: "#### 5"}, "cftjax", "row 1")
  assert record.reference_answer == "5"
  assert suites.math_answer({"problem": QUESTION, field: "#### 5"}, "row 1") == "5"


def test_webinstruct_instruction_is_rendered_not_dropped():
  standard = {"instruction": CFT_INSTRUCTION, "input": f"Question:\n{QUESTION}\n\nSolution:\n{SOLUTION}",
              "output": "Critique:\nFine. Conclusion: right"}
  own = {**standard, "instruction": "Check the arithmetic of this solution strictly."}
  cft = critique.get_template("cft")
  user = cft.messages(parse_row(own, "webinstruct", "row 1"), with_target=True)[0]["content"]
  assert user.startswith("Check the arithmetic of this solution strictly.\n\nQuestion:\n")
  # The standard instruction renders exactly as the built-in template always did.
  standard_user = cft.messages(parse_row(standard, "webinstruct", "row 2"), with_target=True)[0]["content"]
  assert standard_user == (f"{CFT_INSTRUCTION}\n\nQuestion:\n{QUESTION}\n\nSolution:\n{SOLUTION}\n\n")


def test_system_turns_are_kept_unless_the_template_has_its_own():
  row = {"messages": [{"role": "system", "content": "You are a strict grader."},
                      {"role": "user", "content": f"Question:\n{QUESTION}\n\nSolution:\n{SOLUTION}"},
                      {"role": "assistant", "content": "Critique:\nFine. Conclusion: right"}]}
  record = parse_row(row, "oneshot_cft", "row 1")
  messages = critique.get_template("cft").messages(record, with_target=True)
  assert [m["role"] for m in messages] == ["system", "user", "assistant"]
  assert messages[0]["content"] == "You are a strict grader."
  replaced = critique.get_template({"system": "Be brief.", "user": "{question}", "assistant": "{critique}"})
  assert replaced.messages(record, with_target=True)[0]["content"] == "Be brief."


def test_inline_critique_coder_prompt_is_accepted():
  row = {"data_source": "critique_coder", "ability": "code",
         "prompt": [{"role": "user", "content": "Question: Print 5. Solution: print(5) Conclude with "
                                                "\\conclusion{T} for correct, \\conclusion{F} for wrong."}],
         "reward_model": {"ground_truth": "", "style": "rule"}, "extra_info": {"correctness": "True"}}
  record = parse_row(row, "verl", "row 1")
  assert (record.question, record.solution, record.label, record.task) == ("Print 5.", "print(5)", True, "crl")


def test_mixed_verl_parquet_routes_each_row_to_its_task(tmp_path, tokenizer):
  crl = {"data_source": "crl", "ability": "code", "prompt": [{"role": "user", "content": "q1"}],
         "reward_model": {"ground_truth": "", "style": "rule"},
         "extra_info": {"correctness": False, "question": "Print 1.", "solution": "print(2)"}}
  code = {"data_source": "taco", "ability": "code", "prompt": [{"role": "user", "content": "Print 3."}],
          "reward_model": {"ground_truth": json.dumps({"inputs": [""], "outputs": ["3\n"]}), "style": "rule"},
          "extra_info": {"index": 1}}
  math = {"data_source": "gsm8k", "ability": "math", "prompt": [{"role": "user", "content": QUESTION}],
          "reward_model": {"ground_truth": "5", "style": "rule"}, "extra_info": {"index": 2}}
  path = tmp_path / "mixed.parquet"
  pq.write_table(pa.Table.from_pylist([crl, code, math]), path)
  it = rl_iterator({"sources": [{"path": str(path), "template": {"user": "{question}"}}], "batch_size": 3,
                    "max_prompt_len": 256, "num_epochs": 1}, tokenizer)
  batch = next(it)
  assert sorted((p["record"].question, p["task"]) for p in batch) == [
      ("Print 1.", "crl"), ("Print 3.", "code"), (QUESTION, "math")]
  # A source's explicit task still wins over the rows'.
  it = rl_iterator({"sources": [{"path": str(path), "template": {"user": "{question}"}, "task": "cft"}],
                    "batch_size": 3, "max_prompt_len": 256, "num_epochs": 1}, tokenizer)
  assert {p["task"] for p in next(it)} == {"cft"}


def test_a_row_without_a_critique_honours_on_bad_row(tmp_path, tokenizer, caplog):
  rows = [{"question": QUESTION, "solution": SOLUTION, "critique": "Fine. Conclusion: right"},
          {"question": "What is 1 + 1?", "solution": "2", "id": "no-critique"}]
  path = _write_jsonl(tmp_path / "train.jsonl", rows)
  config = {"sources": [{"path": path}], "template": "cft", "max_seq_len": 256, "batch_size": 1,
            "num_epochs": 1, "packing": False}
  with pytest.raises(DataError, match="no-critique.*'critique' is None.*on_bad_row=skip"):
    list(cft_iterator(config, tokenizer))
  with caplog.at_level(logging.WARNING):
    it = cft_iterator({**config, "on_bad_row": "skip"}, tokenizer)
    batches = list(it)
  assert len(batches) == 1
  assert it.length_counts["dropped_bad_row"] == 1 and it.length_counts["kept"] == 1
  assert "no-critique" in caplog.text
