"""CIFAR-100: the CRD paper's table (Tian et al. 2020, Table 1/2) plus DKD and DIST.

Sixteen methods — KD, FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST,
CRD, CRD+KD (the CRD table), DKD (Zhao et al. 2022) and DIST (Huang et al.
2022) — on the seven same-architecture-family teacher → student pairs of the
table, with the reference recipe of RepDistiller's ``train_student.py``:
SGD momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr 0.05 (0.01 for
MobileNetV2/ShuffleNet students), ×0.1 at epochs 150/180/210, the CIFAR view
(pad 4 + random 32×32 crop + flip), T = 4, and each method's reference
weights (the presets in ``kdjax.methods.registry``: r·CE + a·KD + b·other).
AB, FT and FSP run RepDistiller's 30-epoch initialisation stage first; DKD
uses mdistiller's β per pair (2 for resnet56→20 and resnet110→32, 6 for the
WRN and VGG pairs, 8 otherwise) and its 20-epoch warm-up. The reported
number is the *last-epoch* accuracy, as in the papers; ``Experiment.published``
holds the paper's number for each cell (``None`` where the paper has none).

Named configs (``kdjax distill cifar100_crd_table NAME``):

* ``<teacher>-<student>/<method>``, e.g. ``wrn_40_2-wrn_16_2/crd`` — one cell;
  its teacher is read from ``workdirs/cifar100/teachers/<teacher>`` (override
  with ``--teacher.checkpoint DIR``);
* ``teachers/<name>`` — a teacher (CE, same recipe), e.g.
  ``kdjax train-teacher cifar100_crd_table teachers/resnet56``;
* ``students/<name>`` — the student trained alone (the table's "student" row).

``scripts/reproduce_cifar100.sh`` runs the teachers, then every cell with 5
seeds (``kdjax sweep … --grid 'config=<pair>/*'``), then ``kdjax report``.
CIFAR-100 must be prepared in the TFDS data dir (``tfds build cifar100``);
``--data.download`` lets TFDS fetch it where the machine has network (off by
default: offline, a missing dataset is one error line, not minutes of retries).
``check_config`` validates a cell (models, feature names and shapes,
adapters, the loss) abstractly, without data and without compiling.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, OptimConfig, RunConfig

PAIRS: tuple[tuple[str, str], ...] = (
  ("wrn_40_2", "wrn_16_2"),
  ("wrn_40_2", "wrn_40_1"),
  ("resnet56", "resnet20"),
  ("resnet110", "resnet20"),
  ("resnet110", "resnet32"),
  ("resnet32x4", "resnet8x4"),
  ("vgg13", "vgg8"),
)
METHODS: tuple[str, ...] = (
  "kd",
  "fitnet",
  "at",
  "sp",
  "cc",
  "vid",
  "rkd",
  "pkt",
  "ab",
  "ft",
  "fsp",
  "nst",
  "crd",
  "crd+kd",
  "dkd",
  "dist",
)
TWO_STAGE = ("ab", "ft", "fsp")  # RepDistiller's init stage (helper/pretrain.py)
INIT_EPOCHS = 30.0
LIGHT_STUDENTS = ("mobilenetv2", "shufflenetv1", "shufflenetv2")  # lr 0.01 in RepDistiller
DKD_BETA = {
  ("resnet56", "resnet20"): 2.0,
  ("resnet110", "resnet32"): 2.0,
  ("wrn_40_2", "wrn_16_2"): 6.0,
  ("wrn_40_2", "wrn_40_1"): 6.0,
  ("vgg13", "vgg8"): 6.0,
}  # mdistiller configs; 8 otherwise
TEACHER_ROOT = "workdirs/cifar100/teachers"
WORK_ROOT = "workdirs/cifar100"

# Published last-epoch top-1 (%), columns in PAIRS order (RepDistiller README / CRD paper; DKD: mdistiller
# README; DIST: the DIST paper, mean of its runs). None: the paper reports no number for that cell.
_COLUMNS = {
  "teacher": (75.61, 75.61, 72.34, 74.31, 74.31, 79.42, 74.64),
  "student": (73.26, 71.98, 69.06, 69.06, 71.14, 72.50, 70.36),
  "kd": (74.92, 73.54, 70.66, 70.67, 73.08, 73.33, 72.98),
  "fitnet": (73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02),
  "at": (74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43),
  "sp": (73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68),
  "cc": (73.56, 72.21, 69.63, 69.48, 71.48, 72.97, 70.71),
  "vid": (74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23),
  "rkd": (73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48),
  "pkt": (74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88),
  "ab": (72.50, 72.38, 69.47, 69.53, 70.98, 73.17, 70.94),
  "ft": (73.25, 71.59, 69.84, 70.22, 72.37, 72.86, 70.58),
  "fsp": (72.91, None, 69.95, 70.11, 71.89, 72.62, 70.23),
  "nst": (73.68, 72.24, 69.60, 69.53, 71.96, 73.30, 71.53),
  "crd": (75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94),
  "crd+kd": (75.64, 74.38, 71.63, 71.56, 73.75, 75.46, 74.29),
  "dkd": (76.24, 74.81, 71.97, None, 74.11, 76.32, 74.68),
  "dist": (None, 74.43, 71.75, None, None, 76.31, None),
}
PUBLISHED: dict[tuple[str, str], dict[str, float | None]] = {
  pair: {row: vals[i] for row, vals in _COLUMNS.items()} for i, pair in enumerate(PAIRS)
}


def pair_name(teacher: str, student: str) -> str:
  return f"{teacher}-{student}"


def _optim(student: str) -> OptimConfig:
  return OptimConfig(
    name="sgd",
    lr=0.01 if student in LIGHT_STUDENTS else 0.05,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="step",
    decay_epochs=(150.0, 180.0, 210.0),
    decay_factor=0.1,
    epochs=240.0,
  )


def _data() -> DataConfig:
  # download=False: offline, a missing CIFAR-100 is one error line (pass --data.download where there is network).
  return DataConfig(name="cifar100", batch_size=64, eval_batch_size=1000, view="cifar")


def make_config(teacher: str, student: str, method: str) -> Experiment:
  """One cell of the table: ``teacher`` → ``student`` with ``method``."""
  pair = (teacher, student)
  beta = DKD_BETA.get(pair, 8.0) if method == "dkd" else None
  mcfg = MethodConfig(name=method, init_epochs=INIT_EPOCHS if method in TWO_STAGE else 0.0, dkd_beta=beta)
  return Experiment(
    name="cifar100_crd_table",
    mode="offline",
    data=_data(),
    teacher=ModelConfig(name=teacher, checkpoint=f"{TEACHER_ROOT}/{teacher}"),
    student=ModelConfig(name=student),
    method=mcfg,
    optim=_optim(student),
    run=RunConfig(workdir=f"{WORK_ROOT}/{pair_name(teacher, student)}/{method}", log_every=100),
    published=PUBLISHED.get(pair, {}).get(method),
  )


def _published_model(name: str, row: str) -> float | None:
  for pair, cols in PUBLISHED.items():
    if pair[0 if row == "teacher" else 1] == name:
      return cols[row]
  return None


def make_teacher(name: str) -> Experiment:
  """A teacher: supervised CE with the same recipe (RepDistiller ``train_teacher.py``)."""
  return Experiment(
    name="cifar100_teacher",
    mode="teacher",
    data=_data(),
    teacher=ModelConfig(name=name),
    student=ModelConfig(name=name),
    method=MethodConfig(name="ce"),
    optim=_optim(name),
    run=RunConfig(workdir=f"{TEACHER_ROOT}/{name}", log_every=100),
    published=_published_model(name, "teacher"),
  )


def make_student(name: str) -> Experiment:
  """The table's "student" row: the student trained alone (CE, no teacher)."""
  return Experiment(
    name="cifar100_student",
    mode="offline",
    data=_data(),
    teacher=ModelConfig(name=name),
    student=ModelConfig(name=name),
    method=MethodConfig(name="ce"),
    optim=_optim(name),
    run=RunConfig(workdir=f"{WORK_ROOT}/students/{name}", log_every=100),
    published=_published_model(name, "student"),
  )


def get_config() -> Experiment:
  return make_config("wrn_40_2", "wrn_16_2", "kd")


def teacher_config(cfg: Experiment) -> Experiment:
  """What ``kdjax train-teacher cifar100_crd_table CELL`` trains: the cell's teacher."""
  return cfg if cfg.mode == "teacher" else make_teacher(cfg.teacher.name)


TEACHERS = tuple(dict.fromkeys(t for t, _ in PAIRS))
STUDENTS = tuple(dict.fromkeys(s for _, s in PAIRS))
CONFIGS: dict[str, Any] = {}
for _t in TEACHERS:
  CONFIGS[f"teachers/{_t}"] = lambda t=_t: make_teacher(t)
for _s in STUDENTS:
  CONFIGS[f"students/{_s}"] = lambda s=_s: make_student(s)
# FSP on wrn_40_2 → wrn_40_1 is "n/a" in the CRD table: no consecutive stage pair has equal channel counts
# in both models (FSP matrices need them), and ``check_config`` rejects it for that reason.
UNSUPPORTED = {(("wrn_40_2", "wrn_40_1"), "fsp")}
for _t, _s in PAIRS:
  for _m in METHODS:
    if ((_t, _s), _m) in UNSUPPORTED:
      continue
    CONFIGS[f"{pair_name(_t, _s)}/{_m}"] = lambda t=_t, s=_s, m=_m: make_config(t, s, m)


@functools.cache
def abstract_model(name: str, num_classes: int = 100):
  """A zoo model whose parameters are shapes only (``nnx.eval_shape``: nothing is allocated)."""
  from flax import nnx

  from kdjax import models

  return nnx.eval_shape(lambda: models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0)))


def check_config(
  cfg: Experiment, num_classes: int = 100, num_examples: int = 50_000, batch_size: int = 2
) -> dict[str, Any]:
  """Validate a cell without data and without compiling anything.

  Hands abstract models to the public core (:meth:`kdjax.Distiller.check`):
  feature names and shapes, hint layers, adapters, method state and each
  stage's step are traced under ``jax.eval_shape``. Raises the method's
  ``ValueError`` on a mismatch.

  Returns:
    ``student`` / ``teacher`` (``ModelInfo``), ``terms`` (name → weight),
    ``adapter_shapes`` (pytree of shapes), ``stages`` (stages with terms),
    ``loss_shape`` per stage (``()``).
  """
  import jax
  import jax.numpy as jnp
  import optax

  import kdjax

  teacher = abstract_model(cfg.teacher.name, num_classes) if cfg.mode != "teacher" else None
  mcfg = cfg.method if cfg.mode != "teacher" else dataclasses.replace(cfg.method, name="ce", terms=())
  d = kdjax.Distiller(
    abstract_model(cfg.student.name, num_classes),
    teacher,
    method=mcfg,
    optimizer=optax.sgd(0.1),
    num_examples=num_examples,
    mode="teacher" if cfg.mode == "teacher" else "offline",
  )
  sds = jax.ShapeDtypeStruct
  batch = {
    "inputs": sds((batch_size, 32, 32, 3), jnp.float32),
    "label": sds((batch_size,), jnp.int32),
    "id": sds((batch_size,), jnp.int32),
  }
  r = d.check(batch, full_step=False)
  spec = d.spec
  return {
    "student": spec.students[0].info,
    "teacher": spec.teachers[0].info if spec.teachers else None,
    "terms": {t.name: t.weight for t in spec.method.terms},
    "adapter_shapes": jax.tree.map(lambda x: tuple(x.shape), r["state"].adapter_params[0]),
    "stages": tuple(r["metrics"]),
    "loss_shape": {st: tuple(m["loss/total"].shape) for st, m in r["metrics"].items()},
  }
