"""Tests of the prompt templates and of CFT / prompt rendering with real chat templates."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from cftjax.data.critique import CritiqueRecord, PromptTemplate, get_template, render_prompt, render_cft
from cftjax.tokenizer import Tokenizer
from tests import tokenizer_fixtures

RECORD = CritiqueRecord(
    question="What is 17 + 25?", solution="17 + 25 = 32",
    critique="7+5 is 12, so the last digit is 2 and 1 is carried; 1+2+1 = 4, giving 42, not 32.\n\n"
             "Conclusion: wrong [END]",
    label=False, reference_answer="42", id="r7")
CFT_USER = ("Please critique whether the following solution to the question is correct.\n\n"
            "Question:\nWhat is 17 + 25?\n\nSolution:\n17 + 25 = 32\n\n")


def test_cft_messages():
  template = get_template("cft")
  assert template.messages(RECORD, with_target=False) == [{"role": "user", "content": CFT_USER}]
  target = template.messages(RECORD, with_target=True)[-1]
  assert target == {"role": "assistant", "content": "Critique:\n" + RECORD.critique}
  assert target["content"].endswith("Conclusion: wrong [END]")


def test_crl_math_and_code_prompts():
  crl = get_template("crl").messages(RECORD, with_target=False)
  assert len(crl) == 1 and crl[0]["role"] == "user"
  assert crl[0]["content"].startswith(
      "You will be given a question (problem specification) and a submitted solution. Your task is "
      "to determine whether the solution is correct and fully satisfies the specification.")
  assert "Question:\nWhat is 17 + 25?\n\nSolution:\n17 + 25 = 32\n\n" in crl[0]["content"]
  assert crl[0]["content"].endswith(
      "Conclude with \\conclusion{T} for correct, \\conclusion{F} for wrong.")
  math = get_template("math_cot").messages(RECORD, with_target=True)
  assert math == [
      {"role": "system",
       "content": "Please reason step by step, and put your final answer within \\boxed{}."},
      {"role": "user", "content": "What is 17 + 25?"},
      {"role": "assistant", "content": "17 + 25 = 32"}]
  code = get_template("code").messages(RECORD, with_target=False)
  assert code[0]["content"].startswith("What is 17 + 25?\n\n") and "```python" in code[0]["content"]


def test_custom_spec():
  template = get_template({"system": "Be strict about \\boxed{{}}.",
                           "user": "Q: {question}\nA: {solution}", "assistant": "{critique}"})
  assert template.messages(RECORD, with_target=True) == [
      {"role": "system", "content": "Be strict about \\boxed{}."},
      {"role": "user", "content": "Q: What is 17 + 25?\nA: 17 + 25 = 32"},
      {"role": "assistant", "content": RECORD.critique}]
  assert get_template(template) is template
  from_config = get_template(ml_collections.ConfigDict({"user": "{question}", "system": None}))
  assert from_config.messages(RECORD, False) == [{"role": "user", "content": "What is 17 + 25?"}]
  assert get_template({"user": "{question}"}).messages(RECORD, False) == [
      {"role": "user", "content": "What is 17 + 25?"}]


@pytest.mark.parametrize("spec,expected", [
    ({"user": "{questoin} {solution}"}, "unknown placeholder(s) ['questoin'] in 'user'"),
    ({"user": "{question}", "assistant": "{critique} {answer}"}, "['answer'] in 'assistant'"),
    ({"user": "{question}", "system": "put it in \\boxed{}"}, "unknown placeholder(s) ['']"),
    ({"user": "{question", "system": None}, "bad format string in 'user'"),
    ({"user": "{question}", "prompt": "x"}, "unknown key(s) ['prompt']"),
    ({"system": "s"}, "'user' is required"),
    ({"user": 3}, "'user' must be a string"),
    ("cfft", "unknown template 'cfft'"),
    (7, "must be a name or a dict"),
])
def test_bad_specs_are_rejected(spec, expected):
  with pytest.raises(ValueError) as e:
    get_template(spec)
  assert expected in str(e.value)


def test_missing_target_or_field():
  with pytest.raises(ValueError, match="record 'q1': field 'critique' is None"):
    get_template("cft").messages(CritiqueRecord(question="x", id="q1"), with_target=True)
  with pytest.raises(ValueError, match="no assistant turn"):
    PromptTemplate("p", user="{question}").messages(RECORD, with_target=True)


def test_step_critique_numbers_the_steps_from_one():
  record = CritiqueRecord(question="What is 2 + 3 * 4?", steps=("3 * 4 = 12.", "2 + 12 = 15."),
                          critique="Paragraph 2 adds wrongly.\n\n**Answer**: \\boxed{2}", id="s1")
  user, assistant = get_template("step_critique").messages(record, with_target=True)
  assert ("[Math Problem]\n\nWhat is 2 + 3 * 4?\n\n[Solution]\n\n<paragraph_1>\n3 * 4 = 12.\n"
          "</paragraph_1>\n\n<paragraph_2>\n2 + 12 = 15.\n</paragraph_2>\n\n") in user["content"]
  assert user["content"].endswith('"**Answer**: \\boxed{k}", where k is the number of that '
                                  "paragraph (or -1).")
  assert assistant == {"role": "assistant", "content": record.critique}
  with pytest.raises(ValueError, match="record 's2': field 'steps' is None"):
    get_template("step_critique").messages(CritiqueRecord(question="q", id="s2"), with_target=False)
  verbatim = get_template("verbatim").messages(record, with_target=True)
  assert [m["content"] for m in verbatim] == [record.question, record.critique]


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  return {
      "default_system": tokenizer_fixtures.write_qwen_dir(root / "qwen"),
      "generation_tags": tokenizer_fixtures.write_qwen_dir(
          root / "qwen_tags", chat_template=tokenizer_fixtures.QWEN_GENERATION_TAG_TEMPLATE),
      "llama3": tokenizer_fixtures.write_llama3_dir(root / "llama3"),
  }


def test_render_cft_matches_transformers_assistant_mask(qwen_dirs):
  transformers = pytest.importorskip("transformers")
  path = qwen_dirs["generation_tags"]
  ids, mask = render_cft(RECORD, "cft", Tokenizer.from_dir(path))
  reference = transformers.AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
      get_template("cft").messages(RECORD, with_target=True), tokenize=True, return_dict=True,
      return_assistant_tokens_mask=True)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.tolist() == list(reference["input_ids"])
  assert mask.tolist() == list(reference["assistant_masks"])


def test_render_prompt_matches_transformers_and_prefixes_the_cft_ids(qwen_dirs):
  transformers = pytest.importorskip("transformers")
  path = qwen_dirs["default_system"]
  tok = Tokenizer.from_dir(path)
  for name in ("cft", "crl", "math_cot"):
    prompt = render_prompt(RECORD, name, tok)
    reference = transformers.AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
        get_template(name).messages(RECORD, with_target=False), add_generation_prompt=True,
        tokenize=True, return_dict=False)
    assert prompt.tolist() == list(reference), name
    ids, mask = render_cft(RECORD, name, tok)
    assert ids[:len(prompt)].tolist() == prompt.tolist() and not mask[:len(prompt)].any()
  ids, mask = render_cft(RECORD, "cft", tok)
  assert tok.decode(ids[mask == 1]) == "Critique:\n" + RECORD.critique + "<|im_end|>"
  assert tok.decode(ids[:len(prompt)]).startswith("<|im_start|>system\nYou are Qwen")


def test_render_cft_llama3_trains_on_critique_and_eot(qwen_dirs):
  tok = Tokenizer.from_dir(qwen_dirs["llama3"])
  ids, mask = render_cft(RECORD, "cft", tok)
  assert tok.decode(ids[mask == 1]) == "Critique:\n" + RECORD.critique + "<|eot_id|>"
  prompt = render_prompt(RECORD, "cft", tok)
  assert tok.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert ids[:len(prompt)].tolist() == prompt.tolist()
