"""Contrastive representation distillation (CRD) with an explicit memory bank.

The memory bank is a small pytree (:class:`CRDBank`) passed in and returned
by :func:`crd`; nothing is mutated in place. It is built only from gathers
and scatters (``.at[]``), so it works under ``jax.jit`` and with the
bank's rows sharded over a mesh; under a mesh with explicit axis types the
gathered rows follow the indices' sharding and the updated bank keeps its
own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from kdjax.errors import ConfigError
from kdjax.losses import _checks

Array = jax.Array

_NCE_EPS = 1e-7  # RepDistiller's ContrastLoss eps.


class CRDBank(NamedTuple):
  """CRD memory bank state (a pytree).

  Attributes:
    student: ``(N, D)`` memory of student embeddings, one row per example.
    teacher: ``(N, D)`` memory of teacher embeddings.
    z_student: scalar normaliser Z of the student-side scores (student
      embedding against the teacher memory); ``<= 0`` means "not set yet".
    z_teacher: scalar normaliser Z of the teacher-side scores (teacher
      embedding against the student memory).
  """

  student: Array
  teacher: Array
  z_student: Array
  z_teacher: Array


def crd_init(key: Array, num_examples: int, feature_dim: int) -> CRDBank:
  """Creates a CRD memory bank as RepDistiller's ``ContrastMemory`` does.

  Both memories are drawn uniform in [−stdv, stdv] with
  stdv = 1/sqrt(D/3) (so rows have unit norm in expectation); both Z
  normalisers start at −1 (unset) and are estimated on the first call to
  :func:`crd`.

  Args:
    key: a ``jax.random.key``.
    num_examples: N, the size of the training set (one row per example).
    feature_dim: D, the embedding width of the CRD heads.

  Returns:
    a :class:`CRDBank` with float32 leaves.
  """
  if num_examples <= 0:
    raise ConfigError(f"num_examples must be > 0, got {num_examples!r}.")
  if feature_dim <= 0:
    raise ConfigError(f"feature_dim must be > 0, got {feature_dim!r}.")
  stdv = 1.0 / math.sqrt(feature_dim / 3.0)
  ks, kt = jax.random.split(key)
  shape = (num_examples, feature_dim)
  return CRDBank(
    student=jax.random.uniform(ks, shape, jnp.float32, -stdv, stdv),
    teacher=jax.random.uniform(kt, shape, jnp.float32, -stdv, stdv),
    z_student=jnp.asarray(-1.0, jnp.float32),
    z_teacher=jnp.asarray(-1.0, jnp.float32),
  )


def crd_negatives(key: Array, batch_size: int, num_examples: int, num_negatives: int) -> Array:
  """Uniformly sampled negative ids ``(B, K)`` (RepDistiller's sampler).

  The reference draws from a uniform AliasMethod over all N examples, so a
  negative may coincide with the positive; this does the same.
  """
  return jax.random.randint(key, (batch_size, num_negatives), 0, num_examples, dtype=jnp.int32)


def _spec(x: Array) -> tuple:
  """The explicit-mesh PartitionSpec of ``x`` (all ``None`` otherwise)."""
  try:
    spec = tuple(jax.typeof(x).sharding.spec)
  except AttributeError:  # no sharding in the type (eager NumPy input)
    spec = ()
  return spec + (None,) * (jnp.ndim(x) - len(spec))


def _gather_rows(mem: Array, idx: Array) -> Array:
  """``mem[idx]`` as a gather; explicit-mesh safe.

  Under a mesh with explicit axes the output follows the sharding of the
  indices (e.g. batch-sharded on ``"data"``), with the feature axis
  unsharded; otherwise a plain ``jnp.take``.
  """
  idx_spec, mem_spec = _spec(idx), _spec(mem)
  if any(a is not None for a in idx_spec + mem_spec):
    return mem.at[idx].get(out_sharding=PartitionSpec(*idx_spec, None))
  return jnp.take(mem, idx, axis=0)


def _scatter_rows(mem: Array, idx: Array, rows: Array) -> Array:
  """``mem.at[idx].set(rows)``, keeping ``mem``'s (explicit) sharding."""
  mem_spec, idx_spec = _spec(mem), _spec(idx)
  if any(a is not None for a in idx_spec + mem_spec):
    return mem.at[idx].set(rows, out_sharding=PartitionSpec(*mem_spec))
  return mem.at[idx].set(rows)


def _normalize(x: Array, eps: float = 1e-12) -> Array:
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def _nce_loss(log_x: Array, num_examples: int) -> Array:
  """RepDistiller's ContrastLoss on log-scores ``(B, 1 + K)``, column 0 = pos.

  With Pn = 1/N and c = K·Pn + eps:
    loss = −(1/B)·[Σ_b log(x_b,0 / (x_b,0 + c))
                   + Σ_{b,k≥1} log(K·Pn / (x_b,k + c))],
  computed as differences of ``logaddexp`` so that nothing overflows.
  """
  bsz, kp1 = log_x.shape
  k = kp1 - 1
  log_c = jnp.log(k / num_examples + _NCE_EPS)
  denom = jnp.logaddexp(log_x, log_c)
  log_d1 = log_x[:, 0] - denom[:, 0]
  log_d0 = math.log(k / num_examples) - denom[:, 1:]
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / bsz


def _check_crd(
  bank: CRDBank,
  student_embedding: Array,
  teacher_embedding: Array,
  example_ids: Array,
  negative_ids: Array,
  temperature: float,
  momentum: float,
) -> None:
  """Checks the inputs of :func:`crd` against the bank's N rows of width D."""
  n, d = bank.student.shape
  _checks.check_rank(student_embedding, "student_embedding", 2)
  _checks.check_rank(teacher_embedding, "teacher_embedding", 2)
  _checks.check_same_batch(student_embedding, teacher_embedding, "student_embedding", "teacher_embedding")
  bsz = student_embedding.shape[0]
  _checks.check_dim(student_embedding, 1, d, "student_embedding", "the bank's feature_dim")
  _checks.check_dim(teacher_embedding, 1, d, "teacher_embedding", "the bank's feature_dim")
  _checks.check_rank(example_ids, "example_ids", 1)
  _checks.check_dim(example_ids, 0, bsz, "example_ids", "the batch size")
  _checks.check_rank(negative_ids, "negative_ids", 2)
  _checks.check_dim(negative_ids, 0, bsz, "negative_ids", "the batch size")
  _checks.check_indices(example_ids, n, "example_ids")
  _checks.check_indices(negative_ids, n, "negative_ids")
  _checks.check_positive(temperature, "temperature")
  _checks.check_in_unit_interval(momentum, "momentum")


def _log_z(z: Array, score: Array, num_examples: int) -> Array:
  """log Z of one side: log z once set (z > 0), else the estimate log(N · mean(exp(score))).

  The estimate is taken under ``stop_gradient`` on the first call and then
  kept fixed in the bank, as RepDistiller does.
  """
  est = jax.nn.logsumexp(jax.lax.stop_gradient(score)) - math.log(score.size) + math.log(num_examples)
  return jnp.where(z > 0, jnp.log(jnp.where(z > 0, z, 1.0)), est)


def _update_memory(mem: Array, example_ids: Array, v: Array, mom: Array) -> Array:
  """m[id] ← normalize(momentum·m[id] + (1 − momentum)·v) for the positives, with a stop-gradient ``v``."""
  rows = _gather_rows(mem, example_ids)
  new = _normalize(mom * rows + (1.0 - mom) * jax.lax.stop_gradient(v))
  return _scatter_rows(mem, example_ids, new.astype(mem.dtype))


def crd(
  bank: CRDBank,
  student_embedding: Array,
  teacher_embedding: Array,
  example_ids: Array,
  negative_ids: Array,
  temperature: float = 0.07,
  momentum: float = 0.5,
) -> tuple[Array, CRDBank]:
  """Contrastive representation distillation: two-way NCE with a memory bank.

  Embeddings (projected and L2-normalised by the method's embed heads, and
  normalised again here) are scored against memory rows gathered under
  ``stop_gradient``: example b's student embedding v_s against the teacher
  memory rows of its positive (``example_ids[b]``) and K negatives,
  x_b,k = exp(<v_s,b, m_t[idx_b,k]> / T) / Z_s, Z_s = N · mean(exp(<v, m>/T))
  estimated once while the bank's ``z_student <= 0`` (:func:`_log_z`). The
  NCE loss (RepDistiller's ``ContrastLoss``, Pn = 1/N, eps = 1e-7):

    L_s = −(1/B)·[Σ_b log(x_b,0/(x_b,0 + K·Pn + eps))
                  + Σ_{b,k≥1} log(K·Pn/(x_b,k + K·Pn + eps))].

  The teacher side swaps the roles (teacher embedding against the student
  memory, Z_t); the loss is L_s + L_t, with gradients into both embeddings,
  not the bank. Then the positives' rows move to normalize(momentum·m +
  (1 − momentum)·v) (:func:`_update_memory`); ``example_ids`` within a batch
  should be distinct (a duplicated id gets one of its updates).

  Paper: Tian, Krishnan & Isola, "Contrastive Representation
  Distillation", ICLR 2020 (reference code: RepDistiller).

  Args:
    bank: the :class:`CRDBank` (N rows of width D).
    student_embedding, teacher_embedding: ``(B, D)`` each.
    example_ids: ``(B,)`` int rows of the positives (dataset indices).
    negative_ids: ``(B, K)`` int rows of the negatives.
    temperature: NCE temperature T > 0.
    momentum: memory momentum in [0, 1].

  Returns:
    ``(loss, new_bank)``: a float32 scalar and the updated bank.
  """
  _check_crd(bank, student_embedding, teacher_embedding, example_ids, negative_ids, temperature, momentum)
  n = bank.student.shape[0]
  t, mom = jnp.asarray(temperature, jnp.float32), jnp.asarray(momentum, jnp.float32)
  vs, vt = _normalize(_checks.as_f32(student_embedding)), _normalize(_checks.as_f32(teacher_embedding))
  idx = jnp.concatenate([example_ids[:, None], negative_ids], axis=1)
  mem_s, mem_t = (jax.lax.stop_gradient(mem.astype(jnp.float32)) for mem in (bank.student, bank.teacher))
  w_t, w_s = _gather_rows(mem_t, idx), _gather_rows(mem_s, idx)  # (B, 1+K, D) teacher / student memory rows
  score_s, score_t = jnp.einsum("bkd,bd->bk", w_t, vs) / t, jnp.einsum("bkd,bd->bk", w_s, vt) / t
  log_zs, log_zt = _log_z(bank.z_student, score_s, n), _log_z(bank.z_teacher, score_t, n)
  loss = _nce_loss(score_s - log_zs, n) + _nce_loss(score_t - log_zt, n)
  new_bank = CRDBank(
    student=_update_memory(bank.student, example_ids, vs, mom),
    teacher=_update_memory(bank.teacher, example_ids, vt, mom),
    z_student=jnp.exp(log_zs).astype(jnp.float32),
    z_teacher=jnp.exp(log_zt).astype(jnp.float32),
  )
  return loss, new_bank
