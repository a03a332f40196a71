"""Experiment configuration: frozen dataclass trees, validated once.

An experiment is ``Experiment(data=…, teacher=…, student=…, method=…,
optim=…, run=…)``. Experiment files in ``experiments/`` build one with
``get_config()`` (or several named ones in ``CONFIGS``); the ``kdjax`` CLI
(tyro) turns every field into a flag, e.g. ``--optim.lr 0.1``.
Validation lives in ``__post_init__`` and names the offending field.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
import json
from typing import Any, Literal

from kdjax.errors import ConfigError
from kdjax.parallel.placement import Placement
from kdjax.responses import ResponseConfig
from kdjax.methods.config import MethodConfig

_DTYPES = ("float32", "bfloat16", "float16")
_REMATS = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")


def _check(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which dataset, how it is batched and augmented.

  Attributes:
    name: TFDS name (``mnist1d``, ``digits``, ``mnist``, ``cifar100``,
      ``imagenet2012`` …).
    data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    train_split / eval_split: TFDS split names.
    transfer_split: an unlabelled split mixed into the *distillation* training
      set (Hinton et al.'s transfer set), e.g. ``"transfer"`` for mnist1d.
      Supervised terms skip its examples (label −1). Teachers never use it.
    batch_size: *global* batch size over all devices and processes.
    eval_batch_size: global eval batch size.
    view: augmentation (``none``, ``cifar``, ``imagenet``, ``flip``,
      ``jitter``).
    view_mode: ``consistent`` (teacher sees the student's view — function
      matching) or ``independent``.
    mixup_alpha / cutmix_alpha: Beta(α, α) mixing; 0 disables.
    download: let TFDS download and prepare a dataset missing from
      ``data_dir`` (needs the network); off, a missing dataset is one error line.
    teacher_cache: directory of a teacher-output cache (``kdjax cache``):
      the step reads the cached teacher logits of one of its K views per
      example and epoch instead of running the teacher (logit-based methods,
      ``mode="offline"``); ``None`` runs the teacher online.
    image_size: side of the square ``imagenet`` view (default 224).
    workers: Grain worker processes making training batches ahead; −1
      sizes it for the machine (none for a dataset held in memory, up to 8
      for one read from disk). Batches do not depend on it.
  """

  name: str = "mnist1d"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "test"
  transfer_split: str | None = None
  batch_size: int = 100
  eval_batch_size: int = 1000
  view: str = "none"
  view_mode: Literal["consistent", "independent"] = "consistent"
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  download: bool = False
  teacher_cache: str | None = None
  workers: int = -1
  image_size: int | None = None

  def __post_init__(self):
    _check(self.batch_size > 0, "data.batch_size", f"must be positive, got {self.batch_size}")
    _check(self.eval_batch_size > 0, "data.eval_batch_size", f"must be positive, got {self.eval_batch_size}")
    _check(self.mixup_alpha >= 0, "data.mixup_alpha", f"must be ≥ 0, got {self.mixup_alpha}")
    _check(self.cutmix_alpha >= 0, "data.cutmix_alpha", f"must be ≥ 0, got {self.cutmix_alpha}")
    _check(
      self.view_mode in ("consistent", "independent"),
      "data.view_mode",
      f"must be 'consistent' or 'independent', got {self.view_mode!r}",
    )
    _check(
      self.image_size is None or self.image_size > 0, "data.image_size", f"must be positive, got {self.image_size}"
    )
    _check(self.workers >= -1, "data.workers", f"must be ≥ 0 (or −1: sized for the machine), got {self.workers}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A model from ``kdjax.models`` by name.

  Attributes:
    name: registry name (``kdjax.models.available()``), or ``hf`` for a
      model read from a Hugging Face checkpoint directory (``checkpoint``:
      config.json + safetensors; Llama, Mistral, Qwen 2/3, Gemma 2/3, GPT-2).
    dtype: computation dtype; a student's params stay float32 (master
      weights; the losses compute in float32), a frozen teacher's are held in
      ``dtype`` (cast once when placed, ``placement.teacher_dtype``).
    remat: rematerialisation policy of a language model's blocks
      (``transformer_lm``, ``hf``; :mod:`kdjax.models.remat`): ``none``,
      ``dots_saveable``, ``dots_with_no_batch_dims_saveable`` or
      ``nothing_saveable`` (the whole block recomputed in the backward pass).
    checkpoint: a finished run's workdir, its ``export/`` directory or its
      ``model.msgpack`` (or, with ``name="hf"``, a Hugging Face checkpoint
      directory). A teacher is loaded from it; a student starts from it
      (fine-tuning, or distilling into a pretrained student) instead of its
      random initialisation. An ``hf`` student without one is cut from the
      ``hf`` teacher's checkpoint.
    layers / layer_stride: an ``hf`` student keeps only these layers of its
      checkpoint (e.g. ``0 2``), or every k-th (``0, k, 2k, …``):
      DistilBERT's initialisation of a student from its teacher's layers.
    mlp_size / heads / kv_heads: width pruning of an ``hf`` student (0: keep):
      the most important MLP neurons, query heads and key/value groups by
      their activations on ``prune_examples`` training rows (Minitron;
      :mod:`kdjax.models.prune`).
  """

  name: str = "mlp"
  dtype: str = "float32"
  remat: Literal["none", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable"] = "none"
  checkpoint: str | None = None
  layers: tuple[int, ...] = ()
  layer_stride: int = 0
  mlp_size: int = 0
  heads: int = 0
  kv_heads: int = 0
  prune_examples: int = 256

  def __post_init__(self):
    _check(self.dtype in _DTYPES, "model.dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
    _check(self.remat in _REMATS, "model.remat", f"must be one of {_REMATS}, got {self.remat!r}")

  @property
  def cut(self) -> bool:
    """Whether the model is cut from its checkpoint (fewer layers, narrower)."""
    return bool(self.layers or self.layer_stride or self.mlp_size or self.heads or self.kv_heads)

  @property
  def pruned(self) -> bool:
    return bool(self.mlp_size or self.heads or self.kv_heads)

  def check(self, role: str) -> None:
    """The cut fields' values, checked with the flag names of ``role`` (``student``, ``teacher`` …); that only
    an hf student is cut is checked when the models are built."""
    _check(all(i >= 0 for i in self.layers), f"{role}.layers", f"must be ≥ 0, got {list(self.layers)}")
    _check(
      list(self.layers) == sorted(set(self.layers)),
      f"{role}.layers",
      f"must be distinct and increasing, got {list(self.layers)}",
    )
    _check(not (self.layers and self.layer_stride), f"{role}.layers", "give layers or layer_stride, not both")
    for f in ("layer_stride", "mlp_size", "heads", "kv_heads"):
      _check(getattr(self, f) >= 0, f"{role}.{f}", f"must be ≥ 0 (0: off), got {getattr(self, f)}")
    _check(self.prune_examples >= 1, f"{role}.prune_examples", f"must be ≥ 1, got {self.prune_examples}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer and learning-rate schedule (optax).

  Attributes:
    name: ``sgd`` (momentum, Nesterov off), ``adam`` or ``adamw``.
    lr: peak learning rate.
    momentum: SGD momentum.
    weight_decay: L2 decay added to the gradient for SGD (PyTorch semantics),
      decoupled for AdamW.
    schedule: ``constant``, ``step`` (×``decay_factor`` at ``decay_epochs``)
      or ``cosine``.
    decay_epochs / decay_factor: step schedule.
    warmup_epochs: linear warm-up from 0.
    epochs: training length in epochs (ignored when ``steps`` > 0).
    steps: training length in optimizer steps (overrides ``epochs``).
    grad_accum: micro-batches accumulated per optimizer step.
    clip_norm: global-norm gradient clipping (0 disables).
  """

  name: Literal["sgd", "adam", "adamw"] = "adam"
  lr: float = 1e-2
  momentum: float = 0.9
  weight_decay: float = 0.0
  schedule: Literal["constant", "step", "cosine"] = "constant"
  decay_epochs: tuple[float, ...] = ()
  decay_factor: float = 0.1
  warmup_epochs: float = 0.0
  epochs: float = 0.0
  steps: int = 0
  grad_accum: int = 1
  clip_norm: float = 0.0

  def __post_init__(self):
    _check(0 < self.lr < math.inf, "optim.lr", f"must be > 0 and finite, got {self.lr}")
    _check(self.weight_decay >= 0, "optim.weight_decay", f"must be ≥ 0, got {self.weight_decay}")
    _check(self.epochs > 0 or self.steps > 0, "optim.epochs/optim.steps", "one of them must be positive")
    _check(self.epochs >= 0 and self.steps >= 0, "optim.epochs/optim.steps", "must be ≥ 0")
    _check(self.grad_accum >= 1, "optim.grad_accum", f"must be ≥ 1, got {self.grad_accum}")
    _check(0 < self.decay_factor <= 1, "optim.decay_factor", f"must be in (0, 1], got {self.decay_factor}")
    _check(self.clip_norm >= 0, "optim.clip_norm", f"must be ≥ 0, got {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How a run executes and what it writes.

  Attributes:
    seed: the one root seed (params, data order, views, dropout).
    workdir: output directory (config.json, metrics.jsonl, tb/, checkpoints/,
      results.json); re-running with the same workdir resumes.
    eval_every: evaluate every N steps (0: once per epoch).
    log_every: log train metrics every N steps.
    checkpoint_every: save every N steps (0: only at the end).
    max_to_keep: checkpoints kept.
    mesh_data / mesh_fsdp: mesh shape; ``mesh_data=0`` uses every device not
      used by fsdp.
    quiet: no progress bars.
    stop_on_nan: stop (keeping the last good checkpoint) on a NaN/Inf loss.
    restart: train from step 0 although this workdir had checkpoints, all
      of which failed verification (they stay in ``checkpoints_corrupt/``).
      Without it such a workdir is refused: a run never silently starts over.
    allow_unverified: resume from a checkpoint saved without the digest of
      its arrays (checked only for non-finite values). Without it such a
      checkpoint is refused: one that cannot be verified is not trusted.
    xla_cpu_conv: convolution kernels on the CPU backend: ``"eigen"`` (XLA's
      own; faster on the CPUs measured, see ``kdjax.parallel.xla_cpu``) or
      ``"ynn"`` (jaxlib's YNNPACK default). Ignored on GPU/TPU; excluded from
      the config hash (it changes speed, results only to float32 rounding).
  """

  seed: int = 0
  workdir: str = "workdirs/run"
  eval_every: int = 0
  log_every: int = 50
  checkpoint_every: int = 0
  max_to_keep: int = 2
  mesh_data: int = 0
  mesh_fsdp: int = 1
  quiet: bool = False
  stop_on_nan: bool = True
  restart: bool = False
  allow_unverified: bool = False
  xla_cpu_conv: Literal["eigen", "ynn"] = "eigen"

  def __post_init__(self):
    _check(bool(self.workdir.strip()), "run.workdir", "must name a directory, got an empty string")
    _check(
      self.xla_cpu_conv in ("eigen", "ynn"), "run.xla_cpu_conv", f"must be 'eigen' or 'ynn', got {self.xla_cpu_conv!r}"
    )
    _check(self.eval_every >= 0, "run.eval_every", f"must be ≥ 0, got {self.eval_every}")
    _check(self.log_every > 0, "run.log_every", f"must be > 0, got {self.log_every}")
    _check(self.checkpoint_every >= 0, "run.checkpoint_every", f"must be ≥ 0, got {self.checkpoint_every}")
    _check(self.max_to_keep >= 1, "run.max_to_keep", f"must be ≥ 1, got {self.max_to_keep}")
    _check(self.mesh_data >= 0 and self.mesh_fsdp >= 1, "run.mesh_data/run.mesh_fsdp", "must be ≥ 0 / ≥ 1")


Mode = Literal["teacher", "offline", "multi_teacher", "dml", "born_again", "self_ema"]


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A complete, reproducible experiment.

  Attributes:
    name: experiment name (used in reports).
    mode: ``teacher`` (supervised training of ``student``: the model being
      trained is always called the student), ``offline`` (one frozen teacher),
      ``multi_teacher`` (``teacher`` plus ``extra_teachers``), ``dml`` (deep
      mutual learning: ``num_students`` copies of ``student`` trained together),
      ``born_again`` (``generations`` students, each taught by the previous
      one), ``self_ema`` (the teacher is an EMA of the student).
    teacher / extra_teachers / student: models.
    num_students: DML group size (≥ 2).
    generations: born-again generations.
    published: the published accuracy (%) this cell reproduces, if any.
    responses: for language models, which responses the student trains on:
      the data's (default), sampled from the student (on-policy, GKD) and/or
      generated by the teacher (SeqKD).
    placement: where the frozen teacher lives (:class:`kdjax.Placement`):
      with the student (default), tensor-parallel over ``placement.model``
      devices, and/or on ``placement.teacher_devices`` devices of its own,
      one batch ahead of the student.
  """

  name: str = "experiment"
  mode: Mode = "offline"
  data: DataConfig = DataConfig()
  teacher: ModelConfig = ModelConfig(name="cnn1d")
  extra_teachers: tuple[ModelConfig, ...] = ()
  student: ModelConfig = ModelConfig(name="mlp")
  method: MethodConfig = MethodConfig()
  optim: OptimConfig = OptimConfig(steps=1000)
  run: RunConfig = RunConfig()
  num_students: int = 2
  generations: int = 2
  published: float | None = None
  responses: ResponseConfig = ResponseConfig()
  placement: Placement = Placement()

  def __post_init__(self):
    for name, value in _float_fields(self):
      _check(math.isfinite(value), name, f"must be a finite number, got {value}")
    self._check_models()
    _check(
      self.mode in ("teacher", "offline", "multi_teacher", "dml", "born_again", "self_ema"),
      "mode",
      f"unknown mode {self.mode!r}",
    )
    if self.mode == "dml":
      _check(self.num_students >= 2, "num_students", f"DML needs ≥ 2 students, got {self.num_students}")
      _check(
        not self.student.checkpoint,
        "student.checkpoint",
        "mode=dml needs differently initialised students; unset it or use mode=offline",
      )
    if self.mode == "born_again":
      _check(self.generations >= 1, "generations", f"must be ≥ 1, got {self.generations}")
    if self.mode == "multi_teacher":
      _check(len(self.extra_teachers) >= 1, "extra_teachers", "multi_teacher mode needs at least one extra teacher")
      n = 1 + len(self.extra_teachers)
      _check(
        not self.method.teacher_weights or len(self.method.teacher_weights) == n,
        "method.teacher_weights",
        f"needs {n} weights (one per teacher), got {len(self.method.teacher_weights)}",
      )
    if self.responses.active:
      _check(
        self.mode == "offline" or (self.mode == "multi_teacher" and not self.responses.needs_teacher),
        "responses",
        f"generated responses need mode=offline, or multi_teacher without others=teacher, got mode={self.mode!r}",
      )
      _check(
        not self.data.teacher_cache,
        "data.teacher_cache",
        "a cache holds teacher outputs for the data's "
        "responses only; generated responses need the teacher online (unset it)",
      )
    if self.placement != Placement():
      _check(
        self.mode in ("offline", "born_again", "multi_teacher") and not self.data.teacher_cache,
        "placement",
        f"places a teacher model; mode={self.mode!r}"
        + (" with data.teacher_cache" if self.data.teacher_cache else "")
        + " runs none (drop --placement.*)",
      )
    if self.placement.split:
      _check(
        not self.responses.active,
        "placement.teacher_devices",
        "the teacher runs ahead on the data's batches "
        "on its own devices, but generated responses are scored inside the step; use 0 (placement.model may "
        "still shard the teacher)",
      )
    if self.data.transfer_split and self.mode == "teacher":
      raise ConfigError("data.transfer_split: the transfer set is unlabelled; it cannot train a teacher (mode=teacher)")

  def _check_models(self) -> None:
    """The models' cut fields; a Hugging Face student is one model started from one checkpoint."""
    self.student.check("student")
    _check(
      self.student.name != "hf" or self.mode not in ("dml", "born_again"),
      "student.name",
      f"an hf student starts from one checkpoint; mode={self.mode!r} needs zoo students (use mode=offline)",
    )
    self.teacher.check("teacher")
    for i, t in enumerate(self.extra_teachers):
      t.check(f"extra_teachers[{i}]")

  def replace(self, **kw) -> Experiment:
    return dataclasses.replace(self, **kw)


def _float_fields(cfg: Any, prefix: str = "") -> list[tuple[str, float]]:
  """``(dotted name, value)`` of every float (and tuple-of-float entry) in a config tree."""
  out = []
  for f in dataclasses.fields(cfg):
    v, name = getattr(cfg, f.name), prefix + f.name
    if dataclasses.is_dataclass(v):
      out += _float_fields(v, name + ".")
    elif isinstance(v, float):
      out.append((name, v))
    elif isinstance(v, tuple):
      out += [(f"{name}[{i}]", x) for i, x in enumerate(v) if isinstance(x, float)]
  return out


def to_dict(cfg: Any) -> dict:
  """The config as plain JSON-able data."""
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# Fields that do not change what a run computes: paths, verbosity, checkpoint
# cadence, CPU kernel choice, input workers, where the teacher runs (speed and memory; results
# only to float32 rounding). A teacher's path is excluded because the content
# hash of its file (checked on resume) is what matters.
HASH_EXCLUDE = (
  "run.workdir",
  "run.quiet",
  "run.log_every",
  "run.xla_cpu_conv",
  "run.checkpoint_every",
  "run.max_to_keep",
  "run.restart",
  "run.allow_unverified",
  "placement.*",
  "teacher.checkpoint",
  "extra_teachers.*.checkpoint",
  "data.workers",
)

# Fields added after experiments had been hashed: they enter the hash only when set, so
# existing workdirs keep their hash (and resume) while a run that sets one gets a new hash.
HASH_WHEN_SET = {
  "data.image_size": None,
  **{
    f"{role}.{k}": v
    for role in ("student", "teacher", "extra_teachers.*")
    for k, v in (
      ("layers", []),
      ("layer_stride", 0),
      ("mlp_size", 0),
      ("heads", 0),
      ("kv_heads", 0),
      ("prune_examples", 256),
    )
  },
  "method.skew_alpha": None,
  **{f"responses.{k}": v for k, v in json.loads(json.dumps(dataclasses.asdict(ResponseConfig()))).items()},
}


def hashed_fields(d: dict) -> dict[str, Any]:
  """A :func:`to_dict` config flattened to ``{"a.b.c": value}``, without :data:`HASH_EXCLUDE`."""
  flat: dict[str, Any] = {}

  def walk(node: Any, prefix: str) -> None:
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{prefix}{k}.")
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
      for i, v in enumerate(node):
        walk(v, f"{prefix}{i}.")
    else:
      flat[prefix[:-1]] = node

  walk(d, "")
  excluded = lambda k: any(fnmatch.fnmatchcase(k, pat) for pat in HASH_EXCLUDE)  # noqa: E731
  at_default = lambda k, v: any(  # noqa: E731
    fnmatch.fnmatchcase(k, pat) and v == default for pat, default in HASH_WHEN_SET.items()
  )
  return {k: v for k, v in flat.items() if not excluded(k) and not at_default(k, v)}


def config_hash(cfg: Any) -> str:
  """Stable short hash of everything that changes results (:func:`hashed_fields`).

  Paths, verbosity and checkpoint cadence are excluded, so the same
  experiment in two workdirs has one hash and a run resumes after its
  teacher file moved or its checkpoint interval changed.
  """
  blob = json.dumps(hashed_fields(to_dict(cfg)), sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def from_dict(d: dict) -> Experiment:
  """Inverse of :func:`to_dict` (for ``config.json`` and teacher workdirs).

  Raises ``ValueError`` naming any key that is not a field: a typo in an old
  ``config.json`` must not silently change a resumed run.
  """

  def build(cls, data, where=""):
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(hints))
    if unknown:
      raise ConfigError(
        f"config has unknown field(s) {', '.join(where + k for k in unknown)}: written by another "
        f"kdjax version or edited by hand; fix or remove them (known: {', '.join(sorted(hints))})"
      )
    for k, v in data.items():
      f = hints[k]
      default = f.default if f.default is not dataclasses.MISSING else None
      if dataclasses.is_dataclass(default):
        kwargs[k] = build(type(default), v, f"{where}{k}.")
      elif k == "extra_teachers":
        kwargs[k] = tuple(build(ModelConfig, x, f"{where}{k}[{i}].") for i, x in enumerate(v))
      elif isinstance(v, list):
        kwargs[k] = tuple(v)
      else:
        kwargs[k] = v
    return cls(**kwargs)

  return build(Experiment, d)
