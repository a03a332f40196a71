"""Hidden-state and attention distillation for sequence models, and layers tapped inside nnx.scan stacks.

The losses are checked against NumPy written here (masked positions must not count); the taps against the
unrolled model; the methods train a 4-layer → 2-layer distillation with a uniform layer map on the zoo
transformer and on a Llama teacher made by transformers, whose attention probabilities equal transformers'.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax

import kdjax
import kdjax.losses as kdl
import kdjax.methods
from kdjax.engine.taps import capture
from kdjax.errors import ConfigError
from kdjax.methods import ModelInfo

B, L, H = 3, 6, 2


def _mask() -> np.ndarray:
  m = np.ones((B, L), np.float32)
  m[0, 4:] = 0  # right padding
  m[2, :2] = 0  # left padding
  return m


def _probs(rng, shape) -> np.ndarray:
  z = rng.normal(size=shape)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _np_hidden(s, t, m, kind):
  if kind == "mse":
    per = ((s - t) ** 2).mean(-1)
  else:
    per = 1 - (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  return (per * m).sum() / m.sum()


def _np_row_kl(pt, ps, m):
  """Σ over real queries and heads of KL(p_t ‖ p_s) restricted to real keys, / (H · real queries)."""
  total = 0.0
  for b in range(pt.shape[0]):
    for h in range(pt.shape[1]):
      for i in range(pt.shape[2]):
        if m[b, i]:
          keys = m[b] > 0
          total += np.sum(pt[b, h, i, keys] * (np.log(pt[b, h, i, keys]) - np.log(ps[b, h, i, keys])))
  return total / (pt.shape[1] * m.sum())


def _np_relation(x, heads, m):
  b, l, d = x.shape
  xr = x.reshape(b, l, heads, d // heads).transpose(0, 2, 1, 3)
  s = xr @ xr.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
  s = np.where(m[:, None, None, :] > 0, s, -np.inf)
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["mse", "cos"])
def test_hidden_state_losses_equal_numpy_and_ignore_masked_positions(kind):
  rng = np.random.default_rng(0)
  s, t, m = rng.normal(size=(B, L, 8)), rng.normal(size=(B, L, 8)), _mask()
  fn = kdl.hidden_mse if kind == "mse" else kdl.hidden_cosine
  got = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(m))
  np.testing.assert_allclose(got, _np_hidden(s, t, m, kind), rtol=1e-5)
  s2 = s.copy()
  s2[m == 0] += 100.0  # what masked positions hold does not matter
  np.testing.assert_allclose(fn(jnp.asarray(s2, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(m)), got)
  np.testing.assert_allclose(fn(jnp.asarray(t), jnp.asarray(t), jnp.asarray(m)), 0.0, atol=1e-6)
  vec = fn(jnp.asarray(s[:, 0]), jnp.asarray(t[:, 0]))  # (B, D) vectors
  np.testing.assert_allclose(vec, _np_hidden(s[:, :1], t[:, :1], np.ones((B, 1)), kind), rtol=1e-5)


def test_attention_kl_equals_numpy_per_head_over_real_queries_and_keys():
  rng = np.random.default_rng(1)
  ps, pt, m = _probs(rng, (B, H, L, L)), _probs(rng, (B, H, L, L)), _mask()
  got = kdl.attention_kl(jnp.asarray(ps, jnp.float32), jnp.asarray(pt, jnp.float32), jnp.asarray(m))
  np.testing.assert_allclose(got, _np_row_kl(pt, ps, m), rtol=1e-5)
  ps2 = ps.copy()
  ps2[0, :, 5, :] = _probs(rng, (H, L))  # a padded query's row does not count
  np.testing.assert_allclose(kdl.attention_kl(jnp.asarray(ps2), jnp.asarray(pt), jnp.asarray(m)), got, rtol=1e-6)
  assert float(kdl.attention_kl(jnp.asarray(pt), jnp.asarray(pt), jnp.asarray(m))) == pytest.approx(0.0, abs=1e-6)


def test_relation_kl_equals_numpy_for_different_widths():
  rng = np.random.default_rng(2)
  s, t, m = rng.normal(size=(B, L, 8)), rng.normal(size=(B, L, 16)), _mask()  # student narrower than teacher
  s2 = s.copy()
  s2[m == 0] = rng.normal(size=s2[m == 0].shape)  # masked tokens are neither queries nor keys
  loss_and_grad = jax.jit(jax.value_and_grad(kdl.relation_kl), static_argnums=2)
  for heads in (1, 4):
    got, g = loss_and_grad(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), heads, jnp.asarray(m))
    np.testing.assert_allclose(got, _np_row_kl(_np_relation(t, heads, m), _np_relation(s, heads, m), m), rtol=1e-5)
    np.testing.assert_allclose(loss_and_grad(jnp.asarray(s2), jnp.asarray(t), heads, jnp.asarray(m))[0], got, rtol=1e-5)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)[m == 0]).max() == 0.0


def test_relation_heads_must_divide_the_width():
  with pytest.raises(ConfigError, match="divide"):
    kdl.relation_kl(jnp.ones((1, 3, 6)), jnp.ones((1, 3, 8)), 4)


# ---------------------------------------------------------------- a layer of an nnx.scan stack


class _Block(nnx.Module):
  def __init__(self, d: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
    self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(nnx.gelu(self.fc1(x)))


class _Stacked(nnx.Module):
  """Blocks made by nnx.vmap and run by nnx.scan, as flax's guides write a deep stack."""

  def __init__(self, n: int, d: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(4, d, rngs=rngs)

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _Block(d, rngs=rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(d, 5, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, block):
      return block(h)

    return self.head(body(self.embed(x), self.blocks))


class _Unrolled(nnx.Module):
  def __init__(self, stacked: _Stacked, n: int):
    self.embed, self.head = stacked.embed, stacked.head
    g, st = nnx.split(stacked.blocks)
    self.blocks = nnx.List([nnx.merge(g, jax.tree.map(lambda a: a[i], st)) for i in range(n)])

  def __call__(self, x):
    h = self.embed(x)
    for b in self.blocks:
      h = b(h)
    return self.head(h)


class _Ensemble(nnx.Module):
  def __init__(self, stacked: _Stacked):
    self.embed, self.blocks = stacked.embed, stacked.blocks

  def __call__(self, x):
    @nnx.vmap(in_axes=(0, None), out_axes=0)
    def run(block, h):
      return block(h)

    return run(self.blocks, self.embed(x)).mean(0)


def _tapped(model, x, taps):
  g, state = nnx.split(model)

  @jax.jit
  def run(state, x):
    m = nnx.merge(g, state, copy=True)
    with capture(m, taps) as got:
      out = m(x)
    return out, got, nnx.state(m)

  return run(state, x)


@pytest.mark.slow
def test_a_layer_inside_an_nnx_scan_stack_is_tapped_as_in_the_unrolled_model():
  stacked = _Stacked(4, 8, rngs=nnx.Rngs(0))
  unrolled = _Unrolled(stacked, 4)
  x = jax.random.normal(jax.random.key(1), (2, 3, 4))
  taps = {"b2": "blocks.2", "b0": "blocks.0", "fc1_of_3": "blocks.3.fc1", "head": "head"}
  out_s, got_s, state_after = _tapped(stacked, x, taps)
  out_u, got_u, _ = _tapped(unrolled, x, taps)
  np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-6)
  for name in taps:
    assert got_s[name].shape == got_u[name].shape, name
    np.testing.assert_allclose(got_s[name], got_u[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert jax.tree.structure(state_after) == jax.tree.structure(nnx.state(stacked))  # nothing left behind
  ensemble = _Ensemble(stacked)  # the same stack run by nnx.vmap: member 1 alone
  _, got_e, _ = _tapped(ensemble, x, {"m1": "blocks.1"})
  np.testing.assert_allclose(got_e["m1"], unrolled.blocks[1](unrolled.embed(x)), rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="no layer 'blocks.4'"):
    _tapped(stacked, x, {"b": "blocks.4"})
  with pytest.raises(ConfigError, match="runs as one module"):  # a (5, 5) head is no stack of 5 layers
    _tapped(_Stacked(2, 5, rngs=nnx.Rngs(0)), x[:, 0], {"h": "head.1"})


# ---------------------------------------------------------------- attention probabilities of the models

TOKENS = np.random.default_rng(0).integers(0, 64, (2, 8)).astype(np.int32)


def _outputs(model, taps=()):
  from kdjax.engine.state import apply_model, split_model

  g, p, r = split_model(model)

  @jax.jit
  def run(p, r, x):
    out = apply_model(g, p, r, x, train=False, taps=tuple(taps))[0]
    return out.logits, out.features

  return run(p, r, jnp.asarray(TOKENS))


def test_zoo_transformer_explicit_attention_equals_the_fused_one_and_numpy():
  from kdjax.models.probe import Probe
  from kdjax.models.transformer import explicit_attention

  q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 4)) for i in range(3))
  seen = {}

  class Keep(Probe):
    def __call__(self, x):
      seen["p"] = x
      return x

  @jax.jit
  def run(q, k, v):
    return explicit_attention(q, k, v, jnp.tril(jnp.ones((5, 5), bool)), Keep()), seen["p"]

  out, probs = run(q, k, v)
  np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
  s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q), np.asarray(k)) / 2.0
  s = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf)
  want = np.exp(s - s.max(-1, keepdims=True))
  np.testing.assert_allclose(probs, want / want.sum(-1, keepdims=True), atol=1e-6)


# ---------------------------------------------------------------- the layer map and the terms in a Distiller


def _info(name, layers, dim, heads=2, probes=True):
  feats = {f"block{i}": (L, dim) for i in range(layers)}
  if probes:
    feats |= {f"blocks.{i}.attn.probs": (heads, L, L) for i in range(layers)}
    feats |= {f"blocks.{i}.attn.values": (L, heads, dim // heads) for i in range(layers)}
  return ModelInfo(name, 64, feats)


def test_layer_maps_pair_student_and_teacher_layers():
  student, teacher = _info("s", 2, 16), _info("t", 6, 32)
  build = lambda **kw: kdjax.methods.build(kdjax.MethodConfig(name="tinybert", terms=("ce=0",), **kw), student, teacher)  # noqa: E731
  term = build().terms[0]  # uniform: TinyBERT's g(m) = m·N/M, every third teacher layer
  assert (term.student_features, term.teacher_features) == (("block0", "block1"), ("block2", "block5"))
  term = build(layer_map=("last",)).terms[0]
  assert (term.student_features, term.teacher_features) == (("block1",), ("block5",))
  term = build(layer_map=("0=0", "1=3")).terms[0]
  assert (term.student_features, term.teacher_features) == (("block0", "block1"), ("block0", "block3"))
  term = build(layer_map=("-1=-2",)).terms[0]  # negative indices count from the last layer
  assert (term.student_features, term.teacher_features) == (("block1",), ("block4",))
  deeper = kdjax.methods.build(kdjax.MethodConfig(name="tinybert", terms=("ce=0",)), teacher, student).terms[0]
  assert (deeper.student_features, deeper.teacher_features) == (("block2", "block5"), ("block0", "block1"))
  term = build(layer_map=("block1=block4",)).terms[0]  # features (or module paths) by name
  assert (term.student_features, term.teacher_features) == (("block1",), ("block4",))
  minilm = kdjax.methods.build(kdjax.MethodConfig(name="minilm", layer_map=("last",)), student, teacher)
  assert [t.teacher_features for t in minilm.terms] == [("blocks.5.attn.probs",), ("blocks.5.attn.values",)]
  with pytest.raises(ConfigError, match="outside"):
    build(layer_map=("2=1",))
  with pytest.raises(ConfigError, match="same heads"):
    kdjax.methods.build(kdjax.MethodConfig(name="minilm"), student, _info("t", 4, 32, heads=4))
  with pytest.raises(ConfigError, match="method.layer_map"):
    kdjax.MethodConfig(name="tinybert", layer_map=("0-1",))
  assert kdjax.methods.tap_templates(kdjax.MethodConfig(name="minilm")) == (
    ("blocks.{i}.attn.probs", "blocks.{i}.attn.values"),
    ("blocks.{i}.attn.probs", "blocks.{i}.attn.values"),
  )


def _lm_batches(seed: int, n: int = 8, length: int = 8, vocab: int = 64):
  rng = np.random.default_rng(seed)
  while True:
    tokens = rng.integers(0, vocab, (n, length + 1)).astype(np.int32)
    mask = np.ones((n, length), bool)
    mask[: n // 2, length - 3 :] = False  # padded rows
    yield {"inputs": tokens[:, :-1], "label": np.where(mask, tokens[:, 1:], -1), "mask": mask}


def _distil(student, teacher, cfg, steps: int = 12):
  d = kdjax.Distiller(student, teacher, method=cfg, optimizer=optax.adam(1e-2))
  it = _lm_batches(0)
  fixed = next(it)
  state = d.init(jax.random.key(0), fixed)
  history = []
  for _ in range(steps):
    state, m = d.step(state, fixed)
    history.append({k: float(v) for k, v in m.items() if k.startswith("loss/")})
  return d, history


def _falls(history, terms):
  for t in terms:
    first, last = history[0][f"loss/{t}"], history[-1][f"loss/{t}"]
    assert np.isfinite(last) and last < 0.8 * first, (t, first, last)


def _terms(d):
  return {t.name: (t.student_features, t.teacher_features) for t in d.spec.method.terms}


@pytest.fixture(scope="module")
def zoo_teacher():
  import kdjax.models as km

  return km.create("transformer_lm", num_classes=64, num_layers=4, dim=32, num_heads=2, max_len=8, rngs=nnx.Rngs(1))


@pytest.mark.slow
def test_four_to_two_layers_on_the_zoo_transformer_with_a_uniform_map(zoo_teacher):
  import kdjax.models as km

  student = km.create("transformer_lm", num_classes=64, num_layers=2, dim=16, num_heads=2, max_len=8, rngs=nnx.Rngs(0))
  cfg = kdjax.MethodConfig(name="tinybert+minilm", terms=("hidden_cos=1",))
  d, history = _distil(student, zoo_teacher, cfg)
  terms = _terms(d)
  assert terms["hidden_mse"] == (("block0", "block1"), ("block1", "block3"))
  assert terms["attn_kl"] == (
    ("blocks.0.attn.probs", "blocks.1.attn.probs"),
    ("blocks.1.attn.probs", "blocks.3.attn.probs"),
  )
  _falls(history, ["hidden_mse", "hidden_cos", "attn_kl", "value_kl"])


class _StackedLM(nnx.Module):
  """A user's LM whose blocks nnx.vmap made and nnx.scan runs; it returns bare logits."""

  def __init__(self, n: int, d: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(64, d, rngs=rngs)
    self.blocks = _Stacked(n, d, rngs=rngs).blocks
    self.head = nnx.Linear(d, 64, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, block):
      return block(h)

    return self.head(body(self.embed(tokens), self.blocks))


@pytest.mark.slow
def test_a_users_scan_stacked_model_distils_hidden_states_by_path(zoo_teacher):
  cfg = kdjax.MethodConfig(name="tinybert", student_layers="blocks.{i}")
  d, history = _distil(_StackedLM(2, 16, rngs=nnx.Rngs(0)), zoo_teacher, cfg)
  assert _terms(d)["hidden_mse"] == (("blocks.0", "blocks.1"), ("block1", "block3"))
  _falls(history, ["hidden_mse"])


# ---------------------------------------------------------------- a Llama teacher made by transformers


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A 4-layer Llama (4 heads over 2 key/value heads) saved by transformers, eager attention, and its kdjax load."""
  torch = pytest.importorskip("torch")
  T = pytest.importorskip("transformers")
  from kdjax.models import pretrained

  cfg = T.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
  )
  torch.manual_seed(0)
  ref = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
  path = tmp_path_factory.mktemp("llama")
  ref.save_pretrained(path)
  with torch.no_grad():
    attentions = ref(torch.tensor(TOKENS), output_attentions=True).attentions
  return pretrained.from_pretrained(path), [a.numpy() for a in attentions]


@pytest.mark.slow
def test_llama_attention_probabilities_equal_transformers_output_attentions(llama):
  model, ref = llama
  _, feats = _outputs(model, [(f"p{i}", f"blocks.{i}.attn.probs") for i in range(4)])
  for i in range(4):
    assert feats[f"p{i}"].shape == ref[i].shape == (2, 4, 8, 8)
    np.testing.assert_allclose(feats[f"p{i}"], ref[i], atol=1e-5, err_msg=f"layer {i}")


@pytest.mark.slow
def test_four_to_two_layers_from_a_llama_teacher_with_a_uniform_map(llama):
  import kdjax.models as km

  student = km.create("transformer_lm", num_classes=64, num_layers=2, dim=16, num_heads=4, max_len=8, rngs=nnx.Rngs(0))
  d, history = _distil(student, llama[0], kdjax.MethodConfig(name="minilm", terms=("hidden_mse=1", "qkv_kl=1")))
  terms = _terms(d)
  assert terms["hidden_mse"] == (("block0", "block1"), ("block1", "block3"))  # 32-wide teacher, 16-wide student
  assert terms["value_kl"][1] == ("blocks.1.attn.values", "blocks.3.attn.values")  # 2 kv heads, 4 relation heads
  _falls(history, ["hidden_mse", "attn_kl", "value_kl", "qkv_kl"])


def test_fitnet_hint_on_sequences_and_vectors_uses_a_linear_regressor():
  from kdjax.methods.base import Context, InitInfo
  from kdjax.models.base import ModelOutput

  rng = np.random.default_rng(3)
  s_info = ModelInfo("s", 64, {"block1": (L, 8), "pooled": (8,)})
  t_info = ModelInfo("t", 64, {"block1": (L, 12), "pooled": (12,)})
  ctx = Context(step=jnp.int32(0), epoch=jnp.float32(0), key=jax.random.key(0))
  for layer in ("block1", "pooled"):
    m = kdjax.methods.build(kdjax.MethodConfig(name="fitnet", hint_layer=layer, terms=("ce=0",)), s_info, t_info)
    fs = rng.normal(size=(B, *s_info.feature_shapes[layer])).astype(np.float32)
    ft = rng.normal(size=(B, *t_info.feature_shapes[layer])).astype(np.float32)
    s, t = ModelOutput(jnp.zeros((B, L, 64)), {layer: fs}), ModelOutput(jnp.zeros((B, L, 64)), {layer: ft})
    params, state = m.init(jax.random.key(0), s, t, InitInfo(s_info, t_info, 0))
    w, b = np.asarray(params["hint"]["w"]), np.asarray(params["hint"]["b"])
    assert w.shape == (s_info.feature_shapes[layer][-1], t_info.feature_shapes[layer][-1])
    loss = jax.jit(lambda p: m.loss(p, state, s, t, {"mask": jnp.asarray(_mask())}, ctx)[2]["loss/hint"])(params)
    mask = _mask() if layer == "block1" else np.ones(B)
    per = ((fs @ w + b - ft) ** 2).mean(-1)
    want = (per * mask).sum() / mask.sum() if layer == "block1" else per.mean()
    np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=layer)


@pytest.mark.parametrize("term", ["hidden_mse", "hidden_cos"])
def test_hidden_state_terms_project_the_student_and_equal_numpy(term):
  from kdjax.methods.base import Context, InitInfo
  from kdjax.models.base import ModelOutput

  rng = np.random.default_rng(4)
  s_info, t_info = ModelInfo("s", 64, {"block1": (L, 8)}), ModelInfo("t", 64, {"block3": (L, 12)})
  cfg = kdjax.MethodConfig(name="ce", terms=("ce=0", f"{term}=1"), layer_map=("block1=block3",))
  m = kdjax.methods.build(cfg, s_info, t_info)
  fs, ft = rng.normal(size=(B, L, 8)).astype(np.float32), rng.normal(size=(B, L, 12)).astype(np.float32)
  s, t = ModelOutput(jnp.zeros((B, L, 64)), {"block1": fs}), ModelOutput(jnp.zeros((B, L, 64)), {"block3": ft})
  params, state = m.init(jax.random.key(0), s, t, InitInfo(s_info, t_info, 0))
  p = params[term]["block1->block3"]
  ctx = Context(step=jnp.int32(0), epoch=jnp.float32(0), key=jax.random.key(0))
  got = jax.jit(lambda q: m.loss(q, state, s, t, {"mask": jnp.asarray(_mask())}, ctx)[2][f"loss/{term}"])(params)
  want = _np_hidden(fs @ np.asarray(p["w"]) + np.asarray(p["b"]), ft, _mask(), term[-3:])
  np.testing.assert_allclose(got, want, rtol=1e-5)
