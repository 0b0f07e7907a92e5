"""Tiny tokenizer directories (byte-level BPE or SentencePiece, Qwen2.5 / Llama 3 specials) for tests."""

from __future__ import annotations

import io
import json
import pathlib

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
  "A critic reads a candidate solution step by step and decides whether the final answer is right.",
  "The student computed 12 * 7 = 84, then added 16 to get 100. Conclusion: right.",
  "Gradient descent lowers the loss a little at every step; the learning rate sets the step size.",
  "Please reason step by step, and put your final answer within \\boxed{}.",
  "Naïve café owners in Zürich sell crème brûlée for 7 €.",
  "数学 is mathematics, and emojis like 🙂 exist.",
  "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
  "User asks, assistant answers.\nThe system prompt sets the tone of the whole conversation.",
]

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA3_SPECIALS = (
  "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
  "<|eom_id|>")

# ChatML in the Qwen2.5 style: default system prompt, optional tool list rendered with tojson.
# Plain `{% %}` tags with indentation on purpose, so the output depends on trim_blocks / lstrip_blocks.
QWEN_CHAT_TEMPLATE = """{% if tools %}
    {{- '<|im_start|>system\\n' -}}
    {% if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] -}}
    {% else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -}}
    {% endif %}
    {{- '\\n\\n# Tools\\n<tools>' -}}
    {% for tool in tools %}
        {{- '\\n' + (tool | tojson) -}}
    {% endfor %}
    {{- '\\n</tools><|im_end|>\\n' -}}
{% elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}
{% else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' -}}
{% endif %}
{% for message in messages %}
    {% if not (loop.first and message['role'] == 'system') %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' -}}
{% endif %}
"""

# Llama 3 style: bos, then header-wrapped turns closed by <|eot_id|>, contents trimmed.
LLAMA3_CHAT_TEMPLATE = """{{- bos_token -}}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unsupported role ' + message['role']) -}}
    {% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' -}}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{% endif %}
"""

# ChatML whose assistant turns are wrapped in transformers' {% generation %} markers, so that
# transformers' return_assistant_tokens_mask gives an independent reference mask.
QWEN_GENERATION_TAG_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' -}}
        {% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}
        {{- '\\n' -}}
    {% else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' -}}
{% endif %}
"""

# ChatML that renders the LAST assistant turn with an empty think block (as Qwen3 does), so an earlier
# assistant turn renders differently once later turns follow it.
HISTORY_DEPENDENT_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'assistant' and loop.last %}
        {{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' -}}
    {% else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' -}}
{% endif %}
"""


def _write_json(path: pathlib.Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _train_byte_level_bpe(specials: tuple[str, ...]) -> Tokenizer:
  """Byte-level BPE trained on CORPUS; specials go after the learned vocab, as in the real models."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 3, trainer=trainer)
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
  return tok


def _added_tokens_decoder(tok: Tokenizer, specials: tuple[str, ...]) -> dict:
  return {
    str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": True}
    for s in specials
  }


def write_qwen_dir(path: pathlib.Path, chat_template: str | None = QWEN_CHAT_TEMPLATE) -> pathlib.Path:
  """tokenizer.json + tokenizer_config.json + generation_config.json shaped like Qwen2.5-Instruct's."""
  path.mkdir(parents=True, exist_ok=True)
  tok = _train_byte_level_bpe(QWEN_SPECIALS)
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.save(str(path / "tokenizer.json"))
  config = {
    "added_tokens_decoder": _added_tokens_decoder(tok, QWEN_SPECIALS),
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "model_max_length": 32768,
    "clean_up_tokenization_spaces": False,
  }
  if chat_template is not None:
    config["chat_template"] = chat_template
  _write_json(path / "tokenizer_config.json", config)
  eos_ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
  _write_json(path / "generation_config.json", {"eos_token_id": eos_ids, "pad_token_id": eos_ids[1]})
  return path


def write_llama3_dir(path: pathlib.Path) -> pathlib.Path:
  """Llama-3-Instruct shape: bos added by the post-processor, bos/eos given as AddedToken dicts."""
  path.mkdir(parents=True, exist_ok=True)
  tok = _train_byte_level_bpe(LLAMA3_SPECIALS)
  bos = "<|begin_of_text|>"
  tok.post_processor = processors.Sequence([
    processors.ByteLevel(trim_offsets=False),
    processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]),
  ])
  tok.save(str(path / "tokenizer.json"))
  config = {
    "added_tokens_decoder": _added_tokens_decoder(tok, LLAMA3_SPECIALS),
    "bos_token": {"__type": "AddedToken", "content": bos, "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "eos_token": "<|eot_id|>",
    "chat_template": [{"name": "default", "template": LLAMA3_CHAT_TEMPLATE}],
  }
  _write_json(path / "tokenizer_config.json", config)
  stop = [tok.token_to_id(s) for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
  _write_json(path / "generation_config.json",
              {"bos_token_id": tok.token_to_id(bos), "eos_token_id": stop})
  return path


def write_sentencepiece_chatml_dir(path: pathlib.Path, chatml_as_control_symbols: bool = False,
                                   **config_overrides) -> pathlib.Path:
  """A tiny SentencePiece BPE model with the ChatML tokens as pieces, plus a ChatML template.

  As user-defined symbols SentencePiece matches them in text itself; as control symbols it does not, and
  the tokenizer has to split them out (they are listed in additional_special_tokens).
  """
  path.mkdir(parents=True, exist_ok=True)
  kind = "control_symbols" if chatml_as_control_symbols else "user_defined_symbols"
  symbols = {kind: list(QWEN_SPECIALS)}
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS * 3), model_writer=model, vocab_size=500, model_type="bpe",
    normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
    character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, **symbols)
  (path / "tokenizer.model").write_bytes(model.getvalue())
  config = {
    "bos_token": "<s>",
    "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
    "unk_token": "<unk>",
    "add_bos_token": False,
    "additional_special_tokens": list(QWEN_SPECIALS),
    "chat_template": QWEN_CHAT_TEMPLATE,
    **config_overrides,
  }
  _write_json(path / "tokenizer_config.json", config)
  return path
