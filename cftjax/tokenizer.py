"""`Tokenizer`: a checkpoint's tokenizer.json or SentencePiece model, special tokens and chat template.

Chat rendering follows transformers' `apply_chat_template` (sandboxed Jinja, encode without specials).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import pathlib
import re
import shutil
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

logger = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
NAMED_TEMPLATE_DIR = "additional_chat_templates"  # transformers 5: named chat templates, one .jinja each
# The named special tokens; transformers hands the ones that are set to chat templates as variables.
NAMED_SPECIAL_TOKENS = (
  "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_LISTED_SPECIAL_TOKENS = ("additional_special_tokens", "extra_special_tokens")
_ADDED_TOKEN_OPTIONS = ("special", "lstrip", "rstrip", "single_word", "normalized")

Offsets = list[tuple[int, int]]  # per token: [start, end) character offsets into the encoded text


@dataclasses.dataclass(frozen=True)
class _AddedToken:
  """A token matched whole in text, from tokenizer_config.json or special_tokens_map.json."""
  content: str
  token_id: int | None = None  # the id tokenizer_config.json's added_tokens_decoder pins, if any
  options: Mapping[str, bool] = dataclasses.field(default_factory=lambda: {"special": True})

  @property
  def special(self) -> bool:
    return bool(self.options.get("special", False))


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  """The JSON object in `path`, or None when the file does not exist."""
  if not path.is_file():
    return None
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object at the top level, got {type(value).__name__}")
  return value


def _token_content(value: Any, where: str) -> str | None:
  """A special-token value: a string, a dict with "content" (an AddedToken), or null."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{where}: expected a string, null, or a dict with a 'content' string; got {value!r}")


class _HFBackend:
  """A Hugging Face `tokenizers.Tokenizer` (tokenizer.json); it matches added tokens itself."""

  def __init__(self, tok: tokenizers.Tokenizer, source: str):
    self._tok = tok
    self.source = source

  @classmethod
  def load(cls, path: pathlib.Path) -> _HFBackend:
    try:
      return cls(tokenizers.Tokenizer.from_file(str(path)), str(path))
    except Exception as e:  # the Rust loader raises a bare Exception
      raise ValueError(f"{path}: not a loadable tokenizers JSON file ({e})") from e

  def register(self, added: Sequence[_AddedToken]) -> None:
    registered = {t.content for t in self._tok.get_added_tokens_decoder().values()}
    for token in added:
      if token.content not in registered:
        added_token = tokenizers.AddedToken(token.content, **dict(token.options))
        if token.special:
          self._tok.add_special_tokens([added_token])
        else:
          self._tok.add_tokens([added_token])
        registered.add(token.content)

  def encode(self, text: str) -> tuple[list[int], Offsets]:
    encoding = self._tok.encode(text, add_special_tokens=False)
    return list(encoding.ids), list(encoding.offsets)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def special_tokens(self) -> list[str]:
    return [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]

  def num_ids(self) -> int:
    return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

  def default_special_ids(self) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text (e.g. Llama 3's <|begin_of_text|>)."""
    plain = self._tok.encode("a", add_special_tokens=False).ids
    full = self._tok.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
      if full[start:start + len(plain)] == plain:
        return full[:start], full[start + len(plain):]
    raise ValueError(f"{self.source}: the post-processor rewrites the text's own tokens; unsupported")

  def save(self, out_dir: pathlib.Path) -> None:
    self._tok.save(str(out_dir / TOKENIZER_JSON))


class _SentencePieceBackend:
  """A SentencePiece model (tokenizer.model); added tokens are split out of the text before it runs.

  So every added/special token is one id, whether the model has it as a user-defined symbol (e.g. ChatML
  markers), a control symbol (<s>) or not at all (an id past the model's vocab). The model's dummy-prefix
  space is added only to text at the very start (so "<|im_start|>..." gets no lone "▁" in front,
  unlike a plain SentencePiece encode), and decoding strips it only from tokens at the very start, so
  decode(encode(text)) == text for models with a lossless normalizer.
  """

  def __init__(self, model_proto: bytes, source: str):
    self.source = source
    self._model_proto = model_proto
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    self._sp_at_start = spm.SentencePieceProcessor(model_proto=model_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    self._sp_mid_text = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    self._split_ids: dict[str, int] = {}  # added tokens split out of the text before SentencePiece
    self._split_pattern: re.Pattern[str] | None = None
    self._special_tokens: dict[str, int] = {}

  @classmethod
  def load(cls, path: pathlib.Path) -> _SentencePieceBackend:
    model_proto = path.read_bytes()
    try:
      return cls(model_proto, str(path))
    except Exception as e:  # protobuf / SentencePiece raise assorted types on corrupt files
      raise ValueError(f"{path}: not a loadable SentencePiece model ({e})") from e

  def register(self, added: Sequence[_AddedToken]) -> None:
    for token in added:
      token_id = self._piece_id(token.content)
      if token_id is None:
        token_id = token.token_id if token.token_id is not None else self.num_ids()
        if token_id < self._sp_at_start.vocab_size():
          raise ValueError(
            f"{self.source}: added token {token.content!r} has id {token_id}, which the SentencePiece "
            f"model uses for {self._sp_at_start.id_to_piece(token_id)!r}; fix added_tokens_decoder in "
            f"{TOKENIZER_CONFIG}")
      self._split_ids[token.content] = token_id
      if token.special:
        self._special_tokens[token.content] = token_id
    by_length = sorted(self._split_ids, key=len, reverse=True)
    self._split_pattern = re.compile("|".join(map(re.escape, by_length))) if by_length else None

  def _piece_id(self, piece: str) -> int | None:
    if piece in self._split_ids:
      return self._split_ids[piece]
    piece_id = self._sp_at_start.piece_to_id(piece)
    return piece_id if self._sp_at_start.id_to_piece(piece_id) == piece else None

  def encode(self, text: str) -> tuple[list[int], Offsets]:
    ids: list[int] = []
    offsets: Offsets = []
    start = 0
    for match in self._split_pattern.finditer(text) if self._split_pattern else ():
      self._encode_run(text[start:match.start()], start, ids, offsets)
      ids.append(self._split_ids[match.group()])
      offsets.append(match.span())
      start = match.end()
    self._encode_run(text[start:], start, ids, offsets)
    return ids, offsets

  def _encode_run(self, run: str, start: int, ids: list[int], offsets: Offsets) -> None:
    """Appends the ids and character offsets of `run`, the text from character `start` on."""
    if not run:
      return
    processor = self._sp_at_start if start == 0 else self._sp_mid_text
    char_of_byte = [i for i, ch in enumerate(run) for _ in range(len(ch.encode("utf-8")))] + [len(run)]
    for piece in processor.encode(run, return_type="proto").pieces:
      ids.append(piece.id)
      offsets.append((start + char_of_byte[piece.begin], start + char_of_byte[piece.end]))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    text_of_split_id = {i: s for s, i in self._split_ids.items()}
    special_ids = set(self._special_tokens.values())
    parts: list[str] = []
    run: list[int] = []

    def flush_run() -> None:
      if run:
        parts.append((self._sp_mid_text if parts else self._sp_at_start).decode(run))
        run.clear()

    for token_id in ids:
      if skip_special_tokens and token_id in special_ids:
        continue
      if token_id in text_of_split_id:
        flush_run()
        parts.append(text_of_split_id[token_id])
      else:
        run.append(token_id)
    flush_run()
    return "".join(parts)

  def token_to_id(self, token: str) -> int | None:
    return self._piece_id(token)

  def special_tokens(self) -> list[str]:
    return list(self._special_tokens)

  def num_ids(self) -> int:
    return max([self._sp_at_start.vocab_size() - 1, *self._split_ids.values()]) + 1

  def default_special_ids(self) -> tuple[list[int], list[int]]:
    return [], []  # SentencePiece adds bos/eos only when tokenizer_config.json asks (add_bos_token)

  def save(self, out_dir: pathlib.Path) -> None:
    (out_dir / SENTENCEPIECE_MODEL).write_bytes(self._model_proto)


def _raise_template_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
  """transformers' `tojson`: plain json.dumps, no HTML escaping, non-ASCII kept."""
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
  """Accepts transformers' `{% generation %}...{% endgeneration %}` markers; renders the body as is."""

  tags = {"generation"}

  def parse(self, parser):
    next(parser.stream)
    return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=32)
def _compile_chat_template(source: str) -> jinja2.Template:
  """The Jinja environment transformers renders chat templates in."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_template_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(source)


def _select_chat_template(value: Any, where: str) -> str | None:
  """The template in a chat_template value: itself, or "default" of a list/dict of named templates."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    if not all(isinstance(t, Mapping) and "name" in t and "template" in t for t in value):
      raise ValueError(f"{where}: chat_template list entries must be {{'name': ..., 'template': ...}}")
    value = {t["name"]: t["template"] for t in value}
  if not isinstance(value, Mapping):
    raise ValueError(
      f"{where}: chat_template must be a string, a list or a dict, got {type(value).__name__}")
  if "default" not in value:
    raise ValueError(f"{where}: chat_template holds templates {sorted(value)} but none named 'default'; "
                     "name the one to use 'default'")
  return value["default"]


def _plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Message dicts without their None-valued keys, as transformers hands them to the template."""
  plain = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise TypeError(
        f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
    plain.append({key: value for key, value in message.items() if value is not None})
  return plain


def _mask_from_spans(offsets: Offsets, spans: Sequence[tuple[int, int]]) -> list[int]:
  """1 for each token whose character range overlaps one of `spans`, else 0."""
  return [int(any(end > lo and start < hi for lo, hi in spans)) for start, end in offsets]


class Tokenizer:
  """Text <-> ids for one checkpoint, with its special tokens and chat template. Build with `from_dir`.

  Attributes:
    vocab_size: 1 + the largest id the tokenizer can produce (added tokens included), i.e. the number
      of embedding rows a model needs; `check_fits_model` checks it against a model's vocab.
    bos_id, pad_id: ids of bos_token / pad_token (None when unset; pad_id falls back to eos_id).
    eos_ids: every stop id: eos_token's, then generation_config.json's eos_token_id(s).
    eos_id: eos_ids[0] (None when there is none).
  """

  def __init__(self, backend: _HFBackend | _SentencePieceBackend, source_dir: str,
               config: Mapping[str, Any], special_tokens_map: Mapping[str, Any] | None = None,
               generation_config: Mapping[str, Any] | None = None, template_in_file: bool = False):
    self._backend = backend
    self._source_dir = source_dir
    self._config = dict(config)
    self._special_tokens_map = dict(special_tokens_map) if special_tokens_map is not None else None
    self._generation_config = dict(generation_config or {})
    self._template_in_file = template_in_file  # save() writes it back to chat_template.jinja
    self._named = self._named_special_tokens()
    added = self._added_tokens()
    backend.register(added)
    self._check_pinned_ids(added)
    self.vocab_size = backend.num_ids()
    self.bos_id = self._named_id("bos_token")
    self.pad_id = self._named_id("pad_token")
    self.eos_ids = self._stop_ids()
    self.eos_id = self.eos_ids[0] if self.eos_ids else None
    if self.pad_id is None:
      self.pad_id = self.eos_id
    self._prefix_ids, self._suffix_ids = self._bos_eos_ids()
    by_length = sorted(set(backend.special_tokens()), key=len, reverse=True)
    self._special_pattern = re.compile("|".join(map(re.escape, by_length))) if by_length else None
    self._chat_template = _select_chat_template(
      self._config.get("chat_template"), f"{source_dir}/{TOKENIZER_CONFIG}")

  @property
  def source_dir(self) -> str:
    """The directory this tokenizer was read from."""
    return self._source_dir

  def describe(self) -> str:
    """One line: where it was read from, vocab size, bos / eos / pad ids, and the chat template's source."""
    if self._chat_template is None:
      template = "none"
    else:
      template = CHAT_TEMPLATE_FILE if self._template_in_file else TOKENIZER_CONFIG
    return (f"{self._source_dir}: {self.vocab_size} ids, bos {self.bos_id}, eos {self.eos_ids}, "
            f"pad {self.pad_id}, chat template from {template}")

  @classmethod
  def from_dir(cls, directory: str | pathlib.Path) -> Tokenizer:
    """Loads tokenizer.json (preferred) or tokenizer.model, plus the JSON configs beside it."""
    path = pathlib.Path(directory)
    if (path / TOKENIZER_JSON).is_file():
      backend = _HFBackend.load(path / TOKENIZER_JSON)
    elif (path / SENTENCEPIECE_MODEL).is_file():
      backend = _SentencePieceBackend.load(path / SENTENCEPIECE_MODEL)
    else:
      raise FileNotFoundError(
        f"No tokenizer in {path}: expected {TOKENIZER_JSON} (Hugging Face tokenizers) or "
        f"{SENTENCEPIECE_MODEL} (SentencePiece), with {TOKENIZER_CONFIG} beside it; point tokenizer_dir "
        "at the checkpoint directory")
    config = _read_json(path / TOKENIZER_CONFIG) or {}
    template_file = (path / CHAT_TEMPLATE_FILE).is_file()
    if template_file:  # transformers 5 saves it here; it wins over the config
      config["chat_template"] = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return cls(backend, str(path), config, _read_json(path / SPECIAL_TOKENS_MAP),
               _read_json(path / GENERATION_CONFIG), template_in_file=template_file)

  # ---- special tokens ----

  def _named_special_tokens(self) -> dict[str, str]:
    """bos_token, ... -> content; tokenizer_config.json wins, special_tokens_map.json fills gaps."""
    named = {}
    for source, values in self._configs_by_priority():
      for name in NAMED_SPECIAL_TOKENS:
        if name in values:
          content = _token_content(values[name], f"{self._source_dir}/{source}: {name}")
          if content is not None:
            named[name] = content
          else:
            named.pop(name, None)
    return named

  def _added_tokens(self) -> list[_AddedToken]:
    """Every token to match whole: added_tokens_decoder, listed special tokens, then the named ones."""
    where = f"{self._source_dir}/{TOKENIZER_CONFIG}"
    added = []
    for key, entry in (self._config.get("added_tokens_decoder") or {}).items():
      if not str(key).isdigit():
        raise ValueError(f"{where}: added_tokens_decoder key {key!r} is not a token id")
      content = _token_content(entry, f"{where}: added_tokens_decoder[{key}]")
      options = entry if isinstance(entry, Mapping) else {}
      options = {k: bool(options[k]) for k in _ADDED_TOKEN_OPTIONS if k in options}
      added.append(_AddedToken(content, int(key), options))
    for source, values in self._configs_by_priority():
      for name in _LISTED_SPECIAL_TOKENS:
        listed = values.get(name) or []
        listed = listed.values() if isinstance(listed, Mapping) else listed
        added.extend(_AddedToken(_token_content(v, f"{self._source_dir}/{source}: {name}")) for v in listed)
    missing = [c for c in self._named.values() if self._backend.token_to_id(c) is None]
    if missing:
      logger.info("%s: adding %d special token(s) missing from the vocab: %s", self._source_dir,
                  len(missing), missing)
    added.extend(_AddedToken(content) for content in self._named.values())
    return added

  def _configs_by_priority(self) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    return (SPECIAL_TOKENS_MAP, self._special_tokens_map or {}), (TOKENIZER_CONFIG, self._config)

  def _check_pinned_ids(self, added: Sequence[_AddedToken]) -> None:
    for token in added:
      actual = self._backend.token_to_id(token.content)
      if token.token_id is not None and actual != token.token_id:
        raise ValueError(
          f"{self._source_dir}/{TOKENIZER_CONFIG}: added_tokens_decoder gives {token.content!r} id "
          f"{token.token_id}, but {self._backend.source} has it as id {actual}")

  def _named_id(self, name: str) -> int | None:
    content = self._named.get(name)
    return None if content is None else self.token_to_id(content)

  def _stop_ids(self) -> list[int]:
    """eos_token's id, then generation_config.json's eos_token_id (an int or a list), without repeats."""
    value = self._generation_config.get("eos_token_id")
    listed = [value] if isinstance(value, int) else list(value or [])
    where = f"{self._source_dir}/{GENERATION_CONFIG}: eos_token_id"
    for token_id in listed:
      if not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
        raise ValueError(f"{where}: {token_id!r} is not a token id of this tokenizer "
                         f"(vocab_size {self.vocab_size})")
    eos = self._named_id("eos_token")
    return list(dict.fromkeys(([eos] if eos is not None else []) + listed))

  def _bos_eos_ids(self) -> tuple[list[int], list[int]]:
    """What encode(..., add_special_tokens=True) puts around a text: add_bos_token / add_eos_token from
    tokenizer_config.json when present, else what the tokenizer does by default (its post-processor)."""
    prefix, suffix = self._backend.default_special_ids()
    if "add_bos_token" in self._config:
      prefix = [self.bos_id] if self._config["add_bos_token"] and self.bos_id is not None else []
    if "add_eos_token" in self._config:
      eos = self._named_id("eos_token")
      suffix = [eos] if self._config["add_eos_token"] and eos is not None else []
    return prefix, suffix

  # ---- text <-> ids ----

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`; added/special tokens written in the text become their single ids."""
    ids, _ = self._backend.encode(text)
    return self._prefix_ids + ids + self._suffix_ids if add_special_tokens else ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._backend.decode([int(i) for i in ids], skip_special_tokens)

  def token_to_id(self, token: str) -> int:
    token_id = self._backend.token_to_id(token)
    if token_id is None:
      raise KeyError(f"token {token!r} is not in the tokenizer of {self._source_dir}")
    return token_id

  def check_fits_model(self, model_vocab_size: int) -> None:
    """Raises when the tokenizer can produce ids >= `model_vocab_size` (the model's embedding rows)."""
    if self.vocab_size > model_vocab_size:
      raise ValueError(
        f"The tokenizer of {self._source_dir} produces ids up to {self.vocab_size - 1}, but the model's "
        f"vocab_size is {model_vocab_size}; use the checkpoint's own tokenizer or a model with "
        f"vocab_size >= {self.vocab_size}")

  # ---- chat ----

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = False, tokenize: bool = True,
                          **template_kwargs: Any) -> list[int] | str:
    """The checkpoint's chat template rendered as transformers does, then encoded without added specials.

    `template_kwargs` become template variables (e.g. tools=[...], enable_thinking=False).
    """
    text = self._render_chat(messages, add_generation_prompt, template_kwargs)
    return self.encode(text) if tokenize else text

  def encode_chat_with_mask(self, messages: Sequence[Mapping[str, Any]],
                            **template_kwargs: Any) -> tuple[list[int], list[int]]:
    """ids == apply_chat_template(messages) and a mask that is 1 on every assistant turn's tokens.

    An assistant turn is what the template renders after the generation prompt (e.g. after
    "<|im_start|>assistant\\n") up to and including the special token that closes the turn
    (<|im_end|>, <|eot_id|>); whitespace the template writes after that token (ChatML's "\\n") is not
    part of the turn, since the model stops at the token. Everything else (system, user, headers,
    generation prompts) is 0. Needs a template whose rendering of the conversation before an assistant
    message plus the generation prompt is a prefix of the whole rendering (true of common templates).
    """
    text = self._render_chat(messages, False, template_kwargs)
    spans = [self._assistant_span(messages, i, text, template_kwargs)
             for i, message in enumerate(messages) if message.get("role") == "assistant"]
    ids, offsets = self._backend.encode(text)
    return ids, _mask_from_spans(offsets, spans)

  def _render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
                   template_kwargs: Mapping[str, Any]) -> str:
    if self._chat_template is None:
      raise ValueError(
        f"{self._source_dir}/{TOKENIZER_CONFIG} has no chat_template (and there is no "
        f"{CHAT_TEMPLATE_FILE}); use an instruct checkpoint's tokenizer or add a 'chat_template' entry")
    variables = {"tools": None, "documents": None, **self._named, **template_kwargs}
    try:
      return _compile_chat_template(self._chat_template).render(
        messages=_plain_messages(messages), add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"chat template of {self._source_dir} failed: {e}") from e

  def _assistant_span(self, messages: Sequence[Mapping[str, Any]], index: int, text: str,
                      template_kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """[start, end) characters of assistant message `index` in `text`, the rendered conversation."""
    prompt = self._render_chat(messages[:index], True, template_kwargs)
    turn = self._render_chat(messages[:index + 1], False, template_kwargs)
    if not (text.startswith(prompt) and turn.startswith(prompt)):
      raise ValueError(
        f"chat template of {self._source_dir}: the conversation up to message {index} plus the "
        "generation prompt does not render as a prefix of the whole conversation, so that assistant "
        "turn cannot be located")
    start = len(prompt)
    turn = turn[start:]
    if text.startswith(turn, start):
      end = start + len(turn)
    else:  # the turn renders differently once later turns follow (Qwen3 drops the think block)
      closing = self._last_special(turn)
      found = text.find(closing, start) if closing else -1
      if found < 0:
        raise ValueError(
          f"chat template of {self._source_dir}: cannot find the end of assistant message {index}")
      end = found + len(closing)
    return start, self._end_after_closing_token(text, start, end)

  def _last_special(self, text: str) -> str | None:
    matches = list(self._special_pattern.finditer(text)) if self._special_pattern else []
    return matches[-1].group() if matches else None

  def _end_after_closing_token(self, text: str, start: int, end: int) -> int:
    """`end` moved back to the end of the turn's last special token when only whitespace follows it."""
    matches = list(self._special_pattern.finditer(text, start, end)) if self._special_pattern else []
    if matches and not text[matches[-1].end():end].strip():
      return matches[-1].end()
    return end

  # ---- files ----

  def save(self, directory: str | pathlib.Path) -> None:
    """Writes the tokenizer file, tokenizer_config.json, the chat template (in chat_template.jinja when
    it was read from one, else inside tokenizer_config.json), special_tokens_map.json if there was one,
    and generation_config.json: the source's (sampling defaults kept) with bos/pad/eos ids set."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    self._backend.save(path)
    config = dict(self._config)
    if self._template_in_file:
      (path / CHAT_TEMPLATE_FILE).write_text(config.pop("chat_template"), encoding="utf-8")
    named_templates = pathlib.Path(self._source_dir) / NAMED_TEMPLATE_DIR
    if named_templates.is_dir() and named_templates.resolve() != (path / NAMED_TEMPLATE_DIR).resolve():
      shutil.copytree(named_templates, path / NAMED_TEMPLATE_DIR, dirs_exist_ok=True)
    _write_json(path / TOKENIZER_CONFIG, config)
    if self._special_tokens_map is not None:
      _write_json(path / SPECIAL_TOKENS_MAP, self._special_tokens_map)
    _write_json(path / GENERATION_CONFIG, self.generation_config())

  def generation_config(self) -> dict[str, Any]:
    """The source's generation_config.json (sampling defaults included) with this tokenizer's
    bos_token_id, pad_token_id and eos_token_id (every stop id) filled in."""
    config = dict(self._generation_config)
    for key, value in (("bos_token_id", self.bos_id), ("pad_token_id", self.pad_id)):
      if value is not None:
        config[key] = value
    if self.eos_ids:
      config["eos_token_id"] = self.eos_ids if len(self.eos_ids) > 1 else self.eos_ids[0]
    return config


def _write_json(path: pathlib.Path, value: Mapping[str, Any]) -> None:
  path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
