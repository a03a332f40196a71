"""Which student layer should learn from which teacher layer: linear CKA on data, and ``layer_map="auto"``.

    sim = kdjax.layer_similarity(student, teacher, batches)         # CKA of every student × teacher layer
    sim.cka, sim.layer_map, sim.pairs                               # (M, T) matrix; ("0=1", "1=3"); names
    cfg, sim = kdjax.auto_layer_map(student, teacher, batches, MethodConfig("hidden_mse", layer_map=("auto",)))

The models run as the engine runs them (:func:`kdjax.engine.state.apply_model`, layers tapped by path,
eval mode) under ``jit`` on the mesh, one program per batch shape; the CKA matrix is one more program over
the gathered rows (:mod:`kdjax.methods.layer_match` states the formula, the rows and the alignment).
``Distiller.init`` resolves ``layer_map=("auto",)`` this way before the method is built, so the step sees
an explicit map; ``kdjax distill`` also writes ``layer_map.json`` and ``layer_map.png`` to the run's
workdir and the map and matrix to ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import batch as batch_keys
from kdjax.engine.state import ModelDef, apply_model, describe
from kdjax.engine.taps import template_paths
from kdjax.errors import ConfigError
from kdjax.methods import MethodConfig
from kdjax.methods import layer_match
from kdjax.parallel import sharding

MAP_FILE, PLOT_FILE = "layer_map.json", "layer_map.png"
_BATCH_KEYS = (batch_keys.INPUTS, batch_keys.MASK, batch_keys.SEGMENT_IDS, batch_keys.POSITIONS)


@dataclasses.dataclass(frozen=True)
class LayerSimilarity:
  """Linear CKA between every student and teacher layer, and the chosen monotone map.

  Attributes:
    student_layers / teacher_layers: the candidate layers' feature names (or module paths), in order.
    cka: ``(M, T)`` float64, ``cka[i, j]`` between student layer i and teacher layer j.
    targets: the teacher layer (index into ``teacher_layers``) of each student layer.
    layer_map: those pairs as ``method.layer_map`` entries.
    rows: how many rows (real positions or examples) the CKA saw.
  """

  student_layers: tuple[str, ...]
  teacher_layers: tuple[str, ...]
  cka: np.ndarray
  targets: tuple[int, ...]
  layer_map: tuple[str, ...]
  rows: int

  @property
  def pairs(self) -> tuple[tuple[str, str], ...]:
    """``(student layer, teacher layer)`` names of the map."""
    return tuple((self.student_layers[i], self.teacher_layers[t]) for i, t in enumerate(self.targets))

  def to_json(self) -> dict[str, Any]:
    return {
      "layer_map": list(self.layer_map),
      "pairs": [list(p) for p in self.pairs],
      "student_layers": list(self.student_layers),
      "teacher_layers": list(self.teacher_layers),
      "cka": [[round(float(v), 6) for v in row] for row in self.cka],
      "summed_cka": float(sum(self.cka[i, t] for i, t in enumerate(self.targets))),
      "rows": self.rows,
    }

  def write(self, directory: str | Path) -> tuple[Path, Path]:
    """``layer_map.json`` (:meth:`to_json`) and ``layer_map.png`` (the heat map, the pairs framed) in ``directory``."""
    from kdjax.report.heatmap import plot_heatmap

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MAP_FILE).write_text(json.dumps(self.to_json(), indent=1))
    marks = list(enumerate(self.targets))
    title = f"linear CKA on {self.rows} rows; map {', '.join(self.layer_map)}"
    png = plot_heatmap(
      self.cka, self.student_layers, self.teacher_layers, directory / PLOT_FILE, marks=marks, title=title
    )
    return directory / MAP_FILE, png


def _split(model: Any, x: jax.ShapeDtypeStruct, template: str | None, who: str):
  """``(static half, params, rest, candidate layers, by_index)`` of one model, its templated layers tapped."""
  if not isinstance(model, nnx.Module):
    raise ConfigError(f"layer_map=auto compares the layers of NNX models; the {who} is a {type(model).__name__}")
  paths = template_paths(model, [template]) if template else []
  d, p, r = describe(model, x, tuple((q, q) for q in paths))
  names, by_index = layer_match.candidates(d.info.feature_shapes, template, who)
  return d, p, r, names, by_index


_CACHE: dict = {}
_CKA = jax.jit(layer_match.cka_matrix)


def _rows_fn(sd: ModelDef, td: ModelDef, s_names: tuple[str, ...], t_names: tuple[str, ...]):
  """The jitted forward of both models on a batch → each candidate layer's CKA rows and their weights (one
  per pair of model graphs and layers)."""
  key = (sd.graphdef, sd.taps, td.graphdef, td.taps, s_names, t_names)
  if key not in _CACHE:
    _CACHE.clear()  # the last pair only: a program per graph would otherwise stay alive
    _CACHE[key] = _make_rows_fn(sd, td, s_names, t_names)
  return _CACHE[key]


def _make_rows_fn(sd: ModelDef, td: ModelDef, s_names, t_names):

  def rows(sp, sr, tp, tr, batch):
    x, extra, mask = batch[batch_keys.INPUTS], batch_keys.model_kwargs(batch), batch.get(batch_keys.MASK)
    so, _ = apply_model(sd.graphdef, sp, sr, x, train=False, taps=sd.taps, rngs=sd.rngs, extra=extra)
    to, _ = apply_model(td.graphdef, tp, tr, x, train=False, taps=td.taps, rngs=td.rngs, extra=extra)
    s = [layer_match.layer_rows(so.features[n], mask) for n in s_names]
    t = [layer_match.layer_rows(to.features[n], mask) for n in t_names]
    return [r for r, _ in s], [r for r, _ in t], s[0][1]

  return jax.jit(rows)


def _gather(fn, placed, batches: Sequence[Mapping[str, Any]], mesh) -> tuple[list, list, jax.Array]:
  """Every batch's rows, concatenated per layer (on the mesh)."""
  s_all, t_all, w_all = [], [], []
  for b in batches:
    host = {k: np.asarray(b[k]) for k in _BATCH_KEYS if k in b}
    s, t, w = fn(*placed, sharding.shard_batch(host, mesh))
    s_all.append(s)
    t_all.append(t)
    w_all.append(w)
  cat = lambda parts: [jnp.concatenate(layer, 0) for layer in zip(*parts)]  # noqa: E731
  return cat(s_all), cat(t_all), jnp.concatenate(w_all, 0)


def layer_similarity(
  student: Any,
  teacher: Any = None,
  batches: Iterable[Mapping[str, Any]] = (),
  *,
  student_layers: str | None = "block{i}",
  teacher_layers: str | None = "block{i}",
  mesh: jax.sharding.Mesh | None = None,
  strict: bool = False,
  same_positions: bool = False,
) -> LayerSimilarity:
  """Linear CKA between every student and teacher layer on ``batches``, and the monotone map of the largest
  summed CKA (:func:`kdjax.methods.layer_match.monotone_alignment`).

  Args:
    student / teacher: NNX models (the teacher in eval mode, as distillation runs it); or a
      :class:`kdjax.Distiller` as ``student`` (its first student and first teacher model, its mesh).
    batches: a few batches (:mod:`kdjax.batch`: ``inputs``, optional ``mask``); both models read ``inputs``.
    student_layers / teacher_layers: each model's layers, a feature name or module path with ``{i}``
      (``"block{i}"``, ``"blocks.{i}"``); a model without them compares its ``stageK`` features.
    mesh: where the models run (default: every device on ``data``); the batch is split over ``data``.
    strict: each teacher layer serves at most one student layer.
    same_positions: pair only layers whose outputs differ in their width at most (``(B, L, D)`` sequences
      of one length; feature maps of one ``H × W``), as the hidden-state terms need.
  """
  if teacher is None and hasattr(student, "source"):
    models = student.source.models
    if not models:
      raise ConfigError("layer_similarity: the distiller has no teacher model to compare its student with")
    student, teacher, mesh = student.students[0], models[0], mesh or student.mesh
  batches = list(batches)
  if not batches:
    raise ConfigError("layer_similarity needs calibration batches (a few batches of the training data)")
  x = batch_keys.inputs(batches[0])
  x = jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  sd, sp, sr, s_names, by_index_s = _split(student, x, student_layers, "student")
  td, tp, tr, t_names, by_index_t = _split(teacher, x, teacher_layers, "teacher")
  mesh = mesh or sharding.make_mesh()
  placed = jax.device_put((sp, sr, tp, tr), sharding.replicated(mesh))
  s_rows, t_rows, w = _gather(_rows_fn(sd, td, s_names, t_names), placed, batches, mesh)
  n = int(jnp.sum(w))
  if n < layer_match.MIN_ROWS:
    raise ConfigError(
      f"layer_map=auto: {n} real calibration rows are too few for CKA (at least {layer_match.MIN_ROWS}); "
      "give more or longer batches (method.calibration_batches)"
    )
  cka = np.asarray(_CKA(s_rows, t_rows, w), np.float64)
  allowed = None
  if same_positions:
    shape = lambda info, n: tuple(info.feature_shapes[n][:-1])  # noqa: E731
    allowed = [[shape(sd.info, a) == shape(td.info, b) for b in t_names] for a in s_names]
  targets = layer_match.monotone_alignment(cka, strict=strict, allowed=allowed)
  entries = layer_match.map_entries(s_names, t_names, targets, by_index_s and by_index_t)
  return LayerSimilarity(s_names, t_names, cka, targets, entries, n)


def auto_layer_map(
  student: Any,
  teacher: Any,
  batches: Iterable[Mapping[str, Any]],
  method: MethodConfig,
  *,
  mesh: jax.sharding.Mesh | None = None,
  strict: bool = False,
) -> tuple[MethodConfig, LayerSimilarity]:
  """``method`` with ``layer_map`` set to the CKA-chosen map between ``student`` and ``teacher``
  (:func:`layer_similarity` over ``method.student_layers`` / ``teacher_layers``, on the first
  ``method.calibration_batches`` of ``batches``; only layers of the same positions are paired), and the
  similarity behind it."""
  chosen = [b for _, b in zip(range(method.calibration_batches), batches)]
  sim = layer_similarity(
    student,
    teacher,
    chosen,
    student_layers=method.student_layers,
    teacher_layers=method.teacher_layers,
    mesh=mesh,
    strict=strict,
    same_positions=True,
  )
  return dataclasses.replace(method, layer_map=sim.layer_map), sim


def is_auto(method: Any) -> bool:
  """Whether ``method`` is a :class:`MethodConfig` whose layer map is chosen on data."""
  return isinstance(method, MethodConfig) and method.layer_map == layer_match.AUTO


def for_distiller(distiller, batch: Mapping[str, Any]) -> tuple[MethodConfig, LayerSimilarity]:
  """:func:`auto_layer_map` of a Distiller's first student and first teacher model on its ``calibration``
  batches (default: ``batch``), on its mesh."""
  if not distiller.source.models:
    raise ConfigError(
      f"method.layer_map=auto pairs the student's layers with a teacher model's; this run has none "
      f"(mode={distiller.mode!r})"
    )
  batches = distiller.calibration if distiller.calibration is not None else [batch]
  return auto_layer_map(
    distiller.students[0], distiller.source.models[0], batches, distiller.method_arg, mesh=distiller.mesh
  )
