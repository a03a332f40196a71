"""Fused token losses (kdjax.losses.fused): the output projection and the divergence chunk by chunk.

Each loss, chunked, equals the same loss on the full (B, L, V) logits — values against NumPy, gradients
w.r.t. both heads' hidden states, kernels and biases against the unchunked JAX loss — at chunk sizes
that do not divide L, with masks and padding; XLA's memory analysis shows the chunked step never holds
(B, L, V) arrays; the zoo LM's and the Decoder's heads give their logits; the methods use the heads.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as kdl
from kdjax import methods
from kdjax.errors import ConfigError
from kdjax.losses import fused
from kdjax.methods.base import Context, InitInfo, ModelInfo
from kdjax.methods.config import MethodConfig
from kdjax.models.base import ModelOutput

B, L, D, DT, V = 2, 7, 5, 6, 11
RTOL = 1e-5

# name → (the unchunked loss on logits, its top-k form, hyper-parameters)
LOSSES = {
  "forward_kl": (kdl.forward_kl, kdl.topk_forward_kl, {}),
  "reverse_kl": (kdl.reverse_kl, kdl.topk_reverse_kl, {}),
  "generalized_jsd": (kdl.generalized_jsd, kdl.topk_generalized_jsd, {"beta": 0.3}),
  "tvd": (kdl.tvd, kdl.topk_tvd, {}),
  "skew_kl": (kdl.skew_kl, kdl.topk_skew_kl, {"alpha": 0.2}),
  "skew_reverse_kl": (kdl.skew_kl, kdl.topk_skew_kl, {"alpha": 0.2, "reverse": True}),
}


def _inputs(seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  return {
    "hs": jax.random.normal(k[0], (B, L, D)),
    "ws": jax.random.normal(k[1], (D, V)),
    "bs": jax.random.normal(k[2], (V,)),
    "ht": jax.random.normal(k[3], (B, L, DT)),
    "wt": jax.random.normal(k[4], (DT, V)) * 1.5,
  }


# padding at the ends of both rows, a hole in the middle
MASK = jnp.array([[1, 1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0]], bool)


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_divergence(name, lps, lpt, beta=0.5, alpha=0.1, reverse=False):
  """The per-token divergences, from their formulas, in float64."""
  ps, pt = np.exp(lps), np.exp(lpt)
  kl = lambda a, b: (np.exp(a) * (a - b)).sum(-1)  # noqa: E731
  if name == "forward_kl":
    return kl(lpt, lps)
  if name == "reverse_kl":
    return kl(lps, lpt)
  if name == "generalized_jsd":
    lm = np.log((1 - beta) * ps + beta * pt)
    return beta * kl(lpt, lm) + (1 - beta) * kl(lps, lm)
  if name == "tvd":
    return 0.5 * np.abs(pt - ps).sum(-1)
  first, second = (lps, lpt) if reverse else (lpt, lps)
  return kl(first, np.log(alpha * np.exp(first) + (1 - alpha) * np.exp(second)))


def _fused_name(name):
  return "skew_kl" if name == "skew_reverse_kl" else name


def _close(got, want):
  """Equal to float32 rounding: rtol 1e-5 of each array's scale (elements near 0 compared at that scale)."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * float(np.max(np.abs(w))))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_fused_equals_unchunked(name):
  """Two heads at chunks of 3 positions (L = 7), a top-k teacher and dense teacher logits: each value
  against NumPy or the plain loss, and the gradient of their weighted sum w.r.t. every producer (both
  heads' hidden states, kernels, the student's bias) against the plain losses' (one compiled program)."""
  ref, ref_topk, hyper = LOSSES[name]
  div = _fused_name(name)
  x = _inputs()
  lp, idx = kdl.teacher_topk(x["ht"] @ x["wt"], 4)
  weights = (1.0, 0.37, 0.61)

  def chunked(hs, ws, bs, ht, wt):
    s, t = fused.TokenHead(hs, ws, bs), fused.TokenHead(ht, wt)
    heads = kdl.fused_token_loss(div, s, t, MASK, chunk_size=3, temperature=2.0, **hyper)
    topk = kdl.fused_token_loss(div, s, (lp, idx), MASK, chunk_size=4, **hyper)
    dense = kdl.fused_token_loss(div, s, ht @ wt, MASK, chunk_size=5, **hyper)
    return heads, topk, dense

  def plain(hs, ws, bs, ht, wt):
    z = hs @ ws + bs
    head = ref(z, ht @ wt, mask=MASK, temperature=2.0, **hyper)
    return head, ref_topk(z, lp, idx, mask=MASK, **hyper), ref(z, ht @ wt, mask=MASK, **hyper)

  def values_and_grad(fn):
    args = (x["hs"], x["ws"], x["bs"], x["ht"], x["wt"])
    weighted = lambda *a: sum(w * v for w, v in zip(weights, fn(*a)))  # noqa: E731
    return fn(*args), jax.grad(weighted, argnums=range(5))(*args)

  (got_v, got_g), (want_v, want_g) = jax.jit(lambda: (values_and_grad(chunked), values_and_grad(plain)))()
  _close(got_v, want_v)
  _close(got_g, want_g)
  zs = np.asarray(x["hs"] @ x["ws"] + x["bs"], np.float64) / 2.0
  zt = np.asarray(x["ht"] @ x["wt"], np.float64) / 2.0
  per = _np_divergence(name, _np_log_softmax(zs), _np_log_softmax(zt), **hyper)
  m = np.asarray(MASK, np.float64)
  np.testing.assert_allclose(got_v[0], (per * m).sum() / m.sum(), rtol=RTOL)
  assert float(jnp.abs(got_g[3]).sum()) > 0  # the teacher's producers get their gradient too


@pytest.mark.slow
def test_fused_cross_entropy_and_argmax():
  x = _inputs(2)
  labels = jax.random.randint(jax.random.key(3), (B, L), -1, V)

  def plain(hs, ws, bs):
    z = hs @ ws + bs
    nll = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, jnp.maximum(labels, 0)[..., None], -1)[..., 0]
    w = (MASK & (labels >= 0)).astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.sum(w)

  def chunked(hs, ws, bs):
    return kdl.fused_cross_entropy(fused.TokenHead(hs, ws, bs), labels, MASK, chunk_size=3)

  args = (x["hs"], x["ws"], x["bs"])
  vg = lambda fn: jax.value_and_grad(fn, argnums=range(3))(*args)  # noqa: E731
  (value, grads), (_, want) = jax.jit(lambda: (vg(chunked), vg(plain)))()
  z = np.asarray(x["hs"] @ x["ws"] + x["bs"], np.float64)
  lab = np.asarray(labels)
  nll = -np.take_along_axis(_np_log_softmax(z), np.maximum(lab, 0)[..., None], -1)[..., 0]
  w = np.asarray(MASK) & (lab >= 0)
  np.testing.assert_allclose(value, nll[w].mean(), rtol=RTOL)
  head = fused.TokenHead(x["hs"], x["ws"], x["bs"])
  one_chunk = jax.jit(lambda: kdl.fused_cross_entropy(head, labels, MASK, chunk_size=16))()  # longer than L
  np.testing.assert_allclose(one_chunk, nll[w].mean(), rtol=RTOL)
  _close(grads, want)
  np.testing.assert_array_equal(kdl.token_argmax(head, 3), np.argmax(z, -1))


@pytest.mark.slow
def test_tied_softcapped_cut_head():
  """A head tied to a (V', D) embedding, soft-capped and cut to its first V columns (Gemma 2, padded
  vocabularies) gives the same logits chunked and whole, and the losses follow it."""
  x = _inputs(4)
  emb = jax.random.normal(jax.random.key(5), (V + 3, D))
  head = fused.TokenHead(x["hs"], emb, None, softcap=3.0, vocab=V, transposed=True)
  z = 3.0 * np.tanh(np.asarray(x["hs"] @ emb.T, np.float64) / 3.0)[..., :V]
  np.testing.assert_allclose(head.logits(), z, rtol=RTOL, atol=1e-6)
  assert head.vocab_size == V
  t = fused.TokenHead(x["ht"], x["wt"])

  def grad_emb(chunked):
    def f(e):
      h = dataclasses.replace(head, kernel=e)
      if chunked:
        return kdl.fused_token_loss("forward_kl", h, t, MASK, chunk_size=2)
      return kdl.forward_kl(h.logits(), t.logits(), mask=MASK)

    return jax.value_and_grad(f)(emb)

  _close(*jax.jit(lambda: (grad_emb(True), grad_emb(False)))())


@pytest.mark.slow
@pytest.mark.parametrize("topk", [False, True])
def test_one_pass_group_equals_the_separate_losses(topk):
  """CE, forward KL at T = 2 and reverse KL (another mask) in one pass over the student's head: each value
  against NumPy, the accuracy against NumPy's (the label's logit reaches the row maximum, ties count), and
  the weighted total's value and gradients against the sum of the separate unchunked losses."""
  x = _inputs(8)
  labels = jax.random.randint(jax.random.key(9), (B, L), -1, V)
  labels = labels.at[0, 0].set(int(jnp.argmax(x["hs"][0, 0] @ x["ws"] + x["bs"])))  # at least one hit
  other = MASK.at[1, 1].set(False)
  lp, idx = kdl.teacher_topk(x["ht"] @ x["wt"], 4)
  weights = (0.3, 0.9, 0.45)

  def grouped(hs, ws, bs, ht, wt):
    teacher = (lp, idx) if topk else fused.TokenHead(ht, wt)
    parts = (
      kdl.TokenPart(kdl.CROSS_ENTROPY, weights[0], MASK),
      kdl.TokenPart("forward_kl", weights[1], MASK, temperature=2.0),
      kdl.TokenPart("reverse_kl", weights[2], other),
    )
    return kdl.fused_token_losses(fused.TokenHead(hs, ws, bs), parts, teacher, labels, chunk_size=3)

  def plain(hs, ws, bs, ht, wt):
    z = hs @ ws + bs
    nll = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, jnp.maximum(labels, 0)[..., None], -1)[..., 0]
    w = (MASK & (labels >= 0)).astype(jnp.float32)
    if topk:
      fkl, rkl = (
        kdl.topk_forward_kl(z, lp, idx, mask=MASK, temperature=2.0),
        kdl.topk_reverse_kl(z, lp, idx, mask=other),
      )
    else:
      fkl, rkl = kdl.forward_kl(z, ht @ wt, mask=MASK, temperature=2.0), kdl.reverse_kl(z, ht @ wt, mask=other)
    return weights[0] * jnp.sum(nll * w) / jnp.sum(w) + weights[1] * fkl + weights[2] * rkl

  args = (x["hs"], x["ws"], x["bs"], x["ht"], x["wt"])
  out, got_g, (want, want_g) = jax.jit(
    lambda: (grouped(*args), jax.grad(lambda *a: grouped(*a).total, argnums=range(3))(*args),
             jax.value_and_grad(plain, argnums=range(3))(*args))
  )()  # fmt: skip
  _close(out.total, want)
  _close(got_g, want_g)
  z = np.asarray(x["hs"] @ x["ws"] + x["bs"], np.float64)
  lab, m, m2 = np.asarray(labels), np.asarray(MASK), np.asarray(other)
  nll = -np.take_along_axis(_np_log_softmax(z), np.maximum(lab, 0)[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.values[0], nll[m & (lab >= 0)].mean(), rtol=RTOL)
  if not topk:
    zt = np.asarray(x["ht"] @ x["wt"], np.float64)
    fkl = _np_divergence("forward_kl", _np_log_softmax(z / 2), _np_log_softmax(zt / 2))
    rkl = _np_divergence("reverse_kl", _np_log_softmax(z), _np_log_softmax(zt))
    np.testing.assert_allclose(out.values[1:], [fkl[m].mean(), rkl[m2].mean()], rtol=RTOL)
  hit = np.take_along_axis(z, np.maximum(lab, 0)[..., None], -1)[..., 0] >= z.max(-1)
  assert 0 < out.accuracy < 1
  np.testing.assert_allclose(out.accuracy, hit[lab >= 0].mean(), rtol=1e-6)


def test_group_errors_are_one_line():
  head = fused.TokenHead(jnp.zeros((2, 4, 3)), jnp.zeros((3, 10)))
  ce, kl = kdl.TokenPart(kdl.CROSS_ENTROPY), kdl.TokenPart("forward_kl")
  with pytest.raises(ConfigError, match="needs the group's labels"):
    kdl.fused_token_losses(head, (ce,), chunk_size=2)
  with pytest.raises(ConfigError, match="needs a teacher"):
    kdl.fused_token_losses(head, (kl,), labels=jnp.zeros((2, 4), jnp.int32), chunk_size=2)
  with pytest.raises(ConfigError, match="TokenPart.loss must be one of"):
    kdl.fused_token_losses(head, (kdl.TokenPart("kl"),), head, chunk_size=2)
  with pytest.raises(ConfigError, match="parts must be"):
    kdl.fused_token_losses(head, ("forward_kl",), head, chunk_size=2)
  with pytest.raises(ConfigError, match="labels"):
    kdl.fused_token_losses(head, (ce,), labels=jnp.zeros((2, 5), jnp.int32), chunk_size=2)


def _memory(fn, *args):
  return jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_chunked_memory_is_bounded():
  """XLA's memory analysis of value-and-grad: the fused loss holds a few (B, C, V) chunks and the kernel's
  gradient, not the (B, L, V) logits, log-softmaxes and their gradients of the plain loss."""
  b, length, d, v, chunk = 2, 64, 16, 4096, 8
  k = jax.random.split(jax.random.key(0), 4)
  hs, ws = jax.random.normal(k[0], (b, length, d)), jax.random.normal(k[1], (d, v))
  ht, wt = jax.random.normal(k[2], (b, length, d)), jax.random.normal(k[3], (d, v))
  stop = jax.lax.stop_gradient

  def chunked(hs, ws, ht, wt):
    return kdl.fused_token_loss("forward_kl", fused.TokenHead(hs, ws), stop(fused.TokenHead(ht, wt)), chunk_size=chunk)

  def plain(hs, ws, ht, wt):
    return kdl.forward_kl(hs @ ws, stop(ht @ wt))

  full, one_chunk = b * length * v * 4, b * chunk * v * 4
  got, ref = _memory(chunked, hs, ws, ht, wt), _memory(plain, hs, ws, ht, wt)
  assert ref >= 2 * full  # the plain loss holds several (B, L, V) arrays
  assert got <= 6 * one_chunk + d * v * 4 < full, (got, one_chunk, full)


def test_resolve_chunk_and_errors():
  small = fused.TokenHead(jnp.zeros((2, 4, 3)), jnp.zeros((3, 100)))
  large = fused.TokenHead(jnp.zeros((2, 4, 3)), jnp.zeros((3, fused.FUSED_MIN_VOCAB)))
  assert kdl.resolve_chunk(None, None) is None and kdl.resolve_chunk(small, None) is None
  assert kdl.resolve_chunk(large, None) == fused.AUTO_CHUNK_ROWS // 2  # rows, at a small vocabulary
  huge = fused.TokenHead(jnp.zeros((2, 4, 3)), jnp.zeros((3, 151_936)))
  assert kdl.resolve_chunk(huge, None) == fused.AUTO_CHUNK_LOGITS // (2 * 151_936) == 55  # logits
  assert kdl.resolve_chunk(large, 0) is None and kdl.resolve_chunk(small, 5) == 5
  with pytest.raises(ConfigError, match="chunk_size"):
    kdl.fused_token_loss("forward_kl", small, small, chunk_size=0)
  with pytest.raises(ConfigError, match="loss must be one of"):
    kdl.fused_token_loss("kl", small, small, chunk_size=2)
  with pytest.raises(ConfigError, match="teacher_logits"):
    kdl.fused_token_loss("tvd", small, jnp.zeros((2, 4, 99)), chunk_size=2)
  with pytest.raises(ConfigError, match="token_chunk"):
    MethodConfig(name="forward_kl", token_chunk=-1)


@pytest.mark.slow
@pytest.mark.parametrize("name,topk", [("gkd", True), ("skew_reverse_kl", False)])
def test_methods_use_the_heads(name, topk):
  """A token preset (+ CE) on outputs that carry heads: fused (token_chunk=3) equals the plain logits
  path (token_chunk=0), loss and gradient w.r.t. the student's head."""
  x = _inputs(6)
  labels = jax.random.randint(jax.random.key(7), (B, L), 0, V).at[0, 1].set(-1)
  batch = {"label": labels, "mask": MASK}
  t_head = fused.TokenHead(x["ht"], x["wt"])
  if topk:
    lp, idx = kdl.teacher_topk(t_head.logits(), 4)
    t = ModelOutput(kdl.topk_to_logits(lp, idx, V), {}, topk_logp=lp, topk_idx=idx)
  else:
    t = ModelOutput(t_head.logits(), {}, head=t_head)
  info = ModelInfo("lm", V, {})
  ctx = Context(step=jnp.int32(1), epoch=jnp.float32(1.0), key=jax.random.key(0))

  def total(chunk, hs, ws):
    m = methods.build(MethodConfig(name=name, terms=("ce=0.5",), token_chunk=chunk), info, info)
    head = fused.TokenHead(hs, ws)
    s = ModelOutput(head.logits(), {}, head=head)
    params, state = m.init(jax.random.key(0), s, t, InitInfo(info, info, 4))
    return m.loss(params, state, s, t, batch, ctx)[0]

  vg = lambda chunk: jax.value_and_grad(lambda *a: total(chunk, *a), argnums=(0, 1))(x["hs"], x["ws"])  # noqa: E731
  got, want = jax.jit(lambda: (vg(3), vg(0)))()
  _close(got, want)


@pytest.mark.slow
def test_model_heads_give_their_logits():
  """The zoo LM's head and a tied, soft-capped, cut Decoder head reproduce the models' logits."""
  from flax import nnx

  from kdjax.models import create
  from kdjax.models.decoder import Decoder, DecoderConfig

  tokens = jnp.array([[1, 5, 2, 7], [3, 3, 0, 9]], jnp.int32)
  cfg = DecoderConfig(
    family="gemma2", vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
    intermediate_size=16, max_positions=8, tie_embeddings=True, final_softcap=5.0, output_vocab=13,
  )  # fmt: skip

  @jax.jit
  def outputs():  # built and run in one compiled program (eager NNX runs op by op)
    lm = create("transformer_lm", num_classes=13, num_layers=1, dim=8, num_heads=2, max_len=8, rngs=nnx.Rngs(0))
    return [(o.head, o.head.logits(), o.logits) for o in (lm(tokens), Decoder(cfg, rngs=nnx.Rngs(1))(tokens))]

  (lm_head, *lm_z), (dec_head, *dec_z) = outputs()
  for head, (from_head, logits) in ((lm_head, lm_z), (dec_head, dec_z)):
    assert head.vocab_size == 13 and logits.shape == (2, 4, 13)
    np.testing.assert_allclose(from_head, logits, rtol=1e-5, atol=1e-6)
  assert not lm_head.transposed and dec_head.transposed and dec_head.softcap == 5.0 and dec_head.kernel.shape == (16, 8)


@pytest.mark.slow
def test_eight_devices_and_vocabulary_split():
  """On 8 forced CPU devices: the fused losses with the batch split over ``data`` and both heads'
  vocabularies split over ``model`` equal the single-device values and gradients, and the compiled
  step gathers no vocabulary-sized array."""
  script = Path(__file__).with_name("_fused_devices.py")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "ok" in out.stdout


@pytest.mark.slow
def test_distiller_step_fused_equals_plain():
  """One KD step of a tiny LM pair (0.1·CE + 0.9·forward KL) through the engine: the fused heads
  (``method.token_chunk = 3``, L = 8; both terms and the accuracy in one pass) give the plain step's losses,
  accuracy and updated parameters."""
  import optax
  from flax import nnx

  import kdjax
  from kdjax.models import create

  v, length = 37, 8
  tokens = np.random.default_rng(0).integers(0, v, (2, length + 1)).astype(np.int32)
  host = {"inputs": tokens[:, :-1], "label": tokens[:, 1:], "mask": np.arange(length)[None, :] < np.array([[8], [5]])}

  def one_step(chunk):
    lm = lambda seed, dim: create(  # noqa: E731
      "transformer_lm", num_classes=v, num_layers=1, dim=dim, num_heads=2, max_len=length, rngs=nnx.Rngs(seed)
    )
    method = kdjax.MethodConfig(name="forward_kl", terms=("ce=0.1", "forward_kl=0.9"), token_chunk=chunk)
    d = kdjax.Distiller(lm(0, 8), lm(1, 16), method=method, optimizer=optax.sgd(0.5), mode="offline", num_examples=2)
    state, metrics = d.step(d.init(jax.random.key(0), host), host)
    names = ("loss/total", "loss/ce", "loss/forward_kl", "train/accuracy")
    return jax.device_get((state.params, [metrics[n] for n in names]))

  (params, logged), (want_params, want_logged) = one_step(3), one_step(0)
  np.testing.assert_allclose(logged, want_logged, rtol=RTOL)
  _close(params, want_params)
