"""Verdict parsers: a critic's final judgement in the published styles (CFT, CRL, Critique-RL) and
ProcessBench's boxed step index."""

from __future__ import annotations

import functools
import re

STYLES = ("auto", "cft", "crl", "critique_rl")

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_CFT_MARKER = "Conclusion"
_CRITIQUE_RL_MARKER = re.compile(r"correctness of the final answer", re.IGNORECASE)
_CRITIQUE_RL_WORD = re.compile(r"[\s:*_]*([A-Za-z]+)")
_CRITIQUE_RL_WORDS = {"correct": True, "right": True, "wrong": False, "incorrect": False}
_INT = re.compile(r"[+-]?\d+")
_BRACE = re.compile(r"(?<!\\)[{}]")  # an escaped brace (\{) is a literal, not a group

# A parser returns (position of the verdict marker, verdict) for the last marker, or None.
_Match = tuple[int, bool | None]


def remove_think(text: str) -> str:
  """Removes reasoning blocks so only the final answer is parsed.

  Drops every `<think>...</think>` block; then, if a `</think>` without its opening tag remains
  (the thinking began in the prompt), everything up to it; then, if a `<think>` is never closed
  (generation stopped while thinking), everything from it on.
  """
  text = _THINK_BLOCK.sub("", text)
  close = text.rfind(_THINK_CLOSE)
  if close >= 0:
    text = text[close + len(_THINK_CLOSE):]
  open_ = text.find(_THINK_OPEN)
  if open_ >= 0:
    text = text[:open_]
  return text


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
  last = None
  for last in pattern.finditer(text):
    pass
  return last


@functools.lru_cache(maxsize=16)
def _command_pattern(commands: tuple[str, ...]) -> re.Pattern[str]:
  return re.compile("(?:" + "|".join(map(re.escape, commands)) + r")\s*\{")


def last_braced_argument(text: str, *commands: str) -> tuple[int, str] | None:
  """(position, argument) of the LAST `\\command{...}` in text (any of `commands`), braces matched.

  A command includes its backslash, e.g. "\\boxed". Spaces between the command and "{" are
  allowed; escaped braces (`\\{`) are literals. Returns None when the command is absent or its
  last occurrence is never closed (a truncated answer is not replaced by an earlier one).
  """
  last = _last_match(_command_pattern(commands), text)
  if last is None:
    return None
  depth = 1
  for brace in _BRACE.finditer(text, last.end()):
    depth += 1 if brace.group() == "{" else -1
    if depth == 0:
      return last.start(), text[last.end():brace.start()]
  return None


def _parse_cft(text: str) -> _Match | None:
  start = text.rfind(_CFT_MARKER)
  if start < 0:
    return None
  tail = text[start + len(_CFT_MARKER):].lower()
  if "wrong" in tail or "incorrect" in tail:
    return start, False
  if "right" in tail or "correct" in tail:
    return start, True
  return start, None


def _parse_crl(text: str) -> _Match | None:
  found = last_braced_argument(text, r"\conclusion")
  if found is None:
    return None
  start, argument = found
  if "T" in argument:
    return start, True
  if "F" in argument:
    return start, False
  return start, None


def _parse_critique_rl(text: str) -> _Match | None:
  last = _last_match(_CRITIQUE_RL_MARKER, text)
  if last is None:
    return None
  word = _CRITIQUE_RL_WORD.match(text, last.end())
  verdict = _CRITIQUE_RL_WORDS.get(word.group(1).lower()) if word else None
  return last.start(), verdict


_PARSERS = {"cft": _parse_cft, "crl": _parse_crl, "critique_rl": _parse_critique_rl}


def parse_verdict(text: str, style: str = "auto", strip_think: bool = True) -> bool | None:
  """The critic's verdict: True (solution correct), False (wrong), None (no verdict found).

  Args:
    text: the generated critique.
    style: "cft" ("Conclusion: right/wrong"), "crl" ("\\conclusion{T|F}"), "critique_rl"
      ("Correctness of the final answer: Correct|Wrong") or "auto": every style is tried and the
      verdict whose marker comes last in the text wins.
    strip_think: drop `<think>` reasoning first (see `remove_think`).
  """
  if style not in STYLES:
    raise ValueError(f"parse_verdict: unknown style {style!r}; use one of {STYLES}")
  if strip_think:
    text = remove_think(text)
  parsers = _PARSERS.values() if style == "auto" else (_PARSERS[style],)
  matches = [m for m in (parse(text) for parse in parsers) if m is not None and m[1] is not None]
  if not matches:
    return None
  return max(matches, key=lambda m: m[0])[1]


def parse_processbench_step(text: str, strip_think: bool = True) -> int | None:
  """ProcessBench answer: the integer in the last `\\boxed{}` (-1 = no wrong step), else None."""
  if strip_think:
    text = remove_think(text)
  found = last_braced_argument(text, r"\boxed")
  if found is None:
    return None
  argument = found[1].strip()
  return int(argument) if _INT.fullmatch(argument) else None
