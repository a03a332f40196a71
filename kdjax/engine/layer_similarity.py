"""Which student layer should learn from which teacher layer: linear CKA on data, and ``layer_map="auto"``.

    sim = kdjax.layer_similarity(student, teacher, batches)         # CKA of every student × teacher layer
    sim.cka, sim.layer_map, sim.pairs                               # (M, T) matrix; ("0=1", "1=3"); names
    cfg, sim = kdjax.auto_layer_map(student, teacher, batches, MethodConfig("hidden_mse", layer_map=("auto",)))
    cfg, sim = kdjax.auto_layers(student, teacher, batches, MethodConfig("fitnet", hint_layer="auto"))

The models run as the engine runs them (:func:`kdjax.engine.state.apply_model`, layers tapped by path,
eval mode) under ``jit`` on the mesh, one program per batch shape; the CKA matrix is one more program over
the gathered rows (:mod:`kdjax.methods.layer_match` states the formula, the rows and the alignment).
``Distiller.init`` resolves ``layer_map=("auto",)`` and FitNet's ``hint_layer="auto"`` this way before the
method is built (:func:`auto_layers`; one CKA measurement serves both), so the step sees an explicit map and
an explicit ``"s=t"`` hint pair; ``kdjax distill`` also writes ``layer_map.json`` and ``layer_map.png`` to the
run's workdir and the choice and matrix to ``results.json``.
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
    targets: the teacher layer (index into ``teacher_layers``) of each student layer (empty when only the
      hint pair was chosen).
    layer_map: those pairs as ``method.layer_map`` entries.
    rows: how many rows (real positions or examples) the CKA saw.
    hint: FitNet's ``(guided student layer, hint teacher layer)`` indices chosen for ``hint_layer="auto"``
      (:func:`kdjax.methods.layer_match.hint_choice`), or None.
  """

  student_layers: tuple[str, ...]
  teacher_layers: tuple[str, ...]
  cka: np.ndarray
  targets: tuple[int, ...]
  layer_map: tuple[str, ...]
  rows: int
  hint: tuple[int, int] | None = None

  @property
  def pairs(self) -> tuple[tuple[str, str], ...]:
    """``(student layer, teacher layer)`` names of the map."""
    return tuple((self.student_layers[i], self.teacher_layers[t]) for i, t in enumerate(self.targets))

  @property
  def hint_layer(self) -> str | None:
    """The chosen hint pair as ``method.hint_layer`` (``"student feature=teacher feature"``), or None."""
    return None if self.hint is None else f"{self.student_layers[self.hint[0]]}={self.teacher_layers[self.hint[1]]}"

  def to_json(self) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if self.targets:
      out.update(layer_map=list(self.layer_map), pairs=[list(p) for p in self.pairs])
    if self.hint is not None:
      out.update(hint_layer=self.hint_layer, hint_cka=round(float(self.cka[self.hint]), 6))
    out.update(
      student_layers=list(self.student_layers),
      teacher_layers=list(self.teacher_layers),
      cka=[[round(float(v), 6) for v in row] for row in self.cka],
    )
    if self.targets:
      out["summed_cka"] = float(sum(self.cka[i, t] for i, t in enumerate(self.targets)))
    out["rows"] = self.rows
    return out

  def write(self, directory: str | Path) -> tuple[Path, Path]:
    """``layer_map.json`` (:meth:`to_json`) and ``layer_map.png`` (the heat map, the pairs framed) in ``directory``."""
    from kdjax.report.heatmap import plot_heatmap

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MAP_FILE).write_text(json.dumps(self.to_json(), indent=1))
    marks = list(enumerate(self.targets)) + ([self.hint] if self.hint is not None else [])
    chosen = ([f"map {', '.join(self.layer_map)}"] if self.targets else []) + (
      [f"hint {self.hint_layer}"] if self.hint is not None else []
    )
    title = "; ".join([f"linear CKA on {self.rows} rows", *chosen])
    png = plot_heatmap(
      self.cka, self.student_layers, self.teacher_layers, directory / PLOT_FILE, marks=marks, title=title
    )
    return directory / MAP_FILE, png


def _split(model: Any, x: jax.ShapeDtypeStruct, template: str | None, who: str):
  """``(static half, params, rest, candidate layers, by_index)`` of one model, its templated layers tapped."""
  if not isinstance(model, nnx.Module):
    raise ConfigError(f"layer pairing by CKA compares the layers of NNX models; the {who} is a {type(model).__name__}")
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


def _models(student: Any, teacher: Any, mesh):
  """``(student, teacher, mesh)``; a :class:`kdjax.Distiller` as ``student`` gives its first student, its
  first teacher model and its mesh."""
  if teacher is None and hasattr(student, "source"):
    models = student.source.models
    if not models:
      raise ConfigError("layer_similarity: the distiller has no teacher model to compare its student with")
    return student.students[0], models[0], mesh or student.mesh
  return student, teacher, mesh


def _measure(student, teacher, batches, student_layers, teacher_layers, mesh):
  """Linear CKA between both models' candidate layers on ``batches``: a :class:`LayerSimilarity` with nothing
  chosen yet, each candidate's feature shape (no batch axis) per model, and whether both models' candidates
  are numbered layers (``by_index``)."""
  batches = list(batches)
  if not batches:
    raise ConfigError("layer pairing by CKA needs calibration batches (a few batches of the training data)")
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
      f"layer pairing by CKA: {n} real calibration rows are too few for CKA (at least {layer_match.MIN_ROWS}); "
      "give more or longer batches (method.calibration_batches)"
    )
  cka = np.asarray(_CKA(s_rows, t_rows, w), np.float64)
  shapes = ([sd.info.feature_shapes[a] for a in s_names], [td.info.feature_shapes[b] for b in t_names])
  return LayerSimilarity(s_names, t_names, cka, (), (), n), shapes, by_index_s and by_index_t


def _with_map(sim: LayerSimilarity, shapes, by_index: bool, strict: bool, same_positions: bool) -> LayerSimilarity:
  """``sim`` with the monotone map of the largest summed CKA (only layers of the same positions with
  ``same_positions``: outputs differing in their width at most)."""
  allowed = None
  if same_positions:
    allowed = [[tuple(a[:-1]) == tuple(b[:-1]) for b in shapes[1]] for a in shapes[0]]
  targets = layer_match.monotone_alignment(sim.cka, strict=strict, allowed=allowed)
  entries = layer_match.map_entries(sim.student_layers, sim.teacher_layers, targets, by_index)
  return dataclasses.replace(sim, targets=targets, layer_map=entries)


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
  student, teacher, mesh = _models(student, teacher, mesh)
  sim, shapes, by_index = _measure(student, teacher, batches, student_layers, teacher_layers, mesh)
  return _with_map(sim, shapes, by_index, strict, same_positions)


def _calibration(batches: Iterable[Mapping[str, Any]], method: MethodConfig) -> list:
  return [b for _, b in zip(range(method.calibration_batches), batches)]


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
  similarity behind it (:func:`auto_layers` with ``layer_map=("auto",)``)."""
  method = dataclasses.replace(method, layer_map=layer_match.AUTO)
  return auto_layers(student, teacher, batches, method, mesh=mesh, strict=strict)


def auto_layers(
  student: Any,
  teacher: Any,
  batches: Iterable[Mapping[str, Any]],
  method: MethodConfig,
  *,
  mesh: jax.sharding.Mesh | None = None,
  strict: bool = False,
) -> tuple[MethodConfig, LayerSimilarity]:
  """``method`` with each of its layer choices that is ``"auto"`` made on data, and the similarity behind them.

  One CKA measurement over ``method.student_layers`` / ``teacher_layers`` on the first
  ``method.calibration_batches`` of ``batches`` serves both: ``layer_map=("auto",)`` becomes the monotone
  map of :func:`auto_layer_map`; ``hint_layer="auto"`` becomes FitNet's ``"s=t"`` pair, the student's middle
  layer (its guided layer) with the teacher layer of the largest CKA among those the hint regressor can map
  it onto (:func:`kdjax.methods.layer_match.hint_choice`). FitNet's two stages (``hint_init``, ``hint``) then
  read that pair.
  """
  chosen = _calibration(batches, method)
  sim, shapes, by_index = _measure(student, teacher, chosen, method.student_layers, method.teacher_layers, mesh)
  changes: dict[str, Any] = {}
  if method.layer_map == layer_match.AUTO:
    sim = _with_map(sim, shapes, by_index, strict, True)
    changes["layer_map"] = sim.layer_map
  if method.hint_layer == layer_match.HINT_AUTO:
    sim = dataclasses.replace(sim, hint=layer_match.hint_choice(sim.cka, *shapes))
    changes["hint_layer"] = sim.hint_layer
  return dataclasses.replace(method, **changes), sim


def auto_fields(method: Any) -> tuple[str, ...]:
  """The fields of a :class:`MethodConfig` ``method`` chosen on data (``layer_map``, ``hint_layer``)."""
  if not isinstance(method, MethodConfig):
    return ()
  fields = (
    ("layer_map", method.layer_map == layer_match.AUTO),
    ("hint_layer", method.hint_layer == layer_match.HINT_AUTO),
  )
  return tuple(name for name, auto in fields if auto)


def is_auto(method: Any) -> bool:
  """Whether ``method`` is a :class:`MethodConfig` whose layer map or hint pair is chosen on data."""
  return bool(auto_fields(method))


def for_distiller(distiller, batch: Mapping[str, Any]) -> tuple[MethodConfig, LayerSimilarity]:
  """:func:`auto_layers` of a Distiller's first student and first teacher model on its ``calibration``
  batches (default: ``batch``), on its mesh."""
  if not distiller.source.models:
    field = auto_fields(distiller.method_arg)[0]
    raise ConfigError(
      f"method.{field}=auto pairs the student's layers with a teacher model's; this run has none "
      f"(mode={distiller.mode!r}): give the {'map' if field == 'layer_map' else 'pair'} explicitly"
    )
  batches = distiller.calibration if distiller.calibration is not None else [batch]
  return auto_layers(
    distiller.students[0], distiller.source.models[0], batches, distiller.method_arg, mesh=distiller.mesh
  )
