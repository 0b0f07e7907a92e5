"""Chat models that write text for the data builders: a cftjax checkpoint run in process with the JAX
sampler, or an OpenAI-compatible endpoint through the official `openai` client. Both answer
`complete(messages, n, temperature, max_new_tokens, seed)` with n texts, and `complete_each(conversations,
temperature, max_new_tokens, seed)` with one text per conversation, reproducibly for a seed."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from cftjax import sampling
from cftjax.models import checkpoint_io

Messages = Sequence[Mapping[str, str]]


class CheckpointChat:
  """A cftjax model checkpoint or run directory; its tokenizer's chat template renders the messages."""

  def __init__(self, ckpt: str):
    self.name = ckpt
    self.cfg, self.params, self.tokenizer = checkpoint_io.load_model(ckpt)

  def complete(self, messages: Messages, n: int, temperature: float, max_new_tokens: int, seed: int,
               prefix: str = "") -> list[str]:
    """n completions of one conversation in one generate call (rng = PRNGKey(seed)); with `prefix`,
    the assistant turn starts with that text and the completions continue it (prefix not included)."""
    prompt = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    prompt = list(prompt) + (list(self.tokenizer.encode(prefix)) if prefix else [])
    return self._generate([prompt] * n, temperature, max_new_tokens, seed)

  def complete_each(self, conversations: Sequence[Messages], temperature: float, max_new_tokens: int, seed: int
                    ) -> list[str]:
    """One completion of each conversation, all in one generate call (rng = PRNGKey(seed))."""
    prompts = [self.tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True)
               for m in conversations]
    return self._generate(prompts, temperature, max_new_tokens, seed) if prompts else []

  def _generate(self, prompts: Sequence[Sequence[int]], temperature: float, max_new_tokens: int, seed: int
                ) -> list[str]:
    """Completions of prompts; the batch is padded to a power of two rows (repeating the last prompt) so
    varying row counts reuse a few compiled programs."""
    rows = len(prompts)
    padded = list(prompts) + [prompts[-1]] * ((1 << (rows - 1).bit_length()) - rows)
    result = sampling.generate(self.params, self.cfg, padded, rng=jax.random.PRNGKey(seed),
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               stop_ids=self.tokenizer.eos_ids, pad_id=sampling.pad_id(self.tokenizer))
    return [self.tokenizer.decode(result.tokens[i, :result.lengths[i]], skip_special_tokens=True)
            for i in range(rows)]


class EndpointChat:
  """An OpenAI-compatible server (`base_url` ending in /v1), e.g. `cftjax serve`; model "" = the first
  model it lists. Sampling is reproducible where the server honours `seed`."""

  def __init__(self, base_url: str, model: str = "", api_key: str = "EMPTY", timeout_s: float = 600.0):
    import openai  # pylint: disable=import-outside-toplevel  (only endpoint models need the client)
    self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=2)
    self.model = model or self.client.models.list().data[0].id
    self.name = f"{base_url}#{self.model}"

  def complete(self, messages: Messages, n: int, temperature: float, max_new_tokens: int, seed: int,
               prefix: str = "") -> list[str]:
    """n completions of one conversation in one request; with `prefix`, the assistant turn starts with
    that text and the completions continue it (vLLM's `continue_final_message`, which `cftjax serve`
    also takes; prefix not included)."""
    messages, extra = list(messages), None
    if prefix:
      messages.append({"role": "assistant", "content": prefix})
      extra = {"continue_final_message": True, "add_generation_prompt": False}
    response = self.client.chat.completions.create(model=self.model, messages=messages, n=n, seed=seed,
                                                   temperature=temperature, max_tokens=max_new_tokens,
                                                   extra_body=extra)
    return [choice.message.content or "" for choice in sorted(response.choices, key=lambda c: c.index)]

  def complete_each(self, conversations: Sequence[Messages], temperature: float, max_new_tokens: int, seed: int
                    ) -> list[str]:
    """One completion of each conversation, the requests sent concurrently (the server batches them)."""
    with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(conversations))), "cftjax-chat") as pool:
      return list(pool.map(lambda m: self.complete(m, 1, temperature, max_new_tokens, seed)[0], conversations))


def chat_model(spec: Mapping[str, Any], where: str) -> CheckpointChat | EndpointChat:
  """A model from its config entry: {"ckpt": DIR} or {"endpoint": URL[, "model": NAME]}."""
  spec = dict(spec)
  unknown = sorted(set(spec) - {"ckpt", "endpoint", "model", "api_key"})
  if unknown or bool(spec.get("ckpt")) == bool(spec.get("endpoint")):
    raise ValueError(f"{where}: expected {{'ckpt': DIR}} or {{'endpoint': 'http://HOST:PORT/v1', 'model': NAME}}, "
                     f"got {spec}")
  if spec.get("ckpt"):
    return CheckpointChat(spec["ckpt"])
  return EndpointChat(spec["endpoint"], spec.get("model", ""), spec.get("api_key", "EMPTY"))
