"""Tests for cftjax.tokenizer against transformers (test-only reference) and SentencePiece itself."""

from __future__ import annotations

import datetime
import json
import shutil

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoTokenizer

from cftjax.tokenizer import Tokenizer
from tests import tokenizer_fixtures as fx

SYSTEM = {"role": "system", "content": "You grade solutions. Be terse."}
TURN1 = [{"role": "user", "content": "What is 12 * 7 + 16? café 数学"},
         {"role": "assistant", "content": " The product is 84, plus 16 is 100. Conclusion: right. "}]
TURN2 = [{"role": "user", "content": "And def add(a, b)?\n"},
         {"role": "assistant", "content": "It returns a + b 🙂\n\nprint(add(2, 3))  # 5"}]
CONVERSATIONS = {
  "single_turn": TURN1,
  "single_turn_system": [SYSTEM, *TURN1],
  "multi_turn": TURN1 + TURN2,
  "multi_turn_system": [SYSTEM, *TURN1, *TURN2],
  "prompt_only": [SYSTEM, TURN1[0]],
}
TEXTS = ["", "hello world", " leading space", "two\n\nlines  and  spaces\t", "Zürich 数学 🙂",
         "<|im_start|>user\nhi<|im_end|>\n", "x<|eot_id|>y <|begin_of_text|>"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return {"qwen": fx.write_qwen_dir(root / "qwen"), "llama3": fx.write_llama3_dir(root / "llama3"),
          "sp": fx.write_sentencepiece_chatml_dir(root / "sp")}


def _pair(dirs, name):
  return Tokenizer.from_dir(dirs[name]), AutoTokenizer.from_pretrained(str(dirs[name]))


def _masked_runs(tok, ids, mask):
  """The text of each maximal run of masked tokens, decoded in context (SentencePiece strips a leading
  space from a text that is decoded on its own)."""
  starts = [i for i in range(len(ids)) if mask[i] and (i == 0 or not mask[i - 1])]
  ends = [i + 1 for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
  return [tok.decode(ids[:end])[len(tok.decode(ids[:start])):] for start, end in zip(starts, ends)]


@pytest.mark.parametrize("name", ["qwen", "llama3"])
def test_chat_template_token_exact_with_transformers(dirs, name):
  ours, ref = _pair(dirs, name)
  for conversation in CONVERSATIONS.values():
    for add_generation_prompt in (False, True):
      kwargs = {"add_generation_prompt": add_generation_prompt}
      text = ours.apply_chat_template(conversation, tokenize=False, **kwargs)
      assert text == ref.apply_chat_template(conversation, tokenize=False, **kwargs)
      assert ours.apply_chat_template(conversation, **kwargs) == ref.apply_chat_template(
        conversation, return_dict=False, **kwargs)


def test_chat_format_is_chatml_with_qwen_default_system(dirs):
  ours = Tokenizer.from_dir(dirs["qwen"])
  text = ours.apply_chat_template(TURN1[:1], add_generation_prompt=True, tokenize=False)
  assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                  "assistant.<|im_end|>\n<|im_start|>user\n" + TURN1[0]["content"] +
                  "<|im_end|>\n<|im_start|>assistant\n")
  ids = ours.apply_chat_template(TURN1[:1])
  assert ids[0] == ours.token_to_id("<|im_start|>") and ids.count(ours.token_to_id("<|im_end|>")) == 2


def test_tools_reach_the_template_with_transformers_tojson(dirs):
  ours, ref = _pair(dirs, "qwen")
  tools = [{"type": "function", "function": {"name": "grade", "description": "Note la réponse <b>",
                                             "parameters": {"type": "object", "properties": {}}}}]
  text = ours.apply_chat_template(TURN1, tokenize=False, tools=tools)
  assert text == ref.apply_chat_template(TURN1, tools=tools, tokenize=False)
  assert json.dumps(tools[0], ensure_ascii=False) in text
  assert ours.apply_chat_template(TURN1, tools=tools) == ref.apply_chat_template(TURN1, tools=tools,
                                                                                 return_dict=False)


@pytest.mark.parametrize("name", ["qwen", "llama3"])
def test_encode_decode_and_ids_match_transformers(dirs, name):
  ours, ref = _pair(dirs, name)
  for text in TEXTS:
    for add_special_tokens in (False, True):
      expected = ref.encode(text, add_special_tokens=add_special_tokens)
      assert ours.encode(text, add_special_tokens) == expected
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
  assert ours.vocab_size == len(ref)
  assert (ours.bos_id, ours.pad_id) == (ref.bos_token_id, ref.pad_token_id or ref.eos_token_id)
  assert ours.eos_id == ref.eos_token_id


def test_special_ids_from_configs(dirs):
  qwen = Tokenizer.from_dir(dirs["qwen"])
  im_end, endoftext = qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")
  assert (qwen.bos_id, qwen.eos_id, qwen.pad_id) == (None, im_end, endoftext)
  assert qwen.eos_ids == [im_end, endoftext]
  llama = Tokenizer.from_dir(dirs["llama3"])
  ids = {s: llama.token_to_id(s) for s in fx.LLAMA3_SPECIALS}
  assert llama.bos_id == ids["<|begin_of_text|>"]
  assert llama.eos_ids == [ids["<|eot_id|>"], ids["<|end_of_text|>"], ids["<|eom_id|>"]]
  assert llama.pad_id == llama.eos_id == ids["<|eot_id|>"]  # no pad token: falls back to eos
  # Llama 3's post-processor adds bos; add_bos_token in tokenizer_config.json overrides it.
  assert llama.encode("hi", add_special_tokens=True) == [llama.bos_id] + llama.encode("hi")
  with pytest.raises(KeyError, match="<nope>"):
    llama.token_to_id("<nope>")


def test_special_tokens_map_fills_gaps_in_tokenizer_config(dirs, tmp_path):
  shutil.copytree(dirs["qwen"], tmp_path, dirs_exist_ok=True)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  del config["pad_token"]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps(
    {"eos_token": "<|endoftext|>", "pad_token": {"content": "<|im_start|>", "lstrip": False}}))
  tok = Tokenizer.from_dir(tmp_path)
  assert tok.eos_id == tok.token_to_id("<|im_end|>")  # tokenizer_config.json wins
  assert tok.pad_id == tok.token_to_id("<|im_start|>")


def test_add_bos_token_and_int_eos_from_configs(dirs, tmp_path):
  shutil.copytree(dirs["llama3"], tmp_path, dirs_exist_ok=True)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
  tok = Tokenizer.from_dir(tmp_path)
  assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")
  assert tok.eos_ids == [tok.token_to_id("<|eot_id|>"), 7]


@pytest.mark.parametrize("name", ["qwen", "llama3", "sp"])
def test_assistant_mask_covers_exactly_contents_and_end_token(dirs, name):
  tok = Tokenizer.from_dir(dirs[name])
  end = "<|eot_id|>" if name == "llama3" else "<|im_end|>"
  for conversation in CONVERSATIONS.values():
    ids, mask = tok.encode_chat_with_mask(conversation)
    assert ids == tok.apply_chat_template(conversation)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    contents = [m["content"] for m in conversation if m["role"] == "assistant"]
    if name == "llama3":  # the Llama 3 template trims contents
      contents = [c.strip() for c in contents]
    assert _masked_runs(tok, ids, mask) == [c + end for c in contents]


def test_assistant_mask_equals_transformers_generation_mask(dirs, tmp_path):
  shutil.copytree(dirs["qwen"], tmp_path, dirs_exist_ok=True)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({**config, "chat_template": fx.QWEN_GENERATION_TAG_TEMPLATE}))
  ours, ref = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
  for conversation in CONVERSATIONS.values():
    ids, mask = ours.encode_chat_with_mask(conversation)
    expected = ref.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == expected["input_ids"]
    assert mask == expected["assistant_masks"]


def test_assistant_mask_with_history_dependent_template(dirs, tmp_path):
  shutil.copytree(dirs["qwen"], tmp_path, dirs_exist_ok=True)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({**config, "chat_template": fx.HISTORY_DEPENDENT_TEMPLATE}))
  tok = Tokenizer.from_dir(tmp_path)
  conversation = CONVERSATIONS["multi_turn_system"]
  ids, mask = tok.encode_chat_with_mask(conversation)
  assert ids == tok.apply_chat_template(conversation)
  assert _masked_runs(tok, ids, mask) == [
    TURN1[1]["content"] + "<|im_end|>", "<think>\n\n</think>\n\n" + TURN2[1]["content"] + "<|im_end|>"]


def _sentencepiece_reference(sp, text):
  """SentencePiece's own encoding (ChatML markers are user-defined symbols there), without the lone
  dummy-prefix piece it puts in front of a special token at the very start of the text."""
  ids = sp.encode(text)
  return ids[1:] if text.startswith(fx.QWEN_SPECIALS) and sp.id_to_piece(ids[0]) == "\u2581" else ids


def test_sentencepiece_roundtrip_specials_and_chat(dirs):
  tok, ref = _pair(dirs, "sp")
  sp = spm.SentencePieceProcessor(model_file=str(dirs["sp"] / "tokenizer.model"))
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == _sentencepiece_reference(sp, text)
    assert tok.decode(ids) == text
  for special in fx.QWEN_SPECIALS:
    assert tok.encode(special) == [sp.piece_to_id(special)]
  assert tok.eos_id == sp.piece_to_id("<|im_end|>") and tok.pad_id == tok.eos_id
  assert tok.bos_id == sp.bos_id()
  assert tok.decode(tok.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"
  assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # add_bos_token: false
  assert tok.vocab_size == sp.vocab_size()
  for conversation in CONVERSATIONS.values():
    text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text == ref.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True)
    assert ids == _sentencepiece_reference(sp, text) and tok.decode(ids) == text


def test_sentencepiece_control_symbols_are_split_out(tmp_path):
  tok = Tokenizer.from_dir(fx.write_sentencepiece_chatml_dir(tmp_path, chatml_as_control_symbols=True,
                                                             add_bos_token=True))
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
  im_start, im_end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
  assert sp.is_control(im_start) and im_start not in sp.encode("<|im_start|>")  # SentencePiece splits it
  proto = sentencepiece_model_pb2.ModelProto.FromString((tmp_path / "tokenizer.model").read_bytes())
  proto.normalizer_spec.add_dummy_prefix = False
  sp_mid_text = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
  # The dummy prefix goes only on text at the very start.
  assert tok.encode("a b<|im_start|>user\n hi<|im_end|>") == (
    sp.encode("a b") + [im_start] + sp_mid_text.encode("user\n hi") + [im_end])
  for text in TEXTS + ["<|im_start|> x", " <|im_end|>  y<|im_end|>"]:
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode("hi", add_special_tokens=True) == [sp.bos_id()] + sp.encode("hi")
  ids, mask = tok.encode_chat_with_mask(TURN1)
  assert ids.count(im_start) == 3
  assert _masked_runs(tok, ids, mask) == [TURN1[1]["content"] + "<|im_end|>"]


def test_added_token_past_sentencepiece_vocab_and_model_fit(tmp_path):
  tok = Tokenizer.from_dir(fx.write_sentencepiece_chatml_dir(tmp_path))
  base = tok.vocab_size
  extra = {"content": "<tool>", "special": False, "lstrip": False, "rstrip": False, "normalized": False}
  tok = Tokenizer.from_dir(
    fx.write_sentencepiece_chatml_dir(tmp_path, added_tokens_decoder={str(base): extra}))
  assert tok.vocab_size == base + 1 and tok.encode("a<tool>b")[1:-1] == [base]
  assert tok.decode(tok.encode("a<tool>b"), skip_special_tokens=True) == "a<tool>b"
  tok.check_fits_model(base + 1)
  with pytest.raises(ValueError, match=rf"ids up to {base}.*vocab_size is {base}"):
    tok.check_fits_model(base)


@pytest.mark.parametrize("name", ["qwen", "llama3", "sp"])
def test_save_round_trips(dirs, name, tmp_path):
  tok = Tokenizer.from_dir(dirs[name])
  tok.save(tmp_path)
  again = Tokenizer.from_dir(tmp_path)
  conversation = CONVERSATIONS["multi_turn_system"]
  assert again.encode_chat_with_mask(conversation) == tok.encode_chat_with_mask(conversation)
  assert [again.encode(t, True) for t in TEXTS] == [tok.encode(t, True) for t in TEXTS]
  assert (again.vocab_size, again.bos_id, again.eos_id, again.pad_id, again.eos_ids) == (
    tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids)
  assert AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
    conversation, tokenize=False) == tok.apply_chat_template(conversation, tokenize=False)


def test_chat_template_jinja_file_wins_and_template_globals(dirs, tmp_path):
  shutil.copytree(dirs["qwen"], tmp_path, dirs_exist_ok=True)
  (tmp_path / "chat_template.jinja").write_text(
    "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}|{% endfor %}{{ strftime_now('%Y') }}")
  tok = Tokenizer.from_dir(tmp_path)
  text = tok.apply_chat_template(TURN1[:1], tokenize=False)
  assert text == f"user:{TURN1[0]['content']}|{datetime.datetime.now():%Y}"
  ref = AutoTokenizer.from_pretrained(str(tmp_path))
  assert text == ref.apply_chat_template(TURN1[:1], tokenize=False)


def test_missing_tokenizer_file_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*tokenizer\.json.*tokenizer\.model"):
    Tokenizer.from_dir(tmp_path)


def test_missing_chat_template_error(tmp_path):
  tok = Tokenizer.from_dir(fx.write_qwen_dir(tmp_path, chat_template=None))
  assert tok.encode("hi")  # plain encoding still works
  with pytest.raises(ValueError, match=rf"{tmp_path}/tokenizer_config\.json has no chat_template"):
    tok.apply_chat_template(TURN1)


def test_template_errors_are_clear(dirs, tmp_path):
  llama = Tokenizer.from_dir(dirs["llama3"])
  with pytest.raises(ValueError, match="unsupported role tool"):
    llama.apply_chat_template([{"role": "tool", "content": "x"}])
  shutil.copytree(dirs["qwen"], tmp_path, dirs_exist_ok=True)
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}))
  with pytest.raises(ValueError, match="none named 'default'"):
    Tokenizer.from_dir(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",\n  oops}')
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: invalid JSON at line 2"):
    Tokenizer.from_dir(tmp_path)
