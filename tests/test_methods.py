"""kdjax.methods: presets build/init/jit, totals, gradients, CE/KD/DKD/CRD semantics, validation."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as kdl
from kdjax import methods
from kdjax.config import MethodConfig
from kdjax.methods import adapters as A
from kdjax.methods.base import Context, InitInfo, ModelInfo
from kdjax.models.base import ModelOutput

B, C, N = 8, 10, 20
S_SHAPES = {
  "stem": (8, 8, 16),
  "stage1": (8, 8, 16),
  "stage2": (4, 4, 32),
  "stage1_preact": (8, 8, 16),
  "stage2_preact": (4, 4, 32),
  "pooled": (32,),
}
T_SHAPES = {
  "stem": (8, 8, 16),
  "stage1": (8, 8, 32),
  "stage2": (4, 4, 64),
  "stage1_preact": (8, 8, 32),
  "stage2_preact": (4, 4, 64),
  "pooled": (64,),
}
S_INFO = ModelInfo("fake_s", C, S_SHAPES)
T_INFO = ModelInfo("fake_t", C, T_SHAPES)
TOKEN_PRESETS = ["forward_kl", "reverse_kl", "gkd", "tvd", "skew_kl", "skew_reverse_kl"]
SEQUENCE_PRESETS = ["tinybert", "distilbert", "minilm", "minilmv2"]  # hidden states, attention: test_sequence_features
IMAGE_PRESETS = [
  p for p in methods.available() if p not in TOKEN_PRESETS + SEQUENCE_PRESETS + ["uld"]
]  # uld: test_cross_tokenizer


def _out(key, shapes, num_classes=C, relu=True):
  keys = jax.random.split(key, len(shapes) + 1)
  feats = {}
  for k, (n, s) in zip(keys[1:], sorted(shapes.items())):
    x = jax.random.normal(k, (B, *s))
    feats[n] = jax.nn.relu(x) if relu and not n.endswith("_preact") and n != "pooled" else x
  return ModelOutput(jax.random.normal(keys[0], (B, num_classes)) * 2.0, feats)


def _batch(key, labels=None):
  if labels is None:
    labels = jax.random.randint(key, (B,), 0, C)
  return {"label": jnp.asarray(labels, jnp.int32), "id": jnp.arange(B, dtype=jnp.int32) + 3}


def _ctx(epoch=30.0, seed=0):
  return Context(step=jnp.int32(1), epoch=jnp.float32(epoch), key=jax.random.key(seed))


def _setup(name, init_epochs=30.0, **kw):
  cfg = MethodConfig(name=name, init_epochs=init_epochs, **kw)
  # FSP needs equal channel counts: give it a same-width teacher.
  t_info = ModelInfo("fake_t_same", C, S_SHAPES) if name == "fsp" else T_INFO
  m = methods.build(cfg, S_INFO, t_info)
  m.validate(S_INFO, t_info)
  s, t = _out(jax.random.key(1), S_SHAPES), _out(jax.random.key(2), t_info.feature_shapes)
  params, state = m.init(jax.random.key(0), s, t, InitInfo(S_INFO, t_info, num_examples=N))
  return m, params, state, s, t


def _ce_np(logits, labels):
  z = np.asarray(logits, np.float64)
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  return lse - z[np.arange(len(labels)), np.maximum(labels, 0)]


@pytest.mark.parametrize(
  "name", [n if n in ("kd", "vid") else pytest.param(n, marks=pytest.mark.slow) for n in IMAGE_PRESETS]
)
def test_preset_loss_total_and_grads(name):
  m, params, state, s, t = _setup(name)
  batch = _batch(jax.random.key(3))
  for stage in ("main", "init"):
    terms = m.stage_terms(stage)
    if not terms:
      continue

    @jax.jit
    def f(p, sf, st):
      return m.loss(p, st, ModelOutput(s.logits, sf), t, batch, _ctx(), stage=stage)

    total, new_state, metrics = f(params, s.features, state)
    assert total.shape == () and total.dtype == jnp.float32 and np.isfinite(total)
    recomputed = sum(tm.weight * metrics[f"loss/{tm.name}"] for tm in terms)
    np.testing.assert_allclose(total, recomputed, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/total"], total, rtol=1e-6)
    gp, gf = jax.grad(lambda p, sf: f(p, sf, state)[0], argnums=(0, 1))(params, s.features)
    for leaf in jax.tree.leaves((gp, gf)):
      assert np.all(np.isfinite(leaf))
    for tm in terms:  # each term's declared student features receive gradient
      if tm.weight == 0:
        continue
      for feat in tm.student_features:
        assert np.any(gf[feat] != 0), (name, tm.name, feat)
      own = params[tm.params_from or tm.name]
      if tm.name == "ft":  # the paraphraser is frozen in the main stage
        own = own["translator"]
      if jax.tree.leaves(own):
        assert any(np.any(g != 0) for g in jax.tree.leaves(gp[tm.params_from or tm.name])), (name, tm.name)


@pytest.mark.parametrize("name", TOKEN_PRESETS)
def test_token_presets(name):
  m = methods.build(MethodConfig(name=name, terms=("ce=0.5",)), S_INFO, T_INFO)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  s = ModelOutput(jax.random.normal(k1, (2, 5, 7)), {})
  t = ModelOutput(jax.random.normal(k2, (2, 5, 7)), {})
  # a prompt position (label −1) inside the mask: token terms score it no more than CE does
  labels = jax.random.randint(k3, (2, 5), 0, 7).at[0, 4].set(-1).at[1, 0].set(-1)
  mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
  batch = {"label": labels, "mask": mask}
  params, state = m.init(jax.random.key(0), s, t, InitInfo(S_INFO, T_INFO, 4))
  total, _, metrics = jax.jit(lambda: m.loss(params, state, s, t, batch, _ctx()))()
  fn = {
    "forward_kl": kdl.forward_kl,
    "reverse_kl": kdl.reverse_kl,
    "gkd": kdl.generalized_jsd,
    "tvd": kdl.tvd,
    "skew_kl": kdl.skew_kl,
    "skew_reverse_kl": lambda s, t, mask: kdl.skew_kl(s, t, mask=mask, reverse=True),
  }[name]
  scored = mask & (labels >= 0)
  np.testing.assert_allclose(metrics[f"loss/{name}"], fn(s.logits, t.logits, mask=scored), rtol=1e-5)
  per = _ce_np(np.asarray(s.logits).reshape(-1, 7), np.asarray(labels).reshape(-1))
  valid = (np.asarray(labels).reshape(-1) >= 0) & np.asarray(mask).reshape(-1)
  np.testing.assert_allclose(metrics["loss/ce"], per[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(total, 0.5 * metrics["loss/ce"] + metrics[f"loss/{name}"], rtol=1e-5)


def test_cross_entropy_masks_unlabelled_and_mixup():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  labels = np.array([0, -1, 4, 2, -1, 1])
  per = _ce_np(logits, labels)
  np.testing.assert_allclose(methods.cross_entropy(logits, labels), per[labels >= 0].mean(), rtol=1e-5)
  assert float(methods.cross_entropy(logits, -np.ones(6, np.int32))) == 0.0
  lb = np.array([3, 1, 0, 2, 4, 4])
  lam = rng.uniform(size=6).astype(np.float32)
  full = np.array([0, 3, 4, 2, 1, 1])
  want = (lam * _ce_np(logits, full) + (1 - lam) * _ce_np(logits, lb)).mean()
  np.testing.assert_allclose(methods.cross_entropy(logits, full, lb, lam), want, rtol=1e-5)


def test_kd_preset_total():
  m, params, state, s, t = _setup("kd")
  batch = _batch(jax.random.key(5))
  total, _, _ = jax.jit(lambda: m.loss(params, state, s, t, batch, _ctx()))()
  want = 0.1 * _ce_np(s.logits, np.asarray(batch["label"])).mean() + 0.9 * float(kdl.kd(s.logits, t.logits, 4.0))
  np.testing.assert_allclose(total, want, rtol=1e-5)


def test_dkd_warmup_and_unlabelled():
  m, params, state, s, t = _setup("dkd")
  batch = _batch(jax.random.key(5))
  _, _, metrics = m.loss(params, state, s, t, batch, _ctx(epoch=5.0))
  ref = kdl.dkd(s.logits, t.logits, batch["label"], alpha=1.0, beta=8.0, temperature=4.0)
  np.testing.assert_allclose(metrics["loss/dkd"], 0.25 * ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["dkd/warmup"], 0.25)
  _, _, metrics = m.loss(params, state, s, t, batch, _ctx(epoch=40.0))
  np.testing.assert_allclose(metrics["loss/dkd"], ref, rtol=1e-5)
  lab = np.asarray(batch["label"]).copy()
  lab[:3] = -1
  _, _, metrics = m.loss(params, state, s, t, {**batch, "label": jnp.asarray(lab)}, _ctx(epoch=40.0))
  ref = kdl.dkd(s.logits[3:], t.logits[3:], lab[3:], alpha=1.0, beta=8.0, temperature=4.0)
  np.testing.assert_allclose(metrics["loss/dkd"], ref, rtol=1e-5)


def test_crd_state_changes_and_k_clamped():
  m, params, state, s, t = _setup("crd", crd_negatives=4096)
  assert methods.registry.contrastive.crd_num_negatives(4096, N) == N - 1
  batch = _batch(jax.random.key(5))
  _, new_state, metrics = jax.jit(lambda st: m.loss(params, st, s, t, batch, _ctx()))(state)
  assert np.isfinite(metrics["loss/crd"])
  old, new = state["crd"], new_state["crd"]
  assert old.student.shape == (N, 128)
  assert not np.allclose(old.student, new.student) and not np.allclose(old.teacher, new.teacher)
  assert float(new.z_student) > 0
  ids = np.asarray(batch["id"])
  untouched = np.setdiff1d(np.arange(N), ids)
  np.testing.assert_array_equal(old.student[untouched], new.student[untouched])


def test_validate_errors():
  m = methods.build(MethodConfig(name="at"), S_INFO, T_INFO)
  small = ModelInfo("tiny", C, {"stage1": (8, 8, 16), "pooled": (32,)})
  with pytest.raises(ValueError, match=r"(?s)'at'.*'stage2'.*\['pooled', 'stage1'\]"):
    m.validate(small, T_INFO)
  with pytest.raises(ValueError, match="classes"):
    m.validate(S_INFO, ModelInfo("fake_t", C + 1, T_SHAPES))
  with pytest.raises(ValueError, match="stage9"):
    methods.build(MethodConfig(name="fitnet", hint_layer="stage9"), S_INFO, T_INFO)
  with pytest.raises(ValueError, match="teacher"):
    methods.build(MethodConfig(name="vid"), S_INFO, None)
  with pytest.raises(ValueError, match="FSP needs matching channels"):
    methods.build(MethodConfig(name="fsp", init_epochs=1), S_INFO, T_INFO)


def test_unknown_preset_and_overrides():
  with pytest.raises(ValueError, match=r"(?s)nope.*'crd\+kd'.*'kd'"):
    methods.build(MethodConfig(name="nope"), S_INFO, T_INFO)
  with pytest.raises(ValueError, match="unknown term"):
    methods.build(MethodConfig(name="kd", terms=("bogus=1",)), S_INFO, T_INFO)
  m = methods.build(MethodConfig(name="kd", terms=("kd=0.5",)), S_INFO, T_INFO)
  assert {t.name: t.weight for t in m.terms} == {"ce": 0.1, "kd": 0.5}
  m = methods.build(MethodConfig(name="ce", terms=("dist=2", "ce=0")), S_INFO, T_INFO)
  assert {t.name: t.weight for t in m.terms} == {"dist": 2.0}
  m = methods.build(MethodConfig(name="at+kd"), S_INFO, T_INFO)
  assert {t.name: t.weight for t in m.terms} == {"ce": 1.0, "at": 1000.0, "kd": 0.9}
  m = methods.build(MethodConfig(name="crd+kd"), S_INFO, T_INFO)
  assert {t.name: t.weight for t in m.terms} == {"ce": 1.0, "kd": 1.0, "crd": 0.8}


def test_term_flags_and_stages():
  flags = {t.name: t for t in methods.build(MethodConfig(name="crd+kd"), S_INFO, T_INFO).terms}
  assert not flags["ce"].needs_teacher and flags["kd"].needs_logits_only
  assert not flags["crd"].needs_logits_only
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert methods.build(MethodConfig(name="fitnet"), S_INFO, T_INFO).stage_terms("init") == ()
    ab = methods.build(MethodConfig(name="ab"), S_INFO, T_INFO)
  assert [t.name for t in ab.stage_terms("init")] == ["ab"] and [t.name for t in ab.stage_terms("main")] == ["ce"]
  fit = methods.build(MethodConfig(name="fitnet", init_epochs=1), S_INFO, T_INFO)
  assert [(t.name, t.params_from) for t in fit.stage_terms("init")] == [("hint_init", "hint")]


@pytest.mark.parametrize("s_hw,t_hw", [(8, 8), (8, 4), (4, 8)])
def test_conv_reg_output_shape(s_hw, t_hw):
  s_shape, t_shape = (s_hw, s_hw, 16), (t_hw, t_hw, 24)
  p = A.conv_reg_init(jax.random.key(0), s_shape, t_shape)
  y = A.conv_reg_apply(p, jnp.ones((2, *s_shape)) + jnp.arange(s_hw)[:, None, None], s_shape, t_shape)
  assert y.shape == (2, *t_shape)


def test_adapter_init_bounds_and_bn():
  p = A.linear_init(jax.random.key(0), 64, 128)
  assert p["w"].shape == (64, 128) and float(jnp.max(jnp.abs(p["w"]))) <= 1 / 8
  c = A.conv_init(jax.random.key(1), 4, 6, 3)
  assert c["w"].shape == (3, 3, 4, 6) and float(jnp.max(jnp.abs(c["w"]))) <= 1 / 6
  x = jax.random.normal(jax.random.key(2), (4, 3, 3, 5)) * 3 + 2
  y = A.batchnorm_apply(A.batchnorm_init(5), x)
  np.testing.assert_allclose(jnp.mean(y, (0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(jnp.var(y, (0, 1, 2)), 1, atol=1e-3)
  np.testing.assert_allclose(jnp.linalg.norm(A.l2_normalize(x.reshape(4, -1)), axis=-1), 1, rtol=1e-5)
