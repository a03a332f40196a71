"""Evaluation diagnostics: accuracy, agreement, KL(teacher ‖ student), ECE, CKA.

All functions are pure ``jnp`` (jit-safe), compute in float32 whatever the
input dtype, and take logits of shape ``(..., C)`` with an optional boolean
``mask`` of shape ``logits.shape[:-1]`` (``True`` = count this example/token).

Whole-split metrics are accumulated, not averaged per batch: the per-batch part
(``eval_batch_stats``, ``calibration_bins``, ``cka_stats``) returns *sums* that
are additive across batches, so the engine jits it, adds the sums on the host
(float64) and calls ``finalize_eval_stats`` / ``ece_from_bins`` /
``cka_from_stats`` once at the end. Padded examples (``mask == False``) add
nothing.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import ConfigError

__all__ = [
  "accuracy",
  "agreement",
  "kl_teacher_student",
  "calibration_bins",
  "ece_from_bins",
  "expected_calibration_error",
  "linear_cka",
  "cka_stats",
  "cka_from_stats",
  "eval_batch_stats",
  "finalize_eval_stats",
]


def _mask(mask: Any, batch_shape: tuple[int, ...]) -> jnp.ndarray:
  """The mask as float32 of shape ``batch_shape`` (all ones when ``None``)."""
  if mask is None:
    return jnp.ones(batch_shape, jnp.float32)
  mask = jnp.asarray(mask)
  if mask.shape != batch_shape:
    raise ConfigError(
      f"mask has shape {mask.shape} but the logits' batch shape is {batch_shape}; "
      "pass a mask of shape logits.shape[:-1]"
    )
  return mask.astype(jnp.float32)


def _masked_mean(values: jnp.ndarray, m: jnp.ndarray) -> jnp.ndarray:
  # max(…, 1) keeps an all-padding batch at 0 instead of NaN.
  return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def _check_pair(student_logits, teacher_logits) -> None:
  if student_logits.shape != teacher_logits.shape:
    raise ConfigError(
      f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} differ in "
      "shape; both must be (..., C) over the same classes"
    )


def accuracy(logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Top-1 accuracy: the fraction of (unmasked) examples with argmax(logits) == label.

  Args:
    logits: ``(..., C)``.
    labels: integer class ids, ``logits.shape[:-1]``.
    mask: optional boolean ``logits.shape[:-1]``.

  Returns:
    float32 scalar in [0, 1].
  """
  logits = jnp.asarray(logits)
  m = _mask(mask, logits.shape[:-1])
  correct = (jnp.argmax(logits, axis=-1) == jnp.asarray(labels)).astype(jnp.float32)
  return _masked_mean(correct, m)


def agreement(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Top-1 agreement: the fraction of examples where argmax(student) == argmax(teacher).

  A student can agree with its teacher more than either agrees with the labels
  (Stanton et al. 2021, "Does knowledge distillation really work?"): this is
  the fidelity measure, accuracy is the generalisation measure.

  Args:
    student_logits, teacher_logits: ``(..., C)``.
    mask: optional boolean ``(...)``.

  Returns:
    float32 scalar in [0, 1].
  """
  s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
  _check_pair(s, t)
  m = _mask(mask, s.shape[:-1])
  agree = (jnp.argmax(s, axis=-1) == jnp.argmax(t, axis=-1)).astype(jnp.float32)
  return _masked_mean(agree, m)


def _kl_per_example(student_logits, teacher_logits, temperature: float) -> jnp.ndarray:
  s = jnp.asarray(student_logits, jnp.float32) / temperature
  t = jnp.asarray(teacher_logits, jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  p_t = jnp.exp(log_p_t)
  # where(p_t > 0) so that 0 · log 0 = 0 even with -inf teacher logits.
  return jnp.sum(jnp.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0), axis=-1)


def kl_teacher_student(
  student_logits: jnp.ndarray, teacher_logits: jnp.ndarray, mask: jnp.ndarray | None = None, temperature: float = 1.0
) -> jnp.ndarray:
  """Mean KL(teacher ‖ student) of the temperature-softened distributions, in nats.

  KL(p_T ‖ p_S) = Σ_c p_T,c (log p_T,c − log p_S,c), with p = softmax(z / τ),
  averaged over unmasked examples. This is the forward KL that Hinton-style KD
  minimises; it is *not* multiplied by τ² (a diagnostic, not a loss).

  Args:
    student_logits, teacher_logits: ``(..., C)``.
    mask: optional boolean ``(...)``.
    temperature: τ > 0.

  Returns:
    float32 scalar ≥ 0.
  """
  s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
  _check_pair(s, t)
  m = _mask(mask, s.shape[:-1])
  return _masked_mean(_kl_per_example(s, t, temperature), m)


def calibration_bins(
  logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray | None = None, num_bins: int = 15
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Per-bin sums for the expected calibration error (additive across batches).

  Confidence = max_c softmax(logits)_c. Bins are equal-width, B_b = ((b−1)/M, b/M]
  for b = 1…M (Guo et al. 2017, "On calibration of modern neural networks").

  Returns:
    ``(count, conf_sum, correct_sum)``, each float32 ``(num_bins,)``: the number
    of examples whose confidence falls in each bin, the sum of their
    confidences, and the number of them predicted correctly.
  """
  logits = jnp.asarray(logits, jnp.float32)
  m = _mask(mask, logits.shape[:-1]).reshape(-1)
  probs = jax.nn.softmax(logits, axis=-1)
  conf = jnp.max(probs, axis=-1).reshape(-1)
  correct = (jnp.argmax(logits, axis=-1) == jnp.asarray(labels)).astype(jnp.float32).reshape(-1)
  # ceil(conf·M) − 1 puts a confidence on a bin's upper edge into that bin.
  idx = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  count = jnp.zeros(num_bins, jnp.float32).at[idx].add(m)
  conf_sum = jnp.zeros(num_bins, jnp.float32).at[idx].add(conf * m)
  correct_sum = jnp.zeros(num_bins, jnp.float32).at[idx].add(correct * m)
  return count, conf_sum, correct_sum


def ece_from_bins(count: Any, conf_sum: Any, correct_sum: Any) -> jnp.ndarray:
  """ECE from (summed) bin statistics: Σ_b (n_b / N) |acc_b − conf_b|.

  Since n_b · acc_b = correct_sum_b and n_b · conf_b = conf_sum_b this is
  Σ_b |correct_sum_b − conf_sum_b| / N. Returns 0 when N = 0.
  """
  count = jnp.asarray(count, jnp.float32)
  diff = jnp.abs(jnp.asarray(correct_sum, jnp.float32) - jnp.asarray(conf_sum, jnp.float32))
  return jnp.sum(diff) / jnp.maximum(jnp.sum(count), 1.0)


def expected_calibration_error(
  logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray | None = None, num_bins: int = 15
) -> jnp.ndarray:
  """Expected calibration error with ``num_bins`` equal-width confidence bins (Guo et al. 2017).

  ECE = Σ_b (n_b / N) |acc_b − conf_b|, a fraction in [0, 1].

  Args:
    logits: ``(..., C)``; labels: ``(...)`` integer; mask: optional boolean ``(...)``.
  """
  return ece_from_bins(*calibration_bins(logits, labels, mask, num_bins=num_bins))


def linear_cka(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Linear centred kernel alignment (Kornblith et al. 2019, "Similarity of neural network representations revisited").

  With X, Y column-centred, CKA = ‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F), in [0, 1];
  invariant to orthogonal transforms and isotropic scaling of either input.

  Args:
    x: ``(N, D1)``; y: ``(N, D2)`` — the same N examples (extra trailing axes
      are flattened). The engine computes it on a fixed subset of the eval
      split (the first ``kdjax.engine.loop.CKA_EXAMPLES`` = 1024 unmasked
      examples); for a whole split use ``cka_stats`` + ``cka_from_stats``.

  Returns:
    float32 scalar (0 when either input is constant).
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  x = x.reshape(x.shape[0], -1)
  y = y.reshape(y.shape[0], -1)
  if x.shape[0] != y.shape[0]:
    raise ConfigError(f"linear_cka needs the same examples in x and y, got {x.shape[0]} and {y.shape[0]} rows")
  x = x - jnp.mean(x, axis=0, keepdims=True)
  y = y - jnp.mean(y, axis=0, keepdims=True)
  # CKA is scale-invariant: normalise first so float32 sums of squares cannot overflow.
  x = x / jnp.maximum(jnp.linalg.norm(x), 1e-30)
  y = y / jnp.maximum(jnp.linalg.norm(y), 1e-30)
  n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
  if n < max(d1, d2):  # Gram form: ‖YᵀX‖² = ⟨XXᵀ, YYᵀ⟩, cheaper when N is small.
    k, l = x @ x.T, y @ y.T
    cross, nx, ny = jnp.sum(k * l), jnp.linalg.norm(k), jnp.linalg.norm(l)
  else:
    cross = jnp.sum(jnp.square(y.T @ x))
    nx, ny = jnp.linalg.norm(x.T @ x), jnp.linalg.norm(y.T @ y)
  return jnp.where(nx * ny > 0, cross / jnp.maximum(nx * ny, 1e-30), 0.0)


def cka_stats(x: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
  """Additive (uncentred) moment sums for linear CKA over many batches.

  Sum these over batches (in float64 on the host: centring afterwards
  subtracts large numbers) and call ``cka_from_stats``. Memory is
  O(D1² + D2² + D1·D2), so use it for pooled features, not feature maps.
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  x = x.reshape(x.shape[0], -1)
  y = y.reshape(y.shape[0], -1)
  m = _mask(mask, (x.shape[0],))[:, None]
  xm, ym = x * m, y * m
  return {"n": jnp.sum(m), "sx": jnp.sum(xm, 0), "sy": jnp.sum(ym, 0), "xx": xm.T @ x, "yy": ym.T @ y, "yx": ym.T @ x}


def cka_from_stats(stats: Mapping[str, Any]) -> float:
  """Linear CKA from summed ``cka_stats`` (host, float64)."""
  s = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  n = float(s["n"])
  if n <= 0:
    return float("nan")
  mx, my = s["sx"] / n, s["sy"] / n
  cxx = s["xx"] - n * np.outer(mx, mx)
  cyy = s["yy"] - n * np.outer(my, my)
  cyx = s["yx"] - n * np.outer(my, mx)
  den = np.linalg.norm(cxx) * np.linalg.norm(cyy)
  return float(np.sum(cyx**2) / den) if den > 0 else 0.0


def eval_batch_stats(
  student_logits: jnp.ndarray,
  teacher_logits: jnp.ndarray | None,
  labels: jnp.ndarray,
  mask: jnp.ndarray | None = None,
  *,
  num_bins: int = 15,
  temperature: float = 1.0,
) -> dict[str, jnp.ndarray]:
  """Additive per-batch sums for ``finalize_eval_stats`` (jit this; add the results on the host).

  Keys: ``count``, ``correct``, ``nll_sum`` (−log p_student(label), summed),
  ``ece_count``/``ece_conf``/``ece_correct`` (``(num_bins,)``) and, with a
  teacher, ``teacher_correct``, ``agree``, ``kl_sum`` (KL(teacher ‖ student)
  at ``temperature``, summed over examples); ``token_batches`` (1) when the
  logits are per token (``(B, L, V)``), so the totals read as per-token
  figures and a perplexity.
  """
  s = jnp.asarray(student_logits)
  m = _mask(mask, s.shape[:-1])
  labels = jnp.asarray(labels)
  s_pred = jnp.argmax(s, axis=-1)
  count, conf_sum, correct_sum = calibration_bins(s, labels, m, num_bins=num_bins)
  logp = jax.nn.log_softmax(s.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  out = {
    "count": jnp.sum(m),
    "correct": jnp.sum((s_pred == labels).astype(jnp.float32) * m),
    "nll_sum": jnp.sum(nll * m),
    "ece_count": count,
    "ece_conf": conf_sum,
    "ece_correct": correct_sum,
  }
  if s.ndim > 2:
    out["token_batches"] = jnp.float32(1.0)
  if teacher_logits is not None:
    t = jnp.asarray(teacher_logits)
    _check_pair(s, t)
    t_pred = jnp.argmax(t, axis=-1)
    out["teacher_correct"] = jnp.sum((t_pred == labels).astype(jnp.float32) * m)
    out["agree"] = jnp.sum((s_pred == t_pred).astype(jnp.float32) * m)
    out["kl_sum"] = jnp.sum(_kl_per_example(s, t, temperature) * m)
  return out


def finalize_eval_stats(sums: Mapping[str, Any]) -> dict[str, float]:
  """Whole-split metrics from summed ``eval_batch_stats`` (host, float64).

  Returns ``test_accuracy``, ``test_nll`` (mean −log p(label), nats), ``ece``,
  ``num_examples`` and, when the sums carry a teacher,
  ``teacher_test_accuracy``, ``agreement``, ``teacher_student_kl``. For token
  logits every figure is per counted token (``num_examples`` counts tokens)
  and ``perplexity`` = exp(``test_nll``) is added. Fractions are in [0, 1];
  NaN when nothing was counted.
  """
  s = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  n = float(s["count"])
  div = (lambda v: float(v) / n) if n > 0 else (lambda v: float("nan"))
  out = {"test_accuracy": div(s["correct"])}
  if "nll_sum" in s:
    out["test_nll"] = div(s["nll_sum"])
    if float(s.get("token_batches", 0.0)) > 0:
      out["perplexity"] = float(np.exp(out["test_nll"]))
  if "teacher_correct" in s:
    out["teacher_test_accuracy"] = div(s["teacher_correct"])
    out["agreement"] = div(s["agree"])
    out["teacher_student_kl"] = div(s["kl_sum"])
  out["ece"] = div(np.sum(np.abs(s["ece_correct"] - s["ece_conf"])))
  out["num_examples"] = n
  return out
