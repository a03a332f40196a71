"""KV-cache generation against full recomputation, and the sampling masks against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import models
from kdjax.generate import Generator, Sampling, first_max, generate, sample, top_k_mask, top_p_mask

V, MAX_LEN, P, N = 23, 40, 7, 12


@pytest.fixture(scope="module")
def lm():
  return models.create(
    "transformer_lm", num_classes=V, num_layers=2, dim=32, num_heads=4, max_len=MAX_LEN, rngs=nnx.Rngs(3)
  )


def prompts_and_lengths(seed: int = 0, batch: int = 4):
  rng = np.random.default_rng(seed)
  lengths = np.array([P, 3, 5, 1][:batch], np.int32)
  prompts = np.zeros((batch, P), np.int32)
  for i, n in enumerate(lengths):
    prompts[i, :n] = rng.integers(1, V, n)
  return prompts, lengths


_forward = nnx.jit(lambda m, x: m(x).logits)


def next_logits(lm, seq: list[int]) -> np.ndarray:
  """The model's logits after ``seq``, by running the whole sequence (padded to one compiled length:
  causal attention makes the padding invisible to the last real position)."""
  x = np.zeros((1, MAX_LEN), np.int32)
  x[0, : len(seq)] = seq
  return np.asarray(_forward(lm, jnp.asarray(x))[0, len(seq) - 1], np.float64)


def recompute(lm, prompt: np.ndarray, n: int, stop: tuple[int, ...] = ()):
  """Greedy decoding by re-running the whole sequence for every token (no cache)."""
  seq, toks, logps = list(prompt), [], []
  for _ in range(n):
    logits = next_logits(lm, seq)
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    t = int(np.argmax(logits))
    toks.append(t)
    logps.append(logp[t])
    seq.append(t)
    if t in stop:
      break
  return toks, logps


@pytest.mark.parametrize("vocab_major", [False, True])
def test_kv_cache_greedy_equals_full_recompute_token_for_token(lm, vocab_major, monkeypatch):
  """Both layouts of the decode loop's logits: as ``decode`` returns them, and read vocabulary-major."""
  monkeypatch.setattr(lm, "vocab_major_logits", vocab_major, raising=False)
  prompts, lengths = prompts_and_lengths()
  out = jax.jit(lambda p, l: generate(lm, p, l, jax.random.key(0), Sampling(N, temperature=0.0)))(prompts, lengths)
  for i in range(len(lengths)):
    toks, logps = recompute(lm, prompts[i, : lengths[i]], N)
    assert np.asarray(out.tokens[i]).tolist() == toks
    # float32 logits over a 32-wide model, cached vs recomputed attention: ~1e-6 apart
    np.testing.assert_allclose(np.asarray(out.logprobs[i]), logps, atol=2e-5)
  assert np.asarray(out.lengths).tolist() == [N] * len(lengths)


def test_stop_tokens_end_each_sequence_and_pad_after(lm):
  prompts, lengths = prompts_and_lengths(1)
  ref = [recompute(lm, prompts[i, : lengths[i]], N)[0] for i in range(len(lengths))]
  stop = ref[1][3]  # sequence 1 stops at its 4th token; the others where this token first appears
  sampling = Sampling(N, temperature=0.0, stop_tokens=(stop,), pad_token=V - 1)
  out = generate(lm, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0), sampling)
  for i, toks in enumerate(ref):
    n = toks.index(stop) + 1 if stop in toks else N
    assert int(out.lengths[i]) == n
    assert np.asarray(out.tokens[i, :n]).tolist() == toks[:n]
    assert (np.asarray(out.tokens[i, n:]) == V - 1).all() and (np.asarray(out.logprobs[i, n:]) == 0).all()


def test_temperature_to_zero_equals_greedy(lm):
  prompts, lengths = prompts_and_lengths(2)
  gen_greedy = Generator(lm, Sampling(N, temperature=0.0))
  gen_cold = Generator(lm, Sampling(N, temperature=1e-6))
  greedy = gen_greedy(prompts, lengths, jax.random.key(0)).tokens
  for seed in range(3):
    np.testing.assert_array_equal(gen_cold(prompts, lengths, jax.random.key(seed)).tokens, greedy)


def test_sampled_tokens_stay_inside_top_k_and_keys_reproduce(lm):
  prompts, lengths = prompts_and_lengths(3)
  gen = Generator(lm, Sampling(N, temperature=1.5, top_k=3))
  a, b = gen(prompts, lengths, jax.random.key(5)), gen(prompts, lengths, jax.random.key(5))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, gen(prompts, lengths, jax.random.key(6)).tokens)
  for i in range(len(lengths)):
    seq = list(prompts[i, : lengths[i]])
    for t in np.asarray(a.tokens[i]):
      assert t in np.argsort(-next_logits(lm, seq))[:3]
      seq.append(int(t))


def _np_top_k(z: np.ndarray, k: int) -> np.ndarray:
  out = np.zeros(z.shape, bool)
  for idx in np.ndindex(z.shape[:-1]):
    row = z[idx]
    kth = sorted(row, reverse=True)[k - 1]
    out[idx] = row >= kth
  return out


def _np_top_p(z: np.ndarray, p: float) -> np.ndarray:
  out = np.zeros(z.shape, bool)
  for idx in np.ndindex(z.shape[:-1]):
    e = np.exp(z[idx].astype(np.float64) - z[idx].max())
    probs = e / e.sum()
    total, kept = 0.0, []
    for j in np.argsort(-probs, kind="stable"):
      if total >= p:
        break
      kept.append(j)
      total += probs[j]
    out[idx] = probs >= probs[kept].min() - 1e-7  # ties with the last kept token stay
  return out


@pytest.mark.parametrize(
  "shape, axis",
  [((5, 6, 7), -1), ((3, 1024), -1), ((1024, 3), 0), ((1000, 4), 0), ((2, 384, 3), 1)],
  ids=["no-blocks", "blocks-of-128", "vocabulary-major", "blocks-of-8", "middle-axis"],
)
def test_first_max_is_numpy_argmax_with_ties_to_the_first_index(shape, axis):
  """Greedy decoding's argmax, blocked or not, on few distinct values (ties within and across blocks)."""
  z = np.random.default_rng(1).integers(-3, 4, shape).astype(np.float32)
  np.moveaxis(z, axis, -1)[(0,) * (z.ndim - 1)] = -np.inf  # a row with no finite logit
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: first_max(a, axis))(z)), np.argmax(z, axis))


@pytest.mark.parametrize("k", [1, 2, 5, 0, V])
def test_top_k_mask_matches_numpy(k):
  z = np.random.default_rng(k).normal(size=(6, V)).astype(np.float32)
  z[0, :4] = z[0].max() + 1  # a four-way tie at the top
  want = np.ones(z.shape, bool) if k in (0, V) else _np_top_k(z, k)
  np.testing.assert_array_equal(np.asarray(top_k_mask(jnp.asarray(z), k)), want)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_mask_matches_numpy(p):
  z = (3 * np.random.default_rng(int(p * 1000)).normal(size=(8, V))).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(top_p_mask(jnp.asarray(z), p)), _np_top_p(z, p))


@pytest.mark.parametrize("top_k", [0, 5])
def test_sample_is_the_gumbel_max_draw_of_jax_random_categorical(top_k):
  """Sampled tokens are argmax(Gumbel noise + logits/T) over the kept tokens (NumPy's argmax on the same noise),
  and the tokens ``jax.random.categorical`` draws for the same key, so runs sampled before reproduce."""
  z = (3 * np.random.default_rng(top_k).normal(size=(8, V))).astype(np.float32)
  z[0, :3] = z[0].max() + 1  # a tie at the top: the first index wins
  sampling = Sampling(temperature=0.7, top_k=top_k)
  draw = jax.jit(lambda key: sample(key, jnp.asarray(z), sampling))
  kept = np.ones(z.shape, bool) if not top_k else _np_top_k(z / 0.7, top_k)
  masked = np.where(kept, z / 0.7, -np.inf).astype(np.float32)
  for i in range(20):
    key = jax.random.key(i)
    noise = np.asarray(jax.random.gumbel(key, z.shape, jnp.float32))
    got = np.asarray(draw(key))
    np.testing.assert_array_equal(got, np.argmax(noise + masked, axis=-1))
    np.testing.assert_array_equal(got, np.asarray(jax.random.categorical(key, jnp.asarray(masked), axis=-1)))
    assert kept[np.arange(8), got].all()


@pytest.mark.parametrize(
  "field,value",
  [
    ("max_new_tokens", 0),
    ("temperature", -1.0),
    ("temperature", float("inf")),
    ("top_k", -2),
    ("top_p", 0.0),
    ("top_p", 1.5),
  ],
)
def test_bad_sampling_is_one_line(field, value):
  with pytest.raises(ValueError, match=f"sampling.{field} must be"):
    Sampling(**{field: value})
