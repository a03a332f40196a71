"""A random hidden-Markov "language" whose true next-token distribution is known exactly: a TFDS token dataset.

Hidden states are pairs ``(topic, state)``: ``num_topics`` topics of
``num_states`` states each (``K = num_topics · num_states``). Each step the
topic stays with probability ``1 − switch_prob`` (the chain moves within it by
the topic's own transition matrix) or switches to another topic, chosen
uniformly, entering at that topic's initial distribution. Each topic emits
from its own tables, so the topic read from the prompt governs the whole
continuation (a dependency across tens of tokens), while the state within a
topic gives short-range structure. Rows of every table are Dirichlet draws
from a seeded ``np.random.default_rng``: ``emission_concentration`` sets the
entropy of the language (small: peaked, nearly deterministic tokens; large:
close to uniform), ``transition_concentration`` how predictable the hidden
chain is.

Tokens: ``<pad>`` 0, ``<bos>`` 1, then ``num_symbols`` emitted symbols
(:func:`vocab_size` ``= num_symbols + 2``). A sequence is ``<bos>`` then
``prompt_length + response_length`` emitted symbols; the prompt is
``<bos>`` and the first ``prompt_length`` symbols, the response the rest.
Each record is one next-token row of length ``L = prompt_length +
response_length`` (``inputs``, ``targets`` with −1 on prompt positions,
``prompt_length`` = prompt tokens, ``<bos>`` included), as the ``arithmetic``
dataset writes them.

The truth is computable for any prefix by the forward algorithm
(Rabiner 1989): with ``b_0 = π`` the distribution of the first hidden
state, the next token after ``x_1 … x_t`` has probability
``p(x_{t+1} = v | x_{≤t}) = Σ_k b_t(k) E(k, v)``, where
``f_t ∝ b_{t−1} ⊙ E(·, x_t)`` (the filtered state) and ``b_t = f_t A``.
:func:`next_token_logprobs` computes it in JAX for a batch of rows
``(B, L) → (B, L, V)``; :func:`sequence_logprob` sums it over a continuation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from kdjax.data.builders._base import LocalBuilder
from kdjax.errors import ConfigError

PAD, BOS = 0, 1
FIRST_SYMBOL = 2
NAME = "hmm_lm"


@dataclasses.dataclass
class HmmConfig(tfds.core.BuilderConfig):
  """The language (sizes, concentrations, seed) and the splits' sizes and shapes."""

  num_topics: int = 4
  num_states: int = 6
  num_symbols: int = 20
  switch_prob: float = 0.01
  transition_concentration: float = 0.1
  emission_concentration: float = 0.05
  prompt_length: int = 8
  response_length: int = 24
  train_size: int = 20_000
  test_size: int = 1_000
  seed: int = 0

  def check(self) -> None:
    """Raise :class:`ConfigError` naming the first field out of range."""
    checks = (
      (self.num_topics >= 1 and self.num_states >= 1 and self.num_symbols >= 2, "num_topics/num_states/num_symbols"),
      (0.0 <= self.switch_prob <= 1.0, "switch_prob (in [0, 1])"),
      (self.transition_concentration > 0 and self.emission_concentration > 0, "the concentrations (> 0)"),
      (self.prompt_length >= 1 and self.response_length >= 1, "prompt_length/response_length (≥ 1)"),
    )
    for ok, what in checks:
      if not ok:
        raise ConfigError(f"hmm_lm config {self.name!r}: bad {what}")


class Hmm(NamedTuple):
  """A hidden-Markov language as probability tables (float64 NumPy, or arrays of any JAX dtype).

  Attributes:
    init: ``(K,)`` π, the first hidden state's distribution.
    trans: ``(K, K)`` A, ``A[i, j] = p(z_{t+1} = j | z_t = i)``.
    emit: ``(K, V)`` E, ``E[k, v] = p(x_t = v | z_t = k)``; zero on ``<pad>`` and ``<bos>``.
  """

  init: np.ndarray
  trans: np.ndarray
  emit: np.ndarray


def vocab_size(c: HmmConfig) -> int:
  return c.num_symbols + FIRST_SYMBOL


def make_hmm(c: HmmConfig) -> Hmm:
  """The language of config ``c``: deterministic in ``c.seed`` (see the module docstring)."""
  c.check()
  rng = np.random.default_rng(c.seed)
  t, s, m = c.num_topics, c.num_states, c.num_symbols
  local = rng.dirichlet(np.full(s, c.transition_concentration), size=(t, s))  # (T, S, S)
  enter = rng.dirichlet(np.ones(s), size=t)  # (T, S): where a topic is entered
  emit_sym = rng.dirichlet(np.full(m, c.emission_concentration), size=t * s)  # (K, M)
  other = (1.0 - np.eye(t)) / max(t - 1, 1) if t > 1 else np.ones((1, 1))
  stay = (1.0 - c.switch_prob) if t > 1 else 1.0
  trans = np.zeros((t, s, t, s))
  for a in range(t):
    trans[a, :, a, :] = stay * local[a]
    for b in range(t):
      if b != a:
        trans[a, :, b, :] += (1.0 - stay) * other[a, b] * enter[b][None, :]
  init = (enter / t).reshape(-1)
  emit = np.concatenate([np.zeros((t * s, FIRST_SYMBOL)), emit_sym], axis=1)
  return Hmm(init, trans.reshape(t * s, t * s), emit)


def sample(hmm: Hmm, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
  """``(n, length)`` int32 token ids of emitted symbols (no ``<bos>``) drawn from ``hmm``, vectorised over rows."""

  def draw(probs: np.ndarray) -> np.ndarray:  # (n, C) rows of probabilities → one index per row
    u = rng.random((len(probs), 1))
    return np.minimum((np.cumsum(probs, axis=1) < u).sum(axis=1), probs.shape[1] - 1)

  z = draw(np.broadcast_to(hmm.init, (n, len(hmm.init))))
  out = np.empty((n, length), np.int32)
  for i in range(length):
    out[:, i] = draw(hmm.emit[z])
    z = draw(hmm.trans[z])
  return out


def next_token_logprobs(hmm: Hmm, inputs: jax.Array) -> jax.Array:
  """``log p(x_{t+1} | x_{≤t})`` of every row position by the forward algorithm, traceable.

  Args:
    hmm: the language's tables (float32 is enough: beliefs are renormalised each step).
    inputs: ``(B, L)`` int token ids; position 0 is ``<bos>``; ``<pad>``/``<bos>`` elsewhere leave the belief
      unchanged.

  Returns:
    ``(B, L, V)`` float32 log-probabilities of the token after each position (``−inf`` where the language
    never emits a token: ``<pad>``, ``<bos>``).
  """
  init, trans, emit = (jnp.asarray(a, jnp.float32) for a in hmm)
  x = jnp.asarray(inputs, jnp.int32)
  b0 = jnp.broadcast_to(init, (x.shape[0], init.shape[0]))

  def step(b, tok):  # b (B, K): the next hidden state's distribution given the tokens so far
    f = b * emit[:, tok].T  # (B, K) filtered, unnormalised
    f = f / jnp.maximum(jnp.sum(f, axis=1, keepdims=True), 1e-30)
    nb = jnp.where((tok >= FIRST_SYMBOL)[:, None], f @ trans, b)
    return nb, nb

  _, beliefs = jax.lax.scan(step, b0, x[:, 1:].T)  # (L - 1, B, K)
  beliefs = jnp.concatenate([b0[None], beliefs], axis=0).transpose(1, 0, 2)  # (B, L, K)
  return jnp.log(beliefs @ emit)


def _hmm_from_name(name: str) -> Hmm | None:
  base, _, config = name.partition("/")
  if base.split(":")[0] != NAME:
    return None
  configs = {c.name: c for c in HmmLm.BUILDER_CONFIGS}
  config = config.split(":")[0] or HmmLm.DEFAULT_CONFIG_NAME
  if config not in configs:
    raise ConfigError(f"dataset {name!r}: no config {config!r} (configs: {', '.join(configs)})")
  return make_hmm(configs[config])


@functools.lru_cache(maxsize=8)
def truth(name: str) -> Hmm | None:
  """The true language of dataset ``name`` (``hmm_lm`` or ``hmm_lm/<config>``), or ``None`` for any other
  (one object per name: compiled metrics are keyed by it)."""
  return _hmm_from_name(name)


class HmmLm(LocalBuilder):
  """Continuations of a random hidden-Markov language, whose true distribution is known exactly."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Generated locally, stored as ArrayRecord."}
  BUILDER_CONFIGS = [
    HmmConfig(
      name="default",
      description="4 topics × 6 states, 20 symbols; prompts of 8 symbols, responses of 24; 20,000 / 1,000 rows.",
    ),
    HmmConfig(
      name="tiny",
      description="2 topics × 2 states, 3 symbols; prompts of 2, responses of 4; 200 / 50 rows (tests).",
      num_topics=2,
      num_states=2,
      num_symbols=3,
      switch_prob=0.1,
      emission_concentration=1.0,
      transition_concentration=1.0,
      prompt_length=2,
      response_length=4,
      train_size=200,
      test_size=50,
    ),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    length = c.prompt_length + c.response_length
    return self.token_info(length, vocab_size(c))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    rng = np.random.default_rng([c.seed, 1])  # the language is drawn from c.seed, the samples from this stream
    seqs = sample(make_hmm(c), c.train_size + c.test_size, c.prompt_length + c.response_length, rng)
    return {
      "train": self._generate_examples(seqs[: c.train_size]),
      "test": self._generate_examples(seqs[c.train_size :]),
    }

  def _generate_examples(self, seqs):
    p = self.builder_config.prompt_length
    for i, s in enumerate(seqs):
      seq = np.concatenate([[BOS], s]).astype(np.int32)
      targets = seq[1:].copy()
      targets[:p] = -1  # the model is not asked to predict the prompt
      yield i, {"inputs": seq[:-1], "targets": targets, "prompt_length": p + 1}
