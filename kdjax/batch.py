"""The batch contract: the keys every kdjax loader, cache, step and loss agrees on.

A batch is a dict of arrays whose leading axis is the batch ``B``. Loaders
yield this process's rows of the global batch as NumPy arrays;
``Distiller.step`` assembles them into global ``jax.Array``s on the mesh.

==================  ============================  ==========================================
key                 shape, dtype                  meaning
==================  ============================  ==========================================
``inputs``          ``(B, ...)``                  student inputs: images ``(B, H, W, C)``,
                                                  signals ``(B, L)``, token ids ``(B, L)`` int32
``label``           ``(B,)`` / ``(B, L)`` int32   class or next-token target; −1 = unlabelled
``mask``            ``(B,)`` / ``(B, L)`` bool    which examples / positions count
``teacher_inputs``  like ``inputs``               optional: the teacher's own view, or for a
                    / ``(B, L_t)`` int32          language model the same text in the teacher's
                                                  tokenization (cross-tokenizer distillation)
``teacher_mask``    ``(B, L_t)`` bool             with those: the teacher positions that predict
                                                  a response token (what ``uld`` pairs)
``segment_ids``     ``(B, L)`` int32              packed token rows: which example each position
                                                  belongs to (from 1; 0 = padding)
``positions``       ``(B, L)`` int32              packed token rows: position within its example
``id``              ``(B,)`` int32                example id (views, CRD's memory bank)
``epoch``           ``(B,)`` int32                the epoch the batch was drawn in
``label_b``         ``(B,)`` int32                mixup/cutmix partner label
``mix_lambda``      ``(B,)`` float32              weight of ``label`` (1 − λ for ``label_b``)
``teacher_logits``  ``(B, C)`` / ``(B, L, V)``    cached teacher logits (dense)
``teacher_topk_logp``  ``(B, [L,] k)``            cached top-k teacher log-probabilities
``teacher_topk_idx``   ``(B, [L,] k)`` int32      their class / token ids
``view_index``      ``(B,)`` int32                which cached view the inputs are
``task``            ``(B,)`` int32                which teacher scores the row when several
                                                  are routed (``method.multi_teacher="route"``)
``teacher_outputs``  tuple of ``ModelOutput``     the teacher(s)' outputs, computed ahead on
                                                  their own devices (``split`` placement)
==================  ============================  ==========================================

Cached teacher outputs reach the methods as the declared fields of
:class:`kdjax.models.ModelOutput` (``logits``, ``topk_logp``, ``topk_idx``),
never as feature entries.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

from kdjax.errors import ConfigError

INPUTS = "inputs"
LABEL = "label"
MASK = "mask"
TEACHER_INPUTS = "teacher_inputs"
TEACHER_MASK = "teacher_mask"
ID = "id"
SEGMENT_IDS = "segment_ids"
POSITIONS = "positions"
EPOCH = "epoch"
LABEL_B = "label_b"
MIX_LAMBDA = "mix_lambda"
TEACHER_LOGITS = "teacher_logits"
TEACHER_TOPK_LOGP = "teacher_topk_logp"
TEACHER_TOPK_IDX = "teacher_topk_idx"
VIEW_INDEX = "view_index"
TASK = "task"
TEACHER_OUTPUTS = "teacher_outputs"

CACHED_TEACHER = (TEACHER_LOGITS, TEACHER_TOPK_LOGP, TEACHER_TOPK_IDX)


def inputs(batch: Mapping[str, Any]) -> Any:
  """The student inputs of ``batch`` (``ValueError`` naming the keys when missing)."""
  if INPUTS not in batch:
    raise ConfigError(f"batch has no {INPUTS!r} entry (keys: {sorted(batch)}); see kdjax.batch for the contract")
  return batch[INPUTS]


def model_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """What a model call takes from ``batch`` besides its inputs: packed token rows' ``segment_ids`` and
  ``positions`` (each example attends within itself), nothing for other batches."""
  return {k: batch[k] for k in (SEGMENT_IDS, POSITIONS) if k in batch}


def teacher_model_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """:func:`model_kwargs` for the teacher's call: none when it reads inputs of its own (``teacher_inputs``)."""
  return {} if TEACHER_INPUTS in batch else model_kwargs(batch)


def teacher_inputs(batch: Mapping[str, Any]) -> Any:
  """The teacher's inputs: its own view when the batch has one, else the student's."""
  return batch[TEACHER_INPUTS] if TEACHER_INPUTS in batch else inputs(batch)


def has_cached_teacher(batch: Mapping[str, Any]) -> bool:
  return any(k in batch for k in CACHED_TEACHER)
