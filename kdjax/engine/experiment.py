"""From an ``Experiment`` config to a :class:`~kdjax.engine.distiller.Distiller` and its data.

``build(cfg)`` creates the models (students from the registry, teachers from
their exported checkpoints), the method and the optimizer, the training and
eval data, and then calls the same public core a user would:
``Distiller(...)`` and ``distiller.init(key, batch)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import batch as batch_keys
from kdjax import checkpoint as ckpt
from kdjax.config import Experiment, ModelConfig
from kdjax.engine import layer_similarity, teachers
from kdjax.engine.distiller import Distiller
from kdjax.engine.optim import make_optimizer
from kdjax.engine.state import TrainState
from kdjax.errors import ConfigError
from kdjax.methods import layer_match
from kdjax.methods.base import Method, ModelInfo
from kdjax.parallel import sharding
from kdjax.parallel.placement import placement_meshes

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


HF = "hf"  # ModelConfig.name of a teacher read from a Hugging Face checkpoint directory


def create_model(mcfg: ModelConfig, num_classes: int, seed: int) -> nnx.Module:
  from kdjax import models

  if mcfg.name == HF:  # the architecture is the checkpoint's (config.json); weights come with load_model
    from kdjax.models import decoder, pretrained

    if not mcfg.checkpoint:
      raise ConfigError(
        "teacher.name=hf reads a Hugging Face checkpoint: pass --teacher.checkpoint <directory "
        "with config.json and safetensors>"
      )
    cfg = pretrained.read_config(mcfg.checkpoint)
    return decoder.Decoder(cfg, dtype=_DTYPES[mcfg.dtype], rngs=nnx.Rngs(seed), remat=mcfg.remat)
  remat = {} if mcfg.remat == "none" else {"remat": mcfg.remat}  # a language model's blocks
  return models.create(mcfg.name, num_classes=num_classes, rngs=nnx.Rngs(seed), dtype=_DTYPES[mcfg.dtype], **remat)


def model_info(model, name: str, num_classes: int) -> ModelInfo:
  """A zoo model's description from its default input shape (no computation)."""
  from kdjax import models

  shapes = models.feature_shapes(model, batch_size=2)
  return ModelInfo(name=name, num_classes=num_classes, feature_shapes={k: tuple(v[1:]) for k, v in shapes.items()})


def load_teacher(
  mcfg: ModelConfig,
  num_classes: int,
  *,
  role: str = "teacher",
  own_vocab: bool = False,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[Any, str]:
  """Create ``mcfg.name`` and fill it from ``mcfg.checkpoint``; check it fits.

  A Hugging Face teacher scores the dataset's ``num_classes`` tokens (its
  padded vocabulary cut), or with ``own_vocab`` its whole vocabulary (a
  teacher of another tokenizer, for cross-tokenizer methods). With ``mesh``
  its parameters are read straight into their shards on that (teacher) mesh.

  Raises ``ValueError`` (before anything is compiled) when the checkpoint's
  architecture or class count differs from the config.
  """
  if not mcfg.checkpoint:
    raise ConfigError(
      f"{role}.checkpoint is not set: the method needs a trained {role}; "
      f"pass --{role}.checkpoint <teacher workdir> (train one with `kdjax train-teacher`)"
    )
  return load_model(mcfg, num_classes, role=role, own_vocab=own_vocab, mesh=mesh)


def load_model(
  mcfg: ModelConfig,
  num_classes: int,
  *,
  role: str,
  seed: int = 0,
  own_vocab: bool = False,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[Any, str]:
  """``mcfg.name`` filled from the export at ``mcfg.checkpoint``, and that export's content hash."""
  if mcfg.name == HF:
    return _load_hf(mcfg, num_classes, role, own_vocab, mesh)
  meta, payload, digest = ckpt.load_export(mcfg.checkpoint, what=f"{role} checkpoint")
  if meta.get("model") and meta["model"] != mcfg.name:
    raise ConfigError(
      f"{role}.checkpoint {mcfg.checkpoint!r} holds a {meta['model']!r} but the config asks for "
      f"{role}.name={mcfg.name!r}"
    )
  if meta.get("num_classes") is not None and int(meta["num_classes"]) != num_classes:
    raise ConfigError(
      f"{role}.checkpoint {mcfg.checkpoint!r} has {meta['num_classes']} classes but the dataset has {num_classes}"
    )
  model = create_model(mcfg, num_classes, seed=seed)
  try:
    ckpt.fill_model(model, payload)
  except ValueError as e:  # no model.json, or one that lies: the shapes decide
    raise ConfigError(
      f"{role}.checkpoint {mcfg.checkpoint!r} does not fit {role}.name={mcfg.name!r} with "
      f"{num_classes} classes ({e}); point --{role}.checkpoint at a matching run"
    ) from None
  return model, digest


def _load_hf(mcfg: ModelConfig, num_classes: int, role: str, own_vocab: bool, mesh, layers=None) -> tuple[Any, str]:
  """A Hugging Face model (a teacher, or a student's start, of its ``layers`` only), and the content hash of
  its config and weights."""
  from pathlib import Path

  from kdjax.models import pretrained

  vocab = pretrained.read_config(mcfg.checkpoint).vocab_size
  if vocab < num_classes and not own_vocab:
    raise ConfigError(
      f"{role}.checkpoint {mcfg.checkpoint!r} has a vocabulary of {vocab} tokens but the dataset has "
      f"{num_classes}; use a teacher with the dataset's tokenizer, or --method.name uld for a teacher "
      f"of another tokenizer"
    )
  # A frozen teacher holds its weights in its compute dtype (a bfloat16 teacher takes half the memory); a
  # student trains float32 master weights.
  model = pretrained.from_pretrained(
    mcfg.checkpoint,
    dtype=_DTYPES[mcfg.dtype],
    param_dtype=jnp.float32 if role == "student" else _DTYPES[mcfg.dtype],
    mesh=mesh,
    vocab_size=None if own_vocab else num_classes,
    layers=layers,
  )
  files = sorted(p for p in Path(mcfg.checkpoint).iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
  return model, hashlib.sha256(" ".join(ckpt.file_hash(p) for p in files).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Run:
  """Everything ``fit`` builds before the first step."""

  cfg: Experiment
  distiller: Distiller
  state: TrainState
  loader: Any
  eval_ds: Any
  view: Any
  teacher_hash: str | None
  total_steps: int
  init_steps: int
  schedule: Any
  num_classes: int
  teacher_eval: dict = dataclasses.field(default_factory=dict)  # the frozen teacher's eval figures, made once
  layer_similarity: Any = None  # method.layer_map=auto: the CKA matrix and the chosen map

  @property
  def mesh(self):
    return self.distiller.mesh


def _hf_student(cfg: Experiment, num_classes: int, train_ds) -> nnx.Module:
  """A student read from a Hugging Face checkpoint (its own, or else the hf teacher's), cut to the configured
  layers and pruned to the configured width by importance on the first training rows; prints what remains."""
  from kdjax.models import decoder, pretrained, prune

  s = cfg.student
  path = s.checkpoint or (cfg.teacher.checkpoint if cfg.teacher.name == HF else None)
  if not path:
    raise ConfigError(
      "student.name=hf: pass --student.checkpoint <Hugging Face checkpoint directory>, or an hf teacher "
      "(--teacher.name hf --teacher.checkpoint DIR) to cut the student from"
    )
  full = pretrained.read_config(path)
  try:
    layers = prune.choose_layers(full.num_layers, s.layers, s.layer_stride)
    layers = None if layers is None else pretrained.check_layers(layers, full.num_layers, f"layers (checkpoint {path})")
  except ConfigError as e:
    raise ConfigError(f"student.{e}") from None
  model, _ = _load_hf(dataclasses.replace(s, checkpoint=path), num_classes, "student", False, None, layers)
  if s.pruned:
    rows, labels, _ = train_ds.take(np.arange(min(s.prune_examples, len(train_ds))))  # the same on every process
    try:
      mask = _text_positions(np.asarray(rows), labels)
      model = prune.prune_width(model, rows, mask, mlp_size=s.mlp_size, heads=s.heads, kv_heads=s.kv_heads)
    except ConfigError as e:
      raise ConfigError(f"student.{e}") from None
  if s.cut and not cfg.run.quiet:
    source = nnx.eval_shape(lambda: decoder.Decoder(full, rngs=nnx.Rngs(0)))
    print(f"student cut from {path} (layers {list(layers or range(full.num_layers))}):")
    print(prune.param_table(model, source))
  model.remat = s.remat  # the blocks' rematerialisation policy (a static attribute)
  return model


def _text_positions(rows: np.ndarray, targets) -> np.ndarray | None:
  """Which positions of token ``rows`` ``(N, L)`` hold text, not padding: those up to each row's last scored
  target (all of a row with none); ``None`` when the rows carry no per-position targets."""
  t = np.asarray(targets) if targets is not None else None
  if t is None or t.shape != rows.shape:
    return None
  scored = t != -1
  last = np.where(scored.any(1), rows.shape[1] - 1 - np.argmax(scored[:, ::-1], 1), rows.shape[1] - 1)
  return np.arange(rows.shape[1])[None, :] <= last[:, None]


def check_cuts(cfg: Experiment) -> None:
  """Only an hf student is cut or pruned (a config may name any model; this is checked before building)."""
  for role, m in (("teacher", cfg.teacher), *((f"extra_teachers[{i}]", t) for i, t in enumerate(cfg.extra_teachers))):
    if m.cut:
      raise ConfigError(f"{role}.layers: cutting and pruning apply to the student only (--student.name hf)")
  if cfg.student.cut and cfg.student.name != HF:
    raise ConfigError(
      f"student.name: layers and width pruning cut a Hugging Face student (--student.name hf), not {cfg.student.name!r}"
    )


def _students(cfg: Experiment, num_classes: int, train_ds=None) -> list[nnx.Module]:
  """Students get distinct seeds (DML needs different initialisations)."""
  if cfg.student.name == HF:
    return [_hf_student(cfg, num_classes, train_ds)]
  if cfg.student.checkpoint:  # start from a trained model (its RNG streams still come from the run's seed)
    return [load_model(cfg.student, num_classes, role="student", seed=cfg.run.seed * 1000)[0]]
  n = cfg.num_students if teachers.plan(cfg.mode).peers else 1
  return [create_model(cfg.student, num_classes, seed=cfg.run.seed * 1000 + i) for i in range(n)]


def _method(cfg: Experiment, s_info: ModelInfo, teacher_cfgs: list[ModelConfig], num_classes: int) -> Method:
  """The method, built and validated against the (abstract) first teacher before any teacher is loaded."""
  from kdjax import methods

  plan = teachers.plan(cfg.mode)
  method_cfg = dataclasses.replace(cfg.method, name="ce", terms=()) if plan.alone else cfg.method
  t_info = None
  if plan.loads_teachers:
    abstract = nnx.eval_shape(lambda: create_model(teacher_cfgs[0], num_classes, seed=0))
    t_info = model_info(abstract, teacher_cfgs[0].name, num_classes)
  elif plan.describes_student:
    t_info = s_info
  if layer_similarity.is_auto(method_cfg) and t_info is not None:  # chosen on data once the teacher is loaded
    method_cfg = layer_match.provisional(method_cfg, s_info.feature_shapes, t_info.feature_shapes)
  method = methods.build(method_cfg, s_info, t_info)
  method.validate(s_info, t_info)
  if cfg.method.init_epochs > 0 and not method.stage_terms("init"):
    raise ConfigError(
      f"method.init_epochs={cfg.method.init_epochs}: method {method.name!r} has no init stage "
      f"(two-stage methods: fitnet, ab, ft, fsp); set --method.init_epochs 0"
    )
  return method


def _auto_layer_map(cfg: Experiment, method: Method, student, models: list, loader, mesh, teacher_cfgs, num_classes):
  """``method.layer_map=auto`` / ``hint_layer=auto``: the method rebuilt with the map of the largest summed
  linear CKA (and FitNet's pair) between the student and the (first) teacher on the first
  ``method.calibration_batches`` training batches, and that
  :class:`~kdjax.engine.layer_similarity.LayerSimilarity`; otherwise ``(method, None)``."""
  if not layer_similarity.is_auto(cfg.method) or teachers.plan(cfg.mode).alone:
    return method, None
  if not models:
    field = layer_similarity.auto_fields(cfg.method)[0]
    raise ConfigError(
      f"method.{field}=auto pairs the student's layers with a teacher model's; mode {cfg.mode!r} loads none "
      f"(a teacher cache holds outputs only): give it, e.g. --method.{field} "
      f"{'uniform' if field == 'layer_map' else 'stage2=stage3'}"
    )
  count = min(cfg.method.calibration_batches, loader.steps_per_epoch)
  batches = (loader.batch(0, i) for i in range(count))
  resolved, similarity = layer_similarity.auto_layers(student, models[0], batches, cfg.method, mesh=mesh)
  s_info = model_info(student, cfg.student.name, num_classes)
  return _method(dataclasses.replace(cfg, method=resolved), s_info, teacher_cfgs, num_classes), similarity


def _teachers(cfg: Experiment, teacher_cfgs: list[ModelConfig], method: Method, num_classes: int, mesh):
  models, hashes = [], []
  needs = method.needs_teacher or teachers.plan(cfg.mode).several
  from kdjax.data.cache.remote import served_teacher_hash

  served = served_teacher_hash(cfg.data.teacher_cache)  # a cache a served teacher filled stands for it
  for i, tcfg in enumerate(teacher_cfgs):
    if not tcfg.checkpoint and (not needs or (i == 0 and served)):
      hashes += [served] if i == 0 and served else []
      continue  # e.g. a `ce` baseline with no teacher: no diagnostics vs a teacher
    m, h = load_teacher(
      tcfg, num_classes, role="teacher" if i == 0 else f"extra_teachers[{i - 1}]", own_vocab=method.any_vocab, mesh=mesh
    )
    models.append(m)
    hashes.append(h)
  return models, ("+".join(hashes) if hashes else None)


def _retokenizer(cfg: Experiment, loader):
  """The data's token rows in a Hugging Face teacher's own tokenizer, for a cross-tokenizer method."""
  from kdjax.data import retokenize, tfds
  from kdjax.models import pretrained

  if cfg.teacher.name != HF or not teachers.plan(cfg.mode).one_teacher:
    raise ConfigError(
      f"method {cfg.method.name!r} distils from a teacher of another tokenizer: use --teacher.name hf "
      f"--teacher.checkpoint <directory with tokenizer.json> (mode offline)"
    )
  if cfg.data.teacher_cache:
    raise ConfigError(
      f"method {cfg.method.name!r} runs the teacher on its own tokens; it cannot read a teacher "
      f"cache (drop --data.teacher_cache)"
    )
  ids = pretrained.special_token_ids(cfg.teacher.checkpoint)
  return retokenize.Retokenizer(
    tfds.tokenizer(cfg.data.name, cfg.data.data_dir),
    pretrained.load_tokenizer(cfg.teacher.checkpoint),
    length=int(loader.batch(0, 0)[batch_keys.INPUTS].shape[1]),
    teacher_bos=ids.get("bos"),
    teacher_eos=ids.get("eos"),
    pad=ids.get("pad") or 0,
  )


def _mesh(cfg: Experiment) -> jax.sharding.Mesh:
  """The run's mesh; its batch sizes are checked here unless a split placement checks them on its sub-meshes."""
  p = cfg.placement
  mesh = sharding.make_mesh(
    0 if p.split else cfg.run.mesh_data, cfg.run.mesh_fsdp, model=p.model if p.kind == "sharded" else 1
  )
  if not p.split:
    sharding.check_batch_size(cfg.data.batch_size, mesh)
    sharding.check_batch_size(cfg.data.eval_batch_size, mesh, "data.eval_batch_size")
  return mesh


def _data(cfg: Experiment):
  """``(training set, evaluation set, view, loader, class count)``."""
  from kdjax import data as kd_data

  num_classes = int(kd_data.get_info(cfg.data.name, data_dir=cfg.data.data_dir).num_classes)
  train_ds = kd_data.cache.training_set(cfg)
  eval_ds = kd_data.open_split(
    cfg.data.name, cfg.data.eval_split, data_dir=cfg.data.data_dir, download=cfg.data.download
  )
  view = kd_data.cache.experiment_view(cfg)
  loader = kd_data.Loader(
    train_ds,
    batch_size=cfg.data.batch_size,
    seed=cfg.run.seed,
    shuffle=True,
    drop_remainder=True,
    view=view,
    view_mode=cfg.data.view_mode,
    worker_count=cfg.data.workers,
  )
  return train_ds, eval_ds, view, loader, num_classes


def _check_packed(cfg: Experiment, cross_tokenizer: bool) -> None:
  """Packed token rows (segment ids in every batch) train teacher-forced on their own tokens only."""
  from kdjax import data as kd_data

  packed = kd_data.get_info(cfg.data.name, data_dir=cfg.data.data_dir).packed_splits
  if not packed:
    return
  why = next(
    (
      text
      for text, refused in (
        ("a packed evaluation split (exact match generates from one prompt per row)", cfg.data.eval_split in packed),
        ("a teacher-output cache", cfg.data.teacher_cache),
        ("generated responses (on-policy, SeqKD)", cfg.responses.active),
        ("a split teacher placement", cfg.placement.split),
        ("a teacher of another tokenizer", cross_tokenizer),
      )
      if refused
    ),
    None,
  )
  if why:
    raise ConfigError(f"dataset {cfg.data.name!r} is packed and cannot be used with {why}: prepare it without --pack")


def _teacher_configs(cfg: Experiment, plan: teachers.Plan, teacher_checkpoint: str | None) -> list[ModelConfig]:
  if not plan.loads_teachers:
    return []
  configs = [cfg.teacher] + (list(cfg.extra_teachers) if plan.several else [])
  if teacher_checkpoint:
    configs[0] = dataclasses.replace(configs[0], checkpoint=teacher_checkpoint)
  return configs


def build(cfg: Experiment, *, teacher_checkpoint: str | None = None) -> Run:
  """Data, models, method, optimizer and the initial (sharded) state, through :class:`Distiller`."""
  from kdjax import data as kd_data

  check_cuts(cfg)
  mesh = _mesh(cfg)
  train_ds, eval_ds, view, loader, num_classes = _data(cfg)
  spe = loader.steps_per_epoch
  init_steps = int(round(cfg.method.init_epochs * spe))
  total_steps = init_steps + (cfg.optim.steps or int(math.ceil(cfg.optim.epochs * spe)))
  plan = teachers.plan(cfg.mode)
  students = _students(cfg, num_classes, train_ds)
  teacher_cfgs = _teacher_configs(cfg, plan, teacher_checkpoint)
  method = _method(cfg, model_info(students[0], cfg.student.name, num_classes), teacher_cfgs, num_classes)
  _check_packed(cfg, method.any_vocab)
  teacher_mesh = placement_meshes(mesh, cfg.placement)[1]  # a Hugging Face teacher loads into its shards there
  models, teacher_hash = _teachers(cfg, teacher_cfgs, method, num_classes, teacher_mesh)
  if method.any_vocab:  # the teacher reads the same text in its own tokenization
    loader.transform = _retokenizer(cfg, loader)
  method, similarity = _auto_layer_map(cfg, method, students[0], models, loader, mesh, teacher_cfgs, num_classes)
  if cfg.data.teacher_cache:  # cached teacher logits ride in the batch
    loader = kd_data.cache.loader_for_experiment(
      cfg,
      loader,
      teacher_hash=teacher_hash,
      needs_teacher_features=method.needs_teacher_features,
      method_name=method.name,
    )
  tx, schedule = make_optimizer(cfg.optim, spe, total_steps, init_steps)
  source = plan.source(
    len(students),
    models,
    cached=bool(cfg.data.teacher_cache),
    weights=cfg.method.teacher_weights,
    combine=cfg.method.multi_teacher,
    ema_decay=cfg.method.ema_decay,
  )
  distiller = Distiller(
    students,
    source,
    method=method,
    optimizer=tx,
    mesh=mesh,
    num_examples=len(train_ds),
    steps_per_epoch=spe,
    grad_accum=cfg.optim.grad_accum,
    fsdp=cfg.run.mesh_fsdp > 1,
    xla_cpu_conv=cfg.run.xla_cpu_conv,
    responses=cfg.responses,
    placement=cfg.placement,
  )
  if cfg.placement.split:  # the other placements' batch sizes were checked on the mesh before anything was built
    distiller.check_batch_size(cfg.data.batch_size)
    distiller.check_batch_size(cfg.data.eval_batch_size, "data.eval_batch_size")
  state = distiller.init(jax.random.key(cfg.run.seed), loader.batch(0, 0))
  init_steps = init_steps if method.stage_terms("init") else 0
  run = Run(cfg, distiller, state, loader, eval_ds, view, teacher_hash, total_steps, init_steps, schedule, num_classes)
  return dataclasses.replace(run, layer_similarity=similarity)
