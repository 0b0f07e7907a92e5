"""`cftjax serve`: a real uvicorn server in a subprocess, answered by the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import urllib.error
import urllib.request

import jax
import openai
import pytest

from cftjax import cli, sampling
from cftjax.data import synthetic
from cftjax.models import ModelConfig, init_params
from cftjax.models import checkpoint_io
from cftjax.models.checkpoint_io import save_model_checkpoint
from cftjax.serve.engine import Engine, GenerationRequest, SamplingSettings, cut_at_stop_strings, split_to_context
from cftjax.tokenizer import Tokenizer
from tests.served import start_server, stop_server

CONTEXT = 96
PROMPTS = ["What is 1 + 2?", "Is 7 prime?", "Name a colour.", "What is 10 + 20?", "Say hi.", "Count to 3.",
           "What is 2 * 4?", "Spell cat."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  paths = synthetic.write_world(str(root / "world"), num_train=20, num_heldout=4)
  tokenizer = Tokenizer.from_dir(paths["tokenizer"])
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=CONTEXT)
  save_model_checkpoint(str(root / "critic"), cfg, init_params(cfg, jax.random.key(3)), paths["tokenizer"])
  return str(root / "critic")


@pytest.fixture(scope="module")
def server(checkpoint):
  base, proc = start_server(checkpoint, "--batch-window-ms", "300", "--max-batch", "8")
  yield base
  code, log = stop_server(proc)
  assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log


def _get(url: str) -> dict:
  with urllib.request.urlopen(url, timeout=30) as response:
    return json.load(response)


def _post(url: str, data: bytes) -> tuple[int, dict]:
  request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.load(response)
  except urllib.error.HTTPError as e:
    return e.code, json.load(e)


def _client(base: str) -> openai.OpenAI:
  return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)


def test_chat_completion_equals_cftjax_generate(server, checkpoint, capsys):
  assert cli.main(["generate", "--ckpt", checkpoint, "--prompt", PROMPTS[0], "--max-new-tokens", "8"]) == 0
  expected = capsys.readouterr().out.removesuffix("\n")
  reply = _client(server).chat.completions.create(
      model="critic", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=0)
  assert reply.choices[0].message.content == expected
  assert reply.usage.completion_tokens <= 8 and reply.choices[0].finish_reason in ("stop", "length")
  streamed = _client(server).chat.completions.create(
      model="critic", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=0,
      stream=True)
  assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == expected


def test_text_completion_equals_the_sampler(server, checkpoint):
  cfg, params, tokenizer = checkpoint_io.load_model(checkpoint)
  ids = tokenizer.encode("Question: 3 + 4", add_special_tokens=True)
  result = sampling.generate(params, cfg, [ids], rng=jax.random.key(0), max_new_tokens=8, temperature=0.0,
                             stop_ids=tokenizer.eos_ids, pad_id=sampling.pad_id(tokenizer))
  expected = tokenizer.decode(result.tokens[0, :result.lengths[0]].tolist(), skip_special_tokens=True)
  reply = _client(server).completions.create(model="critic", prompt="Question: 3 + 4", max_tokens=8, temperature=0)
  assert reply.choices[0].text == expected
  assert reply.usage.prompt_tokens == len(ids)


def test_concurrent_requests_are_batched(server):
  before = _get(f"{server}/health")
  client = _client(server)

  def ask(prompt: str) -> str:
    reply = client.chat.completions.create(model="critic", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=4, temperature=0)
    return reply.choices[0].message.content

  with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
    answers = list(pool.map(ask, PROMPTS))
  after = _get(f"{server}/health")
  assert len(answers) == len(PROMPTS) and all(isinstance(a, str) for a in answers)
  assert after["requests"] - before["requests"] == len(PROMPTS)
  assert after["batches"] - before["batches"] < len(PROMPTS)
  assert after["largest_batch"] > 1


def test_seeded_sampling_is_reproducible_and_n_gives_n_choices(server):
  client = _client(server)
  first, second = (client.completions.create(model="critic", prompt="Hello", max_tokens=6, temperature=1.0,
                                             seed=11, n=3) for _ in range(2))
  assert [c.text for c in first.choices] == [c.text for c in second.choices]
  assert [c.index for c in first.choices] == [0, 1, 2]


def test_bad_requests_name_the_field(server):
  client = _client(server)
  with pytest.raises(openai.NotFoundError, match="serves 'critic'"):
    client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
  with pytest.raises(openai.BadRequestError, match="max_tokens") as error:
    client.completions.create(model="critic", prompt="x", max_tokens=CONTEXT)
  assert error.value.body["param"] == "max_tokens"
  with pytest.raises(openai.BadRequestError, match="logprobs"):
    client.completions.create(model="critic", prompt="x", max_tokens=2, logprobs=2)
  with pytest.raises(openai.BadRequestError, match="temperature"):
    client.completions.create(model="critic", prompt="x", max_tokens=2, temperature=-1)
  status, body = _post(f"{server}/v1/chat/completions", b"{not json")
  assert status == 400 and "not valid JSON" in body["error"]["message"]
  status, body = _post(f"{server}/v1/chat/completions", json.dumps({"model": "critic", "messages": []}).encode())
  assert status == 400 and body["error"]["param"] == "messages"
  with pytest.raises(openai.BadRequestError, match="continue_final_message") as error:  # the last turn is the user's
    client.chat.completions.create(model="critic", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                   extra_body={"continue_final_message": True, "add_generation_prompt": False})
  assert error.value.body["param"] == "continue_final_message"
  with pytest.raises(openai.BadRequestError, match="must be true or false"):
    client.chat.completions.create(model="critic", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                   extra_body={"add_generation_prompt": "no"})
  assert [m.id for m in client.models.list()] == ["critic"]


def test_stop_strings_and_context_split():
  assert cut_at_stop_strings("a. b. c", [". c", "."]) == ("a", True)
  assert cut_at_stop_strings("abc", ["x"]) == ("abc", False)
  items = [(GenerationRequest((1,) * n, m), None) for n, m in [(10, 50), (60, 20), (5, 5), (30, 60)]]
  batches = split_to_context(items, 90)
  assert sorted(len(r.prompt_ids) for b in batches for r, _ in b) == [5, 10, 30, 60]
  for batch in batches:
    assert max(len(r.prompt_ids) for r, _ in batch) + max(r.max_new_tokens for r, _ in batch) <= 90
  assert split_to_context(items, None) == [items]


def test_engine_cuts_each_row_to_its_own_request(checkpoint):
  cfg, params, tokenizer = checkpoint_io.load_model(checkpoint)
  engine = Engine(params, cfg, tokenizer, max_batch_rows=4, batch_window_s=0.5)
  try:
    ids = tokenizer.encode("Is 9 prime?", add_special_tokens=True)
    greedy = SamplingSettings(temperature=0.0)
    futures = [engine.submit(GenerationRequest(tuple(ids), n, greedy)) for n in (3, 7)]
    short, long = (f.result(timeout=300) for f in futures)
  finally:
    engine.close()
  assert engine.stats.batches == 1 and engine.stats.largest_batch == 2
  assert len(short.token_ids) <= 3 and len(long.token_ids) <= 7
  assert long.token_ids[:len(short.token_ids)] == short.token_ids
