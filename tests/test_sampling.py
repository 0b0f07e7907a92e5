"""Sampler tests: greedy and cached decoding against full forward passes, filter statistics, stopping,
sampler-vs-trainer log-probs, compile reuse, and token-exact greedy parity with transformers."""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cftjax import sampling
from cftjax.models import Decoder, ModelConfig, init_cache, init_params
from cftjax.models.decoder import token_log_probs
from tests.full_forward import score_completions

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, attention_bias=True)
PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53]]
NEW_TOKENS = 12
# Sampled settings shared by the log-prob and recompilation tests (one compile for both).
TEMPERATURE, TOP_K, TOP_P, SAMPLED_STOP_IDS = 0.7, 8, 0.9, (7,)


FULL_WIDTH = 32  # full forward passes run on sequences right-padded to this width (one compile)


@pytest.fixture(scope="module")
def params():
  return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


@jax.jit
def _forward(params, tokens):
  return Decoder(CFG).apply({"params": params}, tokens)


@pytest.fixture(scope="module")
def greedy(params):
  return sampling.generate(params, CFG, PROMPTS, rng=jax.random.key(1), max_new_tokens=NEW_TOKENS,
                           temperature=0.0)


@pytest.fixture(scope="module")
def sampled(params):
  return sampling.generate(params, CFG, PROMPTS, rng=jax.random.key(2), max_new_tokens=NEW_TOKENS,
                           temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, stop_ids=SAMPLED_STOP_IDS)


def _full_logits(params, tokens: list[int]) -> np.ndarray:
  """Logits [seq, vocab] of one sequence by a full forward pass without a cache (causal, so the right
  padding to FULL_WIDTH leaves them unchanged)."""
  padded = np.zeros((1, FULL_WIDTH), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_forward(params, padded)[0, :len(tokens)])


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_bucket_length_and_padding():
  assert [sampling.bucket_length(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
  assert sampling.bucket_length(20, buckets=(8, 24, 64)) == 24
  with pytest.raises(ValueError, match="largest prompt bucket 64"):
    sampling.bucket_length(65, buckets=(8, 64))
  tokens, lengths = sampling.pad_prompts([[3, 4], [5, 6, 7]], pad_id=9)
  assert tokens.shape == (2, 16) and lengths.tolist() == [2, 3]
  assert tokens[0, :3].tolist() == [3, 4, 9] and (tokens[1, 3:] == 9).all()
  from_array = sampling.pad_prompts(np.array([[3, 4, 0, 0], [5, 6, 7, 0]]), [2, 3], pad_id=9)
  np.testing.assert_array_equal(from_array[0], tokens)
  with pytest.raises(ValueError, match="prompt row 1 is empty"):
    sampling.pad_prompts([[1], []])
  with pytest.raises(ValueError, match=r"rows \[1\] are outside \[1, 4\]"):
    sampling.pad_prompts(np.zeros((2, 4), np.int32), [2, 5])


def test_bad_arguments_are_named(params):
  call = lambda prompts, **kw: sampling.generate(params, CFG, prompts, rng=jax.random.key(0),
                                                 max_new_tokens=kw.pop("max_new_tokens", 4), **kw)
  with pytest.raises(ValueError, match=r"prompt rows \[1\].*vocab_size"):
    call([[1], [64]])
  with pytest.raises(ValueError, match="top_p=1.5"):
    call([[1]], top_p=1.5)
  with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
    call([[1]], stop_strings=("x",))
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    call([[1]], max_new_tokens=0)


def test_greedy_equals_stepwise_argmax_of_full_forward(params, greedy):
  for row, prompt in enumerate(PROMPTS):
    sequence = list(prompt)
    for _ in range(NEW_TOKENS):
      sequence.append(int(np.argmax(_full_logits(params, sequence)[-1])))
    assert greedy.tokens[row].tolist() == sequence[len(prompt):], f"row {row}"
  assert greedy.lengths.tolist() == [NEW_TOKENS] * len(PROMPTS)
  assert greedy.truncated.all()


def test_cached_decoding_equals_full_forward_logits(params):
  """The sampler's cache convention (right padding, slot = position) reproduces full-forward logits."""
  rng = np.random.default_rng(0)
  lengths = [3, 9, 5]
  steps, bucket = 6, 16
  sequences = [rng.integers(0, CFG.vocab_size, n + steps).tolist() for n in lengths]
  prompts, prompt_lengths = sampling.pad_prompts([s[:n] for s, n in zip(sequences, lengths)])
  apply = jax.jit(lambda tokens, positions, cache: Decoder(CFG).apply({"params": params}, tokens, positions,
                                                                      cache=cache))
  cache = init_cache(CFG, len(lengths), bucket + steps)
  logits, cache = apply(prompts, jnp.broadcast_to(jnp.arange(bucket), prompts.shape), cache)
  cached = [[np.asarray(logits[b, n - 1])] for b, n in enumerate(lengths)]
  for step in range(steps):
    tokens = jnp.asarray([[s[n + step]] for s, n in zip(sequences, lengths)], jnp.int32)
    logits, cache = apply(tokens, jnp.asarray(prompt_lengths)[:, None] + step, cache)
    for b in range(len(lengths)):
      cached[b].append(np.asarray(logits[b, 0]))
  for b, (sequence, n) in enumerate(zip(sequences, lengths)):
    full = _full_logits(params, sequence)[n - 1:]
    np.testing.assert_allclose(np.stack(cached[b]), full, atol=1e-5, rtol=0, err_msg=f"row {b}")


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 3, 1.0), (1.0, 0, 0.6), (1.0, 0, 0.5), (1.0, 4, 0.8), (0.5, 0, 0.7), (2.0, 0, 1.0)])
def test_filtered_sampling_frequencies(temperature, top_k, top_p):
  probs = np.array([0.07, 0.3, 0.02, 0.15, 0.25, 0.08, 0.1, 0.03])  # unsorted on purpose
  draws = 20000
  scaled = np.log(probs) / temperature
  order = np.argsort(-scaled, kind="stable")
  allowed = order[:top_k] if top_k else order
  kept = np.exp(scaled[allowed] - scaled[allowed].max())
  kept /= kept.sum()
  mass_before = np.cumsum(kept) - kept
  allowed, kept = allowed[mass_before < top_p], kept[mass_before < top_p]
  expected = np.zeros_like(probs)
  expected[allowed] = kept / kept.sum()

  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (draws, probs.size))
  tokens = jax.jit(sampling.sample_tokens, static_argnames=("greedy", "top_k", "use_top_p"))(
      jax.random.key(3), logits, jnp.float32(temperature), jnp.float32(top_p), greedy=False, top_k=top_k,
      use_top_p=top_p < 1.0)
  frequencies = np.bincount(np.asarray(tokens), minlength=probs.size) / draws
  assert (frequencies[expected == 0] == 0).all(), (frequencies, expected)
  tolerance = 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-9
  assert (np.abs(frequencies - expected) <= tolerance).all(), (frequencies, expected)


def test_greedy_sampling_picks_argmax():
  logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 2.9, 0.0]], jnp.float32)
  tokens = sampling.sample_tokens(jax.random.key(0), logits, jnp.float32(1.0), jnp.float32(1.0), greedy=True,
                                  top_k=0, use_top_p=False)
  assert tokens.tolist() == [1, 0]


def _expected_cut(base: sampling.GenerationResult, row: int, end: int | None):
  """The row of `base` (run without stops) ended after `end` tokens (None: no stop)."""
  tokens = base.tokens[row].copy()
  if end is not None:
    tokens[end:] = 0
  return tokens, end or NEW_TOKENS, end is None


def _check_rows(result, base, ends):
  for row, end in enumerate(ends):
    tokens, length, truncated = _expected_cut(base, row, end)
    assert result.tokens[row].tolist() == tokens.tolist(), f"row {row}"
    assert (result.lengths[row], result.truncated[row]) == (length, truncated), f"row {row}"
    np.testing.assert_array_equal(result.logprobs[row, length:], 0.0)
    np.testing.assert_allclose(result.logprobs[row, :length], base.logprobs[row, :length], atol=1e-6)


def test_stop_ids_end_rows(params, greedy):
  stop = int(greedy.tokens[0, 4])
  result = sampling.generate(params, CFG, PROMPTS, rng=jax.random.key(1), max_new_tokens=NEW_TOKENS,
                             temperature=0.0, stop_ids=(stop, CFG.vocab_size - 1))
  ends = []
  for row in range(len(PROMPTS)):
    hits = np.nonzero(np.isin(greedy.tokens[row], (stop, CFG.vocab_size - 1)))[0]
    ends.append(int(hits[0]) + 1 if hits.size else None)
  assert ends[0] is not None and ends[0] <= 5
  _check_rows(result, greedy, ends)


class CharTokenizer:
  """One character per token id (ids index ALPHABET), enough to exercise host-side stop strings."""

  ALPHABET = string.ascii_letters + string.digits + "[]"

  def decode(self, ids, skip_special_tokens=False):
    return "".join(self.ALPHABET[i] for i in ids)


def test_stop_strings_cut_after_first_match(params, greedy):
  tokenizer = CharTokenizer()
  texts = [tokenizer.decode(row) for row in greedy.tokens.tolist()]
  stop = texts[0][5:7]
  absent = "[END]"
  result = sampling.generate(params, CFG, PROMPTS, rng=jax.random.key(1), max_new_tokens=NEW_TOKENS,
                             temperature=0.0, stop_strings=(absent, stop), tokenizer=tokenizer)
  ends = [text.find(stop) + len(stop) if stop in text else None for text in texts]
  assert ends[0] is not None and ends[0] <= 7
  _check_rows(result, greedy, ends)


def test_sampler_logprobs_equal_trainer_logprobs(params, sampled):
  assert sampled.lengths.min() >= 1
  width = max(len(p) for p in PROMPTS) + NEW_TOKENS
  tokens = np.zeros((len(PROMPTS), width), np.int32)
  mask = np.zeros_like(tokens)
  expected = np.zeros(tokens.shape, np.float32)
  for row, prompt in enumerate(PROMPTS):
    n, m = len(prompt), int(sampled.lengths[row])
    tokens[row, :n + m] = prompt + sampled.tokens[row, :m].tolist()
    mask[row, n:n + m] = 1
    expected[row, n:n + m] = sampled.logprobs[row, :m]
    # Rows end at a stop id or at max_new_tokens; padding after the end.
    stopped = sampled.tokens[row, m - 1] in SAMPLED_STOP_IDS
    assert sampled.truncated[row] == (not stopped) and (stopped or m == NEW_TOKENS), row
    assert (sampled.tokens[row, m:] == 0).all()

  scored = score_completions(params, CFG, tokens, mask, TEMPERATURE)
  np.testing.assert_allclose(scored, expected, atol=1e-5, rtol=0)
  logits = _forward(params, jnp.asarray(tokens))
  trainer = np.asarray(token_log_probs(logits[:, :-1], jnp.asarray(tokens[:, 1:]), TEMPERATURE))
  np.testing.assert_allclose(scored[:, 1:] * mask[:, 1:], trainer * mask[:, 1:], atol=1e-5, rtol=0)

  # Every sampled token lies inside the top-k / top-p set of its temperature-scaled distribution.
  for row, prompt in enumerate(PROMPTS):
    n, m = len(prompt), int(sampled.lengths[row])
    row_logits = np.asarray(logits[row, n - 1:n + m - 1], np.float64) / TEMPERATURE
    for step, token in enumerate(tokens[row, n:n + m]):
      order = np.argsort(-row_logits[step])[:TOP_K]
      kept = np.exp(_np_log_softmax(row_logits[step][order]))
      rank = int(np.nonzero(order == token)[0][0])
      assert kept[:rank].sum() < TOP_P + 1e-6, (row, step)


def test_second_call_with_same_shapes_does_not_recompile(params, sampled):
  other_prompts = [[3, 1], [7] * 11, [2, 4, 6, 8]]  # same batch size and bucket (16) as PROMPTS
  rng = jax.random.key(5)
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    sampling.generate(params, CFG, other_prompts, rng=rng, max_new_tokens=NEW_TOKENS, temperature=0.9,
                      top_k=TOP_K, top_p=0.8, stop_ids=SAMPLED_STOP_IDS)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not [e for e in compiles if "compile" in e or "trace" in e], compiles


def test_greedy_matches_transformers_generate(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_io = pytest.importorskip("cftjax.models.hf_io")
  torch.manual_seed(0)
  hf_config = transformers.Qwen2Config(
      vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
      eos_token_id=None, bos_token_id=None, pad_token_id=None)
  model = transformers.Qwen2ForCausalLM(hf_config).eval()
  model.save_pretrained(tmp_path, safe_serialization=True)
  cfg, hf_params = hf_io.load_hf(str(tmp_path), dtype=np.float32)

  prompts = [[3, 17, 42, 8, 90], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]]
  ours = sampling.generate(hf_params, cfg, prompts, rng=jax.random.key(0), max_new_tokens=32, temperature=0.0)
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      theirs = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                              eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt),
                                                                                         dtype=torch.long))
    assert ours.tokens[row].tolist() == theirs[0, len(prompt):].tolist(), f"row {row}"
