"""OpenAI-compatible HTTP API (FastAPI) over an `Engine`: /v1/completions, /v1/chat/completions,
/v1/models and /health.

Contract (the subset of the OpenAI schema served; anything else in a request is a 400 naming it):
- `model` must name the served model (`served_name`), else 404 `model_not_found`.
- completions: `prompt` is a string, a list of strings, a list of token ids or a list of such lists;
  strings are encoded with the tokenizer's special prefix (e.g. BOS) as the HF tokenizer does.
- chat: `messages` ([{"role", "content"}], content a string or a list of {"type": "text"} parts) is
  rendered with the checkpoint's chat template and a generation prompt. Extensions (vLLM's names):
  `add_generation_prompt` (default true) and `continue_final_message` (default false; with
  add_generation_prompt false and a last message from the assistant, the completion continues that
  message: the earlier messages with a generation prompt, then the last message's text encoded
  without special tokens).
- `max_tokens` (completions default 16, chat default: what is left of the context, at most 1024),
  `temperature` (default 1.0; 0 = greedy), `top_p`, `top_k` (extension; 0 = off), `n`, `stop`
  (string or list; cut from the text, finish_reason "stop"), `seed` (rows with a seed run as their own
  batch, so a seeded request is reproducible), `stream` (server-sent events: the whole completion as
  one chunk once its batch finishes, then a chunk with finish_reason, then `[DONE]`), `user` (ignored).
- prompt tokens + max_tokens must fit the model's `max_position_embeddings`, else 400.
Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import fastapi
from fastapi import responses

from cftjax.serve.engine import Completion, Engine, GenerationRequest, SamplingSettings

COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
                     "stream", "user"}
CHAT_FIELDS = (COMPLETION_FIELDS - {"prompt"}) | {"messages", "max_completion_tokens", "add_generation_prompt",
                                                   "continue_final_message"}
CHAT_DEFAULT_MAX_TOKENS = 1024
MAX_N = 64


class RequestError(ValueError):
  """A bad request: HTTP `status`, the offending `param` (a request field) and an OpenAI error `code`."""

  def __init__(self, message: str, param: str | None = None, status: int = 400,
               code: str = "invalid_request"):
    super().__init__(message)
    self.param, self.status, self.code = param, status, code


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
  value = body.get(key, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
    raise RequestError(f"'{key}' must be a number in [{low}, {high}], got {value!r}", key)
  return float(value)


def _integer(body: dict, key: str, default: int | None, low: int) -> int | None:
  value = body.get(key, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise RequestError(f"'{key}' must be an integer >= {low}, got {value!r}", key)
  return value


def _flag(body: dict, key: str, default: bool) -> bool:
  value = body.get(key, default)
  if not isinstance(value, bool):
    raise RequestError(f"'{key}' must be true or false, got {value!r}", key)
  return value


def _stop_strings(body: dict) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
    raise RequestError("'stop' must be a non-empty string or a list of at most 16 of them", "stop")
  return tuple(stop)


class OpenAIServer:
  """Turns OpenAI request bodies into engine requests and completions into OpenAI responses."""

  def __init__(self, engine: Engine, served_name: str):
    self.engine = engine
    self.served_name = served_name
    self.created = int(time.time())

  def check_body(self, body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
      raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
      raise RequestError(f"unsupported field(s) {unknown}; this server takes {sorted(allowed)}", unknown[0])
    model = body.get("model")
    if model != self.served_name:
      raise RequestError(f"model {model!r} is not served here; this server serves {self.served_name!r} "
                         "(GET /v1/models)", "model", status=404, code="model_not_found")
    return body

  def prompts(self, body: dict) -> list[list[int]]:
    prompt = body.get("prompt")
    tokenizer = self.engine.tokenizer
    if isinstance(prompt, str):
      return [tokenizer.encode(prompt, add_special_tokens=True)]
    if isinstance(prompt, list) and prompt:
      if all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p, add_special_tokens=True) for p in prompt]
      if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [self._check_ids(prompt)]
      if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
        return [self._check_ids(p) for p in prompt]
    raise RequestError("'prompt' must be a non-empty string, list of strings, list of token ids, or list of "
                       "token-id lists", "prompt")

  def _check_ids(self, ids: Sequence[int]) -> list[int]:
    vocab = self.engine.cfg.vocab_size
    if any(not 0 <= t < vocab for t in ids):
      raise RequestError(f"'prompt' holds token ids outside [0, {vocab})", "prompt")
    return list(ids)

  def chat_prompt(self, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
      raise RequestError("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    plain = []
    for i, message in enumerate(messages):
      if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError(f"messages[{i}] must be an object with a string 'role'", "messages")
      content = message.get("content")
      if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
          raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(p["text"] for p in content)
      if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string or a list of text parts", "messages")
      plain.append({"role": message["role"], "content": content})
    generation_prompt = _flag(body, "add_generation_prompt", True)
    if _flag(body, "continue_final_message", False):
      if generation_prompt or plain[-1]["role"] != "assistant" or len(plain) < 2:
        raise RequestError("'continue_final_message' needs 'add_generation_prompt': false and a last message "
                           "from the assistant after at least one other", "continue_final_message")
      try:
        head = self.engine.tokenizer.apply_chat_template(plain[:-1], add_generation_prompt=True)
      except (ValueError, TypeError, KeyError) as e:
        raise RequestError(f"'messages' could not be rendered with the chat template: {e}", "messages") from e
      return list(head) + list(self.engine.tokenizer.encode(plain[-1]["content"]))
    try:
      return self.engine.tokenizer.apply_chat_template(plain, add_generation_prompt=generation_prompt)
    except (ValueError, TypeError, KeyError) as e:
      raise RequestError(f"'messages' could not be rendered with the chat template: {e}", "messages") from e

  def requests(self, body: dict, prompts: list[list[int]], default_max_tokens: int | None
               ) -> list[GenerationRequest]:
    """One request per (prompt, choice), in response order."""
    settings = SamplingSettings(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                                top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
                                top_k=_integer(body, "top_k", 0, 0), seed=_integer(body, "seed", None, 0))
    n = _integer(body, "n", 1, 1)
    if n > MAX_N:
      raise RequestError(f"'n' must be at most {MAX_N}, got {n}", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = _stop_strings(body)
    context = self.engine.max_context
    out = []
    for prompt in prompts:
      room = None if context is None else context - len(prompt)
      default = default_max_tokens if default_max_tokens is not None else min(CHAT_DEFAULT_MAX_TOKENS, room or 1)
      max_tokens = _integer(body, key, default, 1)
      if room is not None and max_tokens > room:
        raise RequestError(f"the prompt ({len(prompt)} tokens) plus '{key}' ({max_tokens}) exceeds the model's "
                           f"context of {context} tokens; lower '{key}' to at most {max(room, 0)} or shorten "
                           "the prompt", key)
      out += [GenerationRequest(tuple(prompt), max_tokens, settings, stop)] * n
    return out

  async def complete(self, requests: list[GenerationRequest]) -> list[Completion]:
    futures = [asyncio.wrap_future(self.engine.submit(r)) for r in requests]
    return list(await asyncio.gather(*futures))

  def models(self) -> dict:
    return {"object": "list", "data": [{"id": self.served_name, "object": "model", "created": self.created,
                                        "owned_by": "cftjax"}]}


def _usage(completions: list[Completion]) -> dict:
  prompt = sum(c.prompt_tokens for c in completions)
  generated = sum(len(c.token_ids) for c in completions)
  return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _error(status: int, message: str, param: str | None, code: str) -> responses.JSONResponse:
  kind = "invalid_request_error" if status < 500 else "server_error"
  return responses.JSONResponse(status_code=status,
                                content={"error": {"message": message, "type": kind, "param": param,
                                                   "code": code}})


def _events(chunks: list[dict]) -> responses.StreamingResponse:
  async def stream():
    for chunk in chunks:
      yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
  return responses.StreamingResponse(stream(), media_type="text/event-stream")


def create_app(engine: Engine, served_name: str) -> fastapi.FastAPI:
  """The FastAPI application serving `engine` under the model id `served_name`."""
  server = OpenAIServer(engine, served_name)
  app = fastapi.FastAPI(title="cftjax", docs_url=None, redoc_url=None)

  @app.exception_handler(RequestError)
  async def request_error(_: fastapi.Request, e: RequestError):
    return _error(e.status, str(e), e.param, e.code)

  @app.exception_handler(Exception)
  async def server_error(_: fastapi.Request, e: Exception):
    return _error(500, f"{type(e).__name__}: {e}", None, "internal_error")

  async def read_body(request: fastapi.Request, allowed: set[str]) -> dict:
    try:
      body = await request.json()
    except ValueError as e:
      raise RequestError(f"the request body is not valid JSON: {e}") from e
    return server.check_body(body, allowed)

  @app.get("/health")
  async def health():
    stats = engine.stats
    return {"status": "ok", "model": served_name, "requests": stats.requests, "batches": stats.batches,
            "largest_batch": stats.largest_batch}

  @app.get("/v1/models")
  async def models():
    return server.models()

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    body = await read_body(request, COMPLETION_FIELDS)
    results = await server.complete(server.requests(body, server.prompts(body), default_max_tokens=16))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served_name}
    choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
               for i, c in enumerate(results)]
    if body.get("stream"):
      return _events([{**head, "choices": [{**choice, "finish_reason": None}]} for choice in choices]
                     + [{**head, "choices": [{"index": c["index"], "text": "", "logprobs": None,
                                              "finish_reason": c["finish_reason"]} for c in choices]}])
    return {**head, "choices": choices, "usage": _usage(results)}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request):
    body = await read_body(request, CHAT_FIELDS)
    results = await server.complete(server.requests(body, [server.chat_prompt(body)], default_max_tokens=None))
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served_name}
    if body.get("stream"):
      head = {**head, "object": "chat.completion.chunk"}
      return _events([{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": c.text},
                                            "finish_reason": None}]} for i, c in enumerate(results)]
                     + [{**head, "choices": [{"index": i, "delta": {}, "finish_reason": c.finish_reason}
                                             for i, c in enumerate(results)]}])
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(results)]
    return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(results)}

  return app
