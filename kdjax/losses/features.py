"""Losses on intermediate feature maps (NHWC) and their statistics.

Adapters / regressors (FitNets' 1×1 conv, VID's regressor, FT's
paraphraser/translator, AB's connector) belong to the method, not to the
loss: these functions take the already-adapted arrays. Where two maps have
different spatial sizes, the larger is average-pooled to the smaller by an
integer factor (:func:`pool_to_match`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError
from kdjax.losses import _checks

Array = jax.Array


def _pool_to(x: Array, h: int, w: int, name: str) -> Array:
  """Average-pools NHWC ``x`` to spatial size ``(h, w)`` (integer factors)."""
  _, xh, xw, c = x.shape
  if xh % h or xw % w:
    raise ConfigError(
      f"{name} spatial size {(xh, xw)} is not an integer multiple of {(h, w)}; cannot average-pool to match."
    )
  fh, fw = xh // h, xw // w
  if fh == 1 and fw == 1:
    return x
  x = x.reshape(x.shape[0], h, fh, w, fw, c)
  return jnp.mean(x, axis=(2, 4))


def pool_to_match(a: Array, b: Array, name_a: str = "a", name_b: str = "b") -> tuple[Array, Array]:
  """Average-pools the larger of two NHWC maps to the other's ``(H, W)``.

  Args:
    a: ``(B, H_a, W_a, C_a)``.
    b: ``(B, H_b, W_b, C_b)``.
    name_a, name_b: argument names used in error messages.

  Returns:
    ``(a', b')`` with equal spatial sizes (channels untouched). Raises
    ``ValueError`` if one is not an integer multiple of the other, or if
    ``a`` is larger along one axis and smaller along the other.
  """
  _checks.check_rank(a, name_a, 4)
  _checks.check_rank(b, name_b, 4)
  (_, ha, wa, _), (_, hb, wb, _) = a.shape, b.shape
  if ha >= hb and wa >= wb:
    return _pool_to(a, hb, wb, name_a), b
  if ha <= hb and wa <= wb:
    return a, _pool_to(b, ha, wa, name_b)
  raise ConfigError(
    f"{name_a} spatial size {(ha, wa)} and {name_b} spatial size "
    f"{(hb, wb)} are not nested; cannot average-pool one to the other."
  )


def _l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / max(‖x‖₂, eps) (torch ``F.normalize``), zero gradient-safe at 0."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  norm = jnp.sqrt(jnp.maximum(sq, eps * eps))
  return x / norm


def _prep_pair(s: Array, t: Array, name_s: str, name_t: str):
  _checks.check_rank(s, name_s, 4)
  _checks.check_rank(t, name_t, 4)
  _checks.check_same_batch(s, t, name_s, name_t)
  s, t = pool_to_match(_checks.as_f32(s), _checks.as_f32(t), name_s, name_t)
  return s, t


def hint(student_feature: Array, teacher_feature: Array) -> Array:
  """FitNets hint loss: mean squared error between (adapted) features.

  loss = mean((f_s − f_t)²) over all elements. The student feature is
  expected to be regressed to the teacher's shape already (the regressor is
  part of the method); if only the spatial size differs, the larger map is
  average-pooled.

  Paper: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints
  for Thin Deep Nets", ICLR 2015.

  Args:
    student_feature: ``(B, ...)``; NHWC ``(B, H, W, C)`` or any shape equal
      to the teacher's.
    teacher_feature: same shape (or NHWC with a nested spatial size).

  Returns:
    float32 scalar.
  """
  _checks.check_same_batch(student_feature, teacher_feature, "student_feature", "teacher_feature")
  s, t = _checks.as_f32(student_feature), _checks.as_f32(teacher_feature)
  if s.shape != t.shape and s.ndim == 4 and t.ndim == 4:
    s, t = pool_to_match(s, t, "student_feature", "teacher_feature")
  _checks.check_same_shape(s, t, "student_feature", "teacher_feature")
  return jnp.mean((s - t) ** 2)


def _attention_map(f: Array, p: float) -> Array:
  """a(f) = normalize_{H·W}(mean_c f^p), per sample: ``(B, H·W)``."""
  a = jnp.mean(f**p, axis=-1).reshape(f.shape[0], -1)
  return _l2_normalize(a, axis=-1)


def attention_transfer(student_feature: Array, teacher_feature: Array, p: float = 2) -> Array:
  """Attention transfer: match L2-normalised spatial attention maps.

  a(f) = mean_c(f^p), flattened over H·W and L2-normalised per sample;
  loss = mean_{b, hw}((a(f_s) − a(f_t))²). Follows RepDistiller's
  ``f.pow(p).mean(1)`` + ``F.normalize`` (so f^p, not |f|^p). Channel
  counts may differ; the larger spatial map is average-pooled first.

  Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention",
  ICLR 2017.

  Args:
    student_feature: ``(B, H_s, W_s, C_s)``.
    teacher_feature: ``(B, H_t, W_t, C_t)``.
    p: exponent of the activation (2 in the paper).

  Returns:
    float32 scalar.
  """
  s, t = _prep_pair(student_feature, teacher_feature, "student_feature", "teacher_feature")
  return jnp.mean((_attention_map(s, p) - _attention_map(t, p)) ** 2)


def similarity_preserving(student_feature: Array, teacher_feature: Array) -> Array:
  """Similarity-preserving KD: match row-normalised batch Gram matrices.

  F = features flattened to ``(B, D)``; G = F·Fᵀ ``(B, B)``, each row
  L2-normalised; loss = ‖G_t − G_s‖²_F / B².

  Paper: Tung & Mori, "Similarity-Preserving Knowledge Distillation",
  ICCV 2019.

  Args:
    student_feature: ``(B, ...)`` of any rank >= 2.
    teacher_feature: ``(B, ...)``; its per-sample size may differ.

  Returns:
    float32 scalar.
  """
  _checks.check_min_rank(student_feature, "student_feature", 2)
  _checks.check_min_rank(teacher_feature, "teacher_feature", 2)
  _checks.check_same_batch(student_feature, teacher_feature, "student_feature", "teacher_feature")
  bsz = student_feature.shape[0]
  fs = _checks.as_f32(student_feature).reshape(bsz, -1)
  ft = _checks.as_f32(teacher_feature).reshape(bsz, -1)
  gs = _l2_normalize(fs @ fs.T, axis=1)
  gt = _l2_normalize(ft @ ft.T, axis=1)
  return jnp.sum((gt - gs) ** 2) / (bsz * bsz)


def nst(student_feature: Array, teacher_feature: Array) -> Array:
  """Neuron selectivity transfer: MMD with a degree-2 polynomial kernel.

  Each channel's H·W activation vector is L2-normalised; with
  k(a, b) = (aᵀb)² (polynomial kernel, d = 2, c = 0), per sample
    MMD² = mean_{i,j} k(t_i, t_j) + mean_{i,j} k(s_i, s_j)
           − 2·mean_{i,j} k(s_i, t_j)
  over channel pairs, then the batch mean. Channel counts may differ.

  Paper: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
  Selectivity Transfer", arXiv:1707.01219, 2017.

  Args:
    student_feature: ``(B, H_s, W_s, C_s)``.
    teacher_feature: ``(B, H_t, W_t, C_t)``.

  Returns:
    float32 scalar (>= 0 up to rounding: it is a squared MMD).
  """
  s, t = _prep_pair(student_feature, teacher_feature, "student_feature", "teacher_feature")
  bsz = s.shape[0]
  # (B, H·W, C) -> normalise each channel over H·W.
  s = _l2_normalize(s.reshape(bsz, -1, s.shape[-1]), axis=1)
  t = _l2_normalize(t.reshape(bsz, -1, t.shape[-1]), axis=1)

  def k(a, b):
    return jnp.mean(jnp.einsum("bxi,bxj->bij", a, b) ** 2, axis=(1, 2))

  return jnp.mean(k(t, t) + k(s, s) - 2.0 * k(s, t))


def _fsp_matrix(fa: Array, fb: Array) -> Array:
  """G = F_aᵀ F_b / (H·W) per sample: ``(B, C_a, C_b)``."""
  hw = fb.shape[1] * fb.shape[2]
  return jnp.einsum("bhwi,bhwj->bij", fa, fb) / hw


def fsp(
  student_feature_a: Array, student_feature_b: Array, teacher_feature_a: Array, teacher_feature_b: Array
) -> Array:
  """Flow of solution procedure: match Gram matrices between two layers.

  G = F_aᵀ F_b / (H·W) per sample, shape ``(C_a, C_b)`` (feature a is
  average-pooled to b's spatial size when larger); loss =
  mean_{b,i,j}((G_s − G_t)²). Student and teacher must have equal channel
  counts at a and at b (use adapters otherwise).

  Paper: Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast
  Optimization, Network Minimization and Transfer Learning", CVPR 2017.

  Args:
    student_feature_a: ``(B, H_a, W_a, C_a)``, the earlier layer.
    student_feature_b: ``(B, H_b, W_b, C_b)``, the later layer.
    teacher_feature_a: ``(B, H_a', W_a', C_a)``.
    teacher_feature_b: ``(B, H_b', W_b', C_b)``.

  Returns:
    float32 scalar.
  """
  names = ("student_feature_a", "student_feature_b", "teacher_feature_a", "teacher_feature_b")
  arrs = (student_feature_a, student_feature_b, teacher_feature_a, teacher_feature_b)
  for x, n in zip(arrs, names):
    _checks.check_rank(x, n, 4)
    _checks.check_same_batch(arrs[0], x, names[0], n)
  for i in (0, 1):
    if arrs[i].shape[-1] != arrs[i + 2].shape[-1]:
      raise ConfigError(
        f"{names[i]} and {names[i + 2]} must have the same number of "
        f"channels, got {arrs[i].shape} and {arrs[i + 2].shape}."
      )
  sa, sb = pool_to_match(_checks.as_f32(student_feature_a), _checks.as_f32(student_feature_b), names[0], names[1])
  ta, tb = pool_to_match(_checks.as_f32(teacher_feature_a), _checks.as_f32(teacher_feature_b), names[2], names[3])
  return jnp.mean((_fsp_matrix(sa, sb) - _fsp_matrix(ta, tb)) ** 2)


def factor_transfer(student_factor: Array, teacher_factor: Array, p: int = 1) -> Array:
  """Factor transfer: distance between L2-normalised flattened factors.

  F = normalize(factor.reshape(B, −1)); loss = mean(|F_s − F_t|^p)
  (p = 1: L1 as in the paper; p = 2: MSE).

  Paper: Kim, Park & Kwak, "Paraphrasing Complex Network: Network
  Compression via Factor Transfer", NeurIPS 2018.

  Args:
    student_factor: ``(B, ...)`` output of the student's translator.
    teacher_factor: ``(B, ...)`` output of the teacher's paraphraser; same
      shape (or NHWC with a nested spatial size).
    p: 1 or 2.

  Returns:
    float32 scalar.
  """
  _checks.check_same_batch(student_factor, teacher_factor, "student_factor", "teacher_factor")
  if p not in (1, 2):
    raise ConfigError(f"p must be 1 or 2, got {p!r}.")
  s, t = _checks.as_f32(student_factor), _checks.as_f32(teacher_factor)
  if s.shape != t.shape and s.ndim == 4 and t.ndim == 4:
    s, t = pool_to_match(s, t, "student_factor", "teacher_factor")
  _checks.check_same_shape(s, t, "student_factor", "teacher_factor")
  bsz = s.shape[0]
  d = _l2_normalize(s.reshape(bsz, -1)) - _l2_normalize(t.reshape(bsz, -1))
  return jnp.mean(jnp.abs(d)) if p == 1 else jnp.mean(d * d)


def activation_boundary(student_preact: Array, teacher_preact: Array, margin: float = 1.0) -> Array:
  """Activation-boundary transfer: hinge-squared loss on neuron activation.

  With s, t the (connected) student and teacher pre-activations and m the
  margin, per element

    ℓ = (s + m)² · 1[s > −m and t ≤ 0] + (s − m)² · 1[s ≤ m and t > 0]

  and loss = mean over all elements (B·H·W·C). This is RepDistiller's
  ``criterion_alternative_L2``; the reference then *sums* over elements and
  divides by B·1000 (and weights the layers), which makes the scale depend
  on the map size. kdjax takes the plain mean so the loss is comparable
  across layers and architectures; to recover the reference scale multiply
  by H·W·C / 1000.

  Paper: Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of
  Activation Boundaries Formed by Hidden Neurons", AAAI 2019.

  Args:
    student_preact: ``(B, H, W, C)`` student pre-activation after the
      connector.
    teacher_preact: ``(B, H', W', C)`` teacher pre-activation.
    margin: m > 0.

  Returns:
    float32 scalar.
  """
  _checks.check_same_batch(student_preact, teacher_preact, "student_preact", "teacher_preact")
  s, t = _checks.as_f32(student_preact), _checks.as_f32(teacher_preact)
  if s.shape != t.shape and s.ndim == 4 and t.ndim == 4:
    s, t = pool_to_match(s, t, "student_preact", "teacher_preact")
  _checks.check_same_shape(s, t, "student_preact", "teacher_preact")
  m = jnp.asarray(margin, jnp.float32)
  t = jax.lax.stop_gradient(t)
  neg = (s > -m) & (t <= 0)
  pos = (s <= m) & (t > 0)
  loss = jnp.where(neg, (s + m) ** 2, 0.0) + jnp.where(pos, (s - m) ** 2, 0.0)
  return jnp.mean(loss)


def vid(student_mean: Array, teacher_feature: Array, log_scale: Array, eps: float = 1e-5) -> Array:
  """Variational information distillation: Gaussian negative log-likelihood.

  σ²_c = softplus(log_scale_c) + eps (one variance per channel);
  loss = mean_{b,h,w,c} ½·((μ − t)² / σ²_c + log σ²_c), the NLL of the
  teacher feature under N(μ, σ²) up to the constant ½·log 2π. μ is the
  student's regressor output (part of the method). Spatial sizes are
  matched by average-pooling the larger map.

  Paper: Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information
  Distillation for Knowledge Transfer", CVPR 2019.

  Args:
    student_mean: ``(B, H, W, C)`` or ``(B, C)`` predicted mean μ.
    teacher_feature: same shape as ``student_mean`` (or nested NHWC).
    log_scale: ``(C,)`` unconstrained variance parameter.
    eps: variance floor.

  Returns:
    float32 scalar.
  """
  _checks.check_same_batch(student_mean, teacher_feature, "student_mean", "teacher_feature")
  mu, t = _checks.as_f32(student_mean), _checks.as_f32(teacher_feature)
  if mu.shape != t.shape and mu.ndim == 4 and t.ndim == 4:
    mu, t = pool_to_match(mu, t, "student_mean", "teacher_feature")
  _checks.check_same_shape(mu, t, "student_mean", "teacher_feature")
  _checks.check_rank(log_scale, "log_scale", 1)
  _checks.check_dim(log_scale, 0, t.shape[-1], "log_scale", "the channel count of teacher_feature")
  var = jax.nn.softplus(_checks.as_f32(log_scale)) + eps
  return jnp.mean(0.5 * ((mu - t) ** 2 / var + jnp.log(var)))
