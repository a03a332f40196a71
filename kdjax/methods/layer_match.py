"""Automatic layer pairing: linear CKA between every student and teacher layer, and the monotone alignment
that maximises the summed similarity.

Linear CKA (Kornblith et al. 2019, "Similarity of neural network representations revisited") of two
layers seen on the same N rows, X ``(N, D₁)`` and Y ``(N, D₂)``, each centred over the rows::

    CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F) = ⟨K̂, L̂⟩_F,   K̂ = XXᵀ / ‖XXᵀ‖_F,  L̂ = YYᵀ / ‖YYᵀ‖_F

(the biased HSIC estimator of the paper; 1 for representations equal up to an orthogonal map and a scale,
0 for orthogonal ones). A row is one real position of a sequence ``(B, L, D)`` (the token mask drops
padding; positions of all examples are flattened together), or one example of anything else (an image
feature map ``(B, H, W, C)`` flattened to ``H·W·C`` features).

:func:`monotone_alignment` pairs every student layer with one teacher layer, in order (student layer i+1
never reads a teacher layer below student layer i's), maximising the summed CKA by dynamic programming;
a teacher layer may serve several student layers (``strict=True``: each at most once).

:func:`hint_choice` picks FitNet's single pair instead (Romero et al. 2015, "FitNets: hints for thin deep
nets"): the student's middle candidate (the guided layer) and the teacher candidate of the largest CKA with
it among those the hint regressor can map it onto (the hint layer).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from kdjax.errors import ConfigError

AUTO = ("auto",)
HINT_AUTO = "auto"  # method.hint_layer chosen on data
MIN_ROWS = 3  # centred rows of fewer than 3 rows leave at most one direction: every CKA is 0 or 1


def layer_rows(x: jnp.ndarray, mask: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """``(rows (N, D), weights (N,))`` of a layer's output ``x`` for CKA.

  Sequences ``(B, L, D)``: one row per position (N = B·L), weighted by a token mask ``(B, L)`` or an
  example mask ``(B,)``; anything else ``(B, ...)``: one row per example (N = B, features flattened),
  weighted by an example mask ``(B,)`` (a token mask counts an example with any real position).
  Weights are 0 or 1; ``mask=None`` counts every row.
  """
  x = jnp.asarray(x, jnp.float32)
  b = x.shape[0]
  seq = x.ndim == 3
  rows = x.reshape(b * x.shape[1], x.shape[2]) if seq else x.reshape(b, -1)
  if mask is None:
    return rows, jnp.ones((rows.shape[0],), jnp.float32)
  m = (jnp.asarray(mask) > 0).astype(jnp.float32)
  if seq:
    m = jnp.broadcast_to(m[:, None], x.shape[:2]) if m.ndim == 1 else m
  else:
    m = jnp.max(m.reshape(b, -1), axis=1)
  return rows, m.reshape(-1)


def _centred(rows: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """Rows minus their weighted mean, zero where ``w`` is 0, scaled to unit Frobenius norm (CKA is
  scale-invariant; float32 sums of squares cannot overflow)."""
  mean = jnp.sum(rows * w[:, None], 0) / jnp.maximum(jnp.sum(w), 1.0)
  c = (rows - mean) * w[:, None]
  return c / jnp.maximum(jnp.linalg.norm(c), 1e-30)


def cka_matrix(xs: Sequence[jnp.ndarray], ys: Sequence[jnp.ndarray], weights: jnp.ndarray) -> jnp.ndarray:
  """Linear CKA of every pair ``(xs[i], ys[j])``, ``(len(xs), len(ys))`` float32 in [0, 1].

  Args:
    xs / ys: rows of each layer, ``(N, D_i)`` / ``(N, E_j)``, the same N rows (:func:`layer_rows`).
    weights: ``(N,)`` 0/1: which rows count (centring and sums over them only).

  Computed as ‖YᵀX‖²/(‖XᵀX‖‖YᵀY‖) when every width is at most N, else through the N × N Gram
  matrices ⟨K̂, L̂⟩ (the same number; cheaper for wide feature maps seen on few rows). A constant layer
  has CKA 0 with everything.
  """
  xc = [_centred(x, weights) for x in xs]
  yc = [_centred(y, weights) for y in ys]
  n = weights.shape[0]
  if max(a.shape[1] for a in xc + yc) <= n:
    xn = [jnp.linalg.norm(a.T @ a) for a in xc]
    yn = [jnp.linalg.norm(a.T @ a) for a in yc]
    cross = jnp.stack([jnp.stack([jnp.sum(jnp.square(b.T @ a)) for b in yc]) for a in xc])
    den = jnp.stack(xn)[:, None] * jnp.stack(yn)[None, :]
  else:
    kx = jnp.stack([a @ a.T for a in xc])  # (M, N, N)
    ky = jnp.stack([b @ b.T for b in yc])  # (T, N, N)
    cross = jnp.einsum("inm,jnm->ij", kx, ky)
    den = jnp.linalg.norm(kx, axis=(1, 2))[:, None] * jnp.linalg.norm(ky, axis=(1, 2))[None, :]
  return jnp.where(den > 0, cross / jnp.maximum(den, 1e-30), 0.0)


def linear_cka(x: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Linear CKA of two layers' outputs on the same inputs (rows as :func:`layer_rows`); float32 scalar."""
  rx, w = layer_rows(x, mask)
  ry, _ = layer_rows(y, mask)
  return cka_matrix([rx], [ry], w)[0, 0]


def monotone_alignment(sim, *, strict: bool = False, allowed=None) -> tuple[int, ...]:
  """The teacher layer of each student layer, ``t₀ ≤ t₁ ≤ … ≤ t_{M−1}``, maximising Σᵢ sim[i, tᵢ].

  Dynamic programming over ``sim`` ``(M, T)``: best(i, j) = sim[i, j] + max_{j' ≤ j} best(i − 1, j')
  (``j' < j`` with ``strict``, where each teacher layer serves at most one student layer and M ≤ T is
  needed). O(M·T²); ties go to the lower teacher layer. ``allowed`` ``(M, T)`` bool: pairs that may be
  chosen (layers of the same positions, for terms that compare position by position).
  """
  sim = np.asarray(sim, np.float64)
  m, t = sim.shape
  if allowed is not None:
    sim = np.where(np.asarray(allowed, bool), sim, -np.inf)
  if m == 0 or t == 0:
    raise ConfigError(f"layer_map=auto: no layers to pair ({m} student, {t} teacher)")
  if strict and m > t:
    raise ConfigError(f"layer_map=auto (strict): {m} student layers cannot each take their own of {t} teacher layers")
  best = np.full((m, t), -np.inf)
  back = np.zeros((m, t), np.int64)
  best[0] = sim[0]  # −inf where not allowed
  for i in range(1, m):
    for j in range(t):
      prev = best[i - 1, : j if strict else j + 1]
      if prev.size and np.isfinite(prev.max()):
        back[i, j] = int(np.argmax(prev))
        best[i, j] = sim[i, j] + prev[back[i, j]]
  if not np.isfinite(best[m - 1]).any():
    raise ConfigError(
      "layer_map=auto: no order-preserving map pairs every student layer with a teacher layer of the same "
      "positions (shapes other than the width); give method.layer_map"
    )
  pairs = [int(np.argmax(best[m - 1]))]
  for i in range(m - 1, 0, -1):
    pairs.append(int(back[i, pairs[-1]]))
  return tuple(reversed(pairs))


def guided_layer(m: int) -> int:
  """FitNet's guided layer among ``m`` candidate layers: the middle one, layer ⌈m/2⌉ of 1…m (0-based ``(m−1)//2``;
  ``stage2`` of a CNN's three stages)."""
  return (m - 1) // 2


def hint_mappable(s_shape: Sequence[int], t_shape: Sequence[int]) -> bool:
  """Whether FitNet's regressor maps a student feature of shape ``s_shape`` onto a teacher feature of shape
  ``t_shape`` (shapes without the batch axis): vectors ``(D,)`` and sequences ``(L, D)`` whose shapes differ
  in the width only (a linear map, per token), NHWC maps ``(H, W, C)`` whose ``H × W`` is the teacher's,
  twice it or half of it (RepDistiller's ConvReg: 1×1 conv, 3×3 stride-2 conv, 4×4 stride-2 transposed conv)."""
  s, t = tuple(s_shape), tuple(t_shape)
  if len(s) != len(t) or len(s) not in (1, 2, 3):
    return False
  if len(s) < 3:
    return s[:-1] == t[:-1]
  (hs, ws), (ht, wt) = s[:2], t[:2]
  return (hs, ws) in ((ht, wt), (2 * ht, 2 * wt)) or (2 * hs, 2 * ws) == (ht, wt)


def hint_choice(sim, student: Sequence[Sequence[int]], teacher: Sequence[Sequence[int]]) -> tuple[int, int]:
  """FitNet's ``(guided student layer, hint teacher layer)`` indices: the student's :func:`guided_layer` and
  the teacher layer j of the largest ``sim[i, j]`` (``(M, T)``, linear CKA) among those :func:`hint_mappable`
  from it (ties: the lower layer). ``student`` / ``teacher``: the candidates' feature shapes (no batch axis).
  """
  i = guided_layer(len(student))
  ok = np.array([hint_mappable(student[i], t) for t in teacher], bool)
  if not ok.any():
    raise ConfigError(
      f"hint_layer=auto: no teacher layer of shapes {[tuple(t) for t in teacher]} can be regressed from the "
      f"student's middle layer {tuple(student[i])} (same positions; NHWC maps of 1×, 2× or ½× H × W); "
      "give method.hint_layer 's=t'"
    )
  row = np.where(ok, np.asarray(sim, np.float64)[i], -np.inf)
  return i, int(np.argmax(row))


def candidates(features: Mapping[str, tuple], template: str | None, who: str) -> tuple[tuple[str, ...], bool]:
  """``(layer names, by_index)``: a model's layers that auto pairing compares.

  The layers ``template`` numbers among ``features`` (``"block{i}"`` for i = 0, 1, … while present;
  ``by_index`` True), else the model's stages ``"stage1"`` … ``"stageK"`` (a CNN of the zoo; False).
  ``ConfigError`` naming what exists when there are none.
  """
  if template:
    names = tuple(itertools.takewhile(lambda n: n in features, (template.format(i=i) for i in itertools.count())))
    if names:
      return names, True
  stages = sorted((int(m.group(1)), k) for k in features if (m := re.fullmatch(r"stage(\d+)", k)))
  if stages:
    return tuple(k for _, k in stages), False
  raise ConfigError(
    f"layer pairing by CKA: no candidate layers in the {who} (no {template!r} layers, no 'stageK' features; "
    f"features: {sorted(features)}); set method.{who}_layers to its layers' feature name or module path with '{{i}}'"
  )


def provisional(cfg, student: Mapping[str, tuple], teacher: Mapping[str, tuple]):
  """``cfg`` with ``layer_map=auto`` replaced by a stand-in over the same candidate layers (TinyBERT's
  uniform map), and ``hint_layer=auto`` by the guided layer and the first teacher layer it can be regressed
  onto, to validate the method on the models' descriptions before any model runs."""
  s, by_s = candidates(student, cfg.student_layers, "student")
  t, by_t = candidates(teacher, cfg.teacher_layers, "teacher")
  if cfg.hint_layer == HINT_AUTO:
    i, j = hint_choice(np.zeros((len(s), len(t))), [student[n] for n in s], [teacher[n] for n in t])
    cfg = dataclasses.replace(cfg, hint_layer=f"{s[i]}={t[j]}")
  if cfg.layer_map != AUTO:
    return cfg
  if by_s and by_t:
    return dataclasses.replace(cfg, layer_map=("uniform",))
  targets = [min((i + 1) * len(t) // len(s), len(t)) - 1 if len(s) <= len(t) else 0 for i in range(len(s))]
  return dataclasses.replace(cfg, layer_map=map_entries(s, t, [max(x, 0) for x in targets], False))


def map_entries(
  student: Sequence[str], teacher: Sequence[str], targets: Sequence[int], by_index: bool
) -> tuple[str, ...]:
  """``method.layer_map`` entries of an alignment: ``"s=t"`` layer indices when the candidates are a
  model's numbered layers (``student_layers``/``teacher_layers``), else feature names (``"stage1=stage3"``)."""
  if by_index:
    return tuple(f"{i}={t}" for i, t in enumerate(targets))
  return tuple(f"{student[i]}={teacher[t]}" for i, t in enumerate(targets))
