"""Terms on intermediate feature maps: FitNet, AT, SP, NST, VID, AB, FT, FSP.

Hyper-parameters and adapters follow RepDistiller (``train_student.py``,
``helper/loops.py``, ``helper/pretrain.py``). RepDistiller's ``feat[1:-1]``
is kdjax's ``"stage1"`` … ``"stageN"``, ``feat[-2]`` the last stage and
``feat[-1]`` ``"pooled"``. Adapters use train-mode batch norm (batch
statistics, see :mod:`kdjax.methods.adapters`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError
import kdjax.losses as kdl
from kdjax.methods import adapters as adapter_lib
from kdjax.methods import hidden as hidden_lib
from kdjax.methods.layer_match import HINT_AUTO
from kdjax.methods._common import common_stages, last_stage, need_teacher, opt, shape, stages, stop
from kdjax.methods.base import Term


def _f(out, name):
  return out.features[name]


# ---------------------------------------------------------------- FitNet


def hint_pair(name: str, cfg) -> tuple[str, str]:
  """FitNet's ``(student feature, teacher feature)`` of ``method.hint_layer``: ``"s=t"`` guides student
  feature s by teacher feature t (Romero et al. 2015 pair the student's middle "guided" layer with the
  teacher's middle "hint" layer, of other depths); one name reads that feature in both (default ``stage2``)."""
  layer = opt(cfg.hint_layer, "stage2")
  if layer == HINT_AUTO:
    raise ConfigError(
      f"term {name!r}: method.hint_layer=auto is chosen on data before the method is built: pass the "
      "MethodConfig to kdjax.Distiller (init resolves it) or resolve it with kdjax.auto_layers"
    )
  s, _, t = layer.partition("=")
  return s, t or s


def _label(pair: tuple[str, str]) -> str:
  return pair[0] if pair[0] == pair[1] else "=".join(pair)


def _linear_hint(name, weight, pair, s_shape, t_shape, stage, params_from):
  """FitNet on vectors ``(B, D)`` or sequences ``(B, L, D)``: a linear regressor ``D_s → D_t`` (per token),
  then MSE (over the real tokens of a sequence)."""
  if s_shape[:-1] != t_shape[:-1]:
    raise ConfigError(
      f"term {name!r}: hint_layer {_label(pair)!r} has student {s_shape} and teacher {t_shape}; only D may differ"
    )
  sl, tl = pair

  def init(key, s_out, t_out, info):
    return adapter_lib.linear_init(key, s_shape[-1], t_shape[-1]), {}

  def apply(params, state, s_out, t_out, batch, ctx):
    fs, ft = adapter_lib.dense_apply(params, _f(s_out, sl)), stop(_f(t_out, tl))
    if fs.ndim == 2:
      return kdl.hint(fs, ft), state, {}
    loss = kdl.hidden_mse(fs, ft, hidden_lib.feature_mask(batch, fs))
    return loss * hidden_lib.batch_share(ctx, batch), state, {}

  return (Term(name, weight, apply, init, (sl,), (tl,), needs_logits_only=False, stage=stage, params_from=params_from),)


def _fitnet(name, weight, cfg, student, teacher, stage, params_from):
  teacher = need_teacher(name, teacher)
  pair = sl, tl = hint_pair(name, cfg)
  s_shape, t_shape = shape(student, sl, name), shape(teacher, tl, name)
  if len(s_shape) == len(t_shape) and len(s_shape) in (1, 2):
    return _linear_hint(name, weight, pair, s_shape, t_shape, stage, params_from)
  if len(s_shape) != 3 or len(t_shape) != 3:
    raise ConfigError(
      f"term {name!r}: hint_layer {_label(pair)!r} must be an NHWC feature map, a vector (B, D) or a sequence "
      f"(B, L, D), got student {s_shape} and teacher {t_shape}"
    )
  adapter_lib.conv_reg_geometry(s_shape, t_shape)  # raises early on impossible geometry

  def init(key, s_out, t_out, info):
    return adapter_lib.conv_reg_init(key, s_shape, t_shape), {}

  def apply(params, state, s_out, t_out, batch, ctx):
    fs = adapter_lib.conv_reg_apply(params, _f(s_out, sl), s_shape, t_shape)
    return kdl.hint(fs, stop(_f(t_out, tl))), state, {}

  return (Term(name, weight, apply, init, (sl,), (tl,), needs_logits_only=False, stage=stage, params_from=params_from),)


def make_hint(name, weight, cfg, student, teacher):
  """``hint`` (FitNet): MSE between regressor(student[s]) and teacher[t], ``hint_layer`` ``"s=t"`` (or one
  feature name for both; ``"auto"``: chosen by linear CKA before the method is built, ``kdjax.auto_layers``).

  On NHWC maps the regressor is RepDistiller's ConvReg: conv (3×3 s2 if
  H_s = 2·H_t, 1×1 if equal, transposed 4×4 s2 if H_s = H_t/2) + BN + ReLU.
  On vectors ``(B, D)`` and sequences ``(B, L, D)`` it is a linear map
  ``D_s → D_t`` (per token; the sequence MSE counts the real tokens only).
  """
  return _fitnet(name, weight, cfg, student, teacher, "main", None)


def make_hint_init(name, weight, cfg, student, teacher):
  """``hint_init``: FitNet stage 1 — the hint loss alone, on the ``hint`` term's regressor.

  Runs in the ``"init"`` stage (``method.init_epochs``); only the student
  layers up to the guided layer (and the regressor) receive gradient from it.
  It reads the same ``hint_layer`` pair as ``hint``.
  """
  return _fitnet(name, weight, cfg, student, teacher, "init", "hint")


# ---------------------------------------------------------------- AT / SP / NST


def make_at(name, weight, cfg, student, teacher):
  """``at``: attention transfer (p=2) summed over every common ``stageK``."""
  layers = tuple(common_stages(name, student, need_teacher(name, teacher)))

  def apply(params, state, s_out, t_out, batch, ctx):
    loss = sum(kdl.attention_transfer(_f(s_out, l), stop(_f(t_out, l)), p=2) for l in layers)
    return loss, state, {}

  return (Term(name, weight, apply, student_features=layers, teacher_features=layers, needs_logits_only=False),)


def make_nst(name, weight, cfg, student, teacher):
  """``nst``: neuron selectivity transfer (polynomial-kernel MMD) summed over every common ``stageK``.

  RepDistiller applies NST to ``feat[1:-1]`` (all stages), not just the last.
  """
  layers = tuple(common_stages(name, student, need_teacher(name, teacher)))

  def apply(params, state, s_out, t_out, batch, ctx):
    return sum(kdl.nst(_f(s_out, l), stop(_f(t_out, l))) for l in layers), state, {}

  return (Term(name, weight, apply, student_features=layers, teacher_features=layers, needs_logits_only=False),)


def make_sp(name, weight, cfg, student, teacher):
  """``sp``: similarity-preserving loss on each model's last ``stageK``."""
  teacher = need_teacher(name, teacher)
  ls, lt = last_stage(name, student), last_stage(name, teacher)

  def apply(params, state, s_out, t_out, batch, ctx):
    return kdl.similarity_preserving(_f(s_out, ls), stop(_f(t_out, lt))), state, {}

  return (Term(name, weight, apply, student_features=(ls,), teacher_features=(lt,), needs_logits_only=False),)


# ---------------------------------------------------------------- VID


_VID_INIT_VAR, _VID_EPS = 5.0, 1e-5


def make_vid(name, weight, cfg, student, teacher):
  """``vid``: variational information distillation, summed over common stages.

  Per stage: regressor conv1×1(C_s→C_t) ReLU conv1×1(C_t→C_t) ReLU
  conv1×1(C_t→C_t) (no bias) predicts the mean; a per-channel
  ``log_scale`` starts at log(e^(5−eps) − 1) so softplus(log_scale) + eps
  = 5. The larger map is average-pooled to the smaller *before* the
  regressor, as in RepDistiller's VIDLoss.
  """
  teacher = need_teacher(name, teacher)
  layers = tuple(common_stages(name, student, teacher))
  chans = {l: (shape(student, l, name)[-1], shape(teacher, l, name)[-1]) for l in layers}
  log_scale0 = math.log(math.expm1(_VID_INIT_VAR - _VID_EPS))

  def init(key, s_out, t_out, info):
    p = {}
    for i, l in enumerate(layers):
      cs, ct = chans[l]
      k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
      p[l] = {
        "conv1": adapter_lib.conv_init(k1, cs, ct, 1, bias=False),
        "conv2": adapter_lib.conv_init(k2, ct, ct, 1, bias=False),
        "conv3": adapter_lib.conv_init(k3, ct, ct, 1, bias=False),
        "log_scale": jnp.full((ct,), log_scale0, jnp.float32),
      }
    return p, {}

  def apply(params, state, s_out, t_out, batch, ctx):
    total = jnp.zeros((), jnp.float32)
    for l in layers:
      fs, ft = kdl.pool_to_match(_f(s_out, l).astype(jnp.float32), stop(_f(t_out, l)).astype(jnp.float32))
      q = params[l]
      h = jax.nn.relu(adapter_lib.conv_apply(q["conv1"], fs))
      h = jax.nn.relu(adapter_lib.conv_apply(q["conv2"], h))
      mu = adapter_lib.conv_apply(q["conv3"], h)
      total = total + kdl.vid(mu, ft, q["log_scale"], eps=_VID_EPS)
    return total, state, {}

  return (Term(name, weight, apply, init, layers, layers, needs_logits_only=False),)


# ---------------------------------------------------------------- AB


def make_ab(name, weight, cfg, student, teacher):
  """``ab``: activation-boundary transfer on ``stageK_preact`` (init stage only).

  As RepDistiller: connectors are ConvReg without ReLU (conv + BN) where the
  shapes differ, identity where equal; layer i of n is weighted
  2^(i − (n − 1)); each layer's loss is brought to the reference scale
  (sum over elements / B / 1000 · 3, i.e. ``kdl.activation_boundary`` ×
  3·H·W·C/1000); margin 1. RepDistiller trains AB only during the
  ``init`` stage (student feature layers + connectors), then plain CE — so
  does kdjax: this term has ``stage="init"``; set ``method.init_epochs``
  (30 in the reference).
  """
  teacher = need_teacher(name, teacher)
  layers = tuple(
    f"{l}_preact"
    for l in common_stages(name, student, teacher)
    if f"{l}_preact" in student.feature_shapes and f"{l}_preact" in teacher.feature_shapes
  )
  if not layers:
    raise ConfigError(
      f"term {name!r} needs 'stageK_preact' features in both models; student "
      f"{student.name!r} exposes {sorted(student.feature_shapes)}, teacher {teacher.name!r} "
      f"exposes {sorted(teacher.feature_shapes)}"
    )
  shapes = {l: (shape(student, l, name), shape(teacher, l, name)) for l in layers}
  for s, t in shapes.values():
    if s != t:
      adapter_lib.conv_reg_geometry(s, t)
  n = len(layers)
  layer_w = [2.0 ** (i - (n - 1)) for i in range(n)]

  def init(key, s_out, t_out, info):
    return {
      l: ({} if s == t else adapter_lib.conv_reg_init(jax.random.fold_in(key, i), s, t))
      for i, (l, (s, t)) in enumerate(shapes.items())
    }, {}

  def apply(params, state, s_out, t_out, batch, ctx):
    total = jnp.zeros((), jnp.float32)
    for w, l in zip(layer_w, layers):
      s, t = shapes[l]
      fs = _f(s_out, l) if s == t else adapter_lib.conv_reg_apply(params[l], _f(s_out, l), s, t, relu=False)
      scale = 3.0 * math.prod(t) / 1000.0
      total = total + w * scale * kdl.activation_boundary(fs, stop(_f(t_out, l)), margin=1.0)
    return total, state, {}

  return (Term(name, weight, apply, init, layers, layers, needs_logits_only=False, stage="init"),)


# ---------------------------------------------------------------- FT


_FT_RATE = 0.5


def _lrelu(x):
  return jax.nn.leaky_relu(x, 0.1)


def _paraphraser_init(key, ct, f):
  ks = jax.random.split(key, 6)
  enc = [adapter_lib.conv_init(ks[0], ct, ct), adapter_lib.conv_init(ks[1], ct, f), adapter_lib.conv_init(ks[2], f, f)]
  dec = [
    adapter_lib.conv_init(ks[3], f, f, transpose=True),
    adapter_lib.conv_init(ks[4], f, ct, transpose=True),
    adapter_lib.conv_init(ks[5], ct, ct, transpose=True),
  ]
  return {"enc": enc, "dec": dec}


def _encode(p, x):
  for c in p["enc"]:
    x = _lrelu(adapter_lib.conv_apply(c, x, 1, 1))
  return x


def _decode(p, x):
  for c in p["dec"]:
    x = _lrelu(adapter_lib.conv_apply(c, x, 1, 1, transpose=True))
  return x


def _translator_init(key, cs, f):
  ks = jax.random.split(key, 3)
  return [
    {"conv": adapter_lib.conv_init(ks[0], cs, cs), "bn": adapter_lib.batchnorm_init(cs)},
    {"conv": adapter_lib.conv_init(ks[1], cs, f), "bn": adapter_lib.batchnorm_init(f)},
    {"conv": adapter_lib.conv_init(ks[2], f, f), "bn": adapter_lib.batchnorm_init(f)},
  ]


def _translate(p, x):
  for q in p:
    x = _lrelu(adapter_lib.batchnorm_apply(q["bn"], adapter_lib.conv_apply(q["conv"], x, 1, 1)))
  return x


def _ft_layers(name, student, teacher):
  teacher = need_teacher(name, teacher)
  ls, lt = last_stage(name, student), last_stage(name, teacher)
  return ls, lt, shape(student, ls, name)[-1], shape(teacher, lt, name)[-1]


def make_ft(name, weight, cfg, student, teacher):
  """``ft``: factor transfer, L1 (p=1) between normalised factors.

  Teacher factor = encoder of the *paraphraser* (3× conv3×3 + LeakyReLU 0.1,
  C_t → 0.5·C_t, no BN) on the teacher's last stage; student factor =
  *translator* (3× conv3×3 + BN + LeakyReLU 0.1, C_s → 0.5·C_t) on the
  student's last stage. The paraphraser is trained by ``ft_init`` in the
  init stage and frozen (stop-gradient) here, as in RepDistiller.
  """
  ls, lt, cs, ct = _ft_layers(name, student, teacher)
  f = max(int(ct * _FT_RATE), 1)

  def init(key, s_out, t_out, info):
    k1, k2 = jax.random.split(key)
    return {"paraphraser": _paraphraser_init(k1, ct, f), "translator": _translator_init(k2, cs, f)}, {}

  def apply(params, state, s_out, t_out, batch, ctx):
    factor_t = _encode(stop(params["paraphraser"]), stop(_f(t_out, lt)))
    factor_s = _translate(params["translator"], _f(s_out, ls))
    return kdl.factor_transfer(factor_s, factor_t, p=1), state, {}

  return (Term(name, weight, apply, init, (ls,), (lt,), needs_logits_only=False),)


def make_ft_init(name, weight, cfg, student, teacher):
  """``ft_init``: train the ``ft`` paraphraser to reconstruct the teacher's last stage (MSE), init stage."""
  ls, lt, cs, ct = _ft_layers(name, student, teacher)

  def apply(params, state, s_out, t_out, batch, ctx):
    x = stop(_f(t_out, lt)).astype(jnp.float32)
    rec = _decode(params["paraphraser"], _encode(params["paraphraser"], x))
    return jnp.mean((rec - x) ** 2), state, {}

  return (Term(name, weight, apply, teacher_features=(lt,), needs_logits_only=False, stage="init", params_from="ft"),)


# ---------------------------------------------------------------- FSP


def make_fsp(name, weight, cfg, student, teacher):
  """``fsp``: FSP matrices of consecutive layer pairs (stem, stage1), (stage1, stage2) …

  Only pairs whose channel counts match between student and teacher at
  both ends are used (RepDistiller requires all to match); losses are
  summed. Init stage only, as RepDistiller (then plain CE).
  """
  teacher = need_teacher(name, teacher)
  seq = [l for l in ["stem"] + stages(student) if l in student.feature_shapes and l in teacher.feature_shapes]

  def ch(info, l):
    return shape(info, l, name)[-1]

  pairs = tuple(
    (a, b) for a, b in zip(seq[:-1], seq[1:]) if ch(student, a) == ch(teacher, a) and ch(student, b) == ch(teacher, b)
  )
  if not pairs:
    raise ConfigError(
      f"term {name!r}: no consecutive layer pair of {seq} has equal channel counts in student "
      f"{student.name!r} and teacher {teacher.name!r}; FSP needs matching channels"
    )
  feats = tuple(dict.fromkeys(l for p in pairs for l in p))

  def apply(params, state, s_out, t_out, batch, ctx):
    loss = sum(kdl.fsp(_f(s_out, a), _f(s_out, b), stop(_f(t_out, a)), stop(_f(t_out, b))) for a, b in pairs)
    return loss, state, {}

  return (
    Term(name, weight, apply, student_features=feats, teacher_features=feats, needs_logits_only=False, stage="init"),
  )
