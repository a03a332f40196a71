"""The distillation engine: the public core (``Distiller``, ``train`` and its hooks) and ``fit(cfg)``.

``distiller`` (one jitted step for any NNX student and teacher source), ``teachers`` (where the
targets come from: frozen teachers, a cache, an EMA of the student, peers, none), ``evaluation``
(evaluate, exact match, export), ``hooks``
(``train``, the thin loop, and its hooks), ``experiment`` (a ``Distiller``
from an ``Experiment`` config), ``loop`` (``fit``: a config to a workdir of
results), ``teacher_cache`` (``kdjax cache``), ``step`` (the pure train and
eval steps), ``state``, ``sharding``, ``taps``, ``faults``, ``optim``.
"""

from kdjax.engine.distiller import Distiller
from kdjax.engine.evaluation import evaluate as evaluate_distiller
from kdjax.engine.evaluation import exact_match
from kdjax.engine.experiment import build, load_teacher
from kdjax.engine.faults import NONFINITE_EXIT, PREEMPTED_EXIT, Fault, NonFiniteLoss, Preempted, fault_from_env
from kdjax.engine.hooks import Hook, Progress, train
from kdjax.engine.loop import evaluate, fit, group_name
from kdjax.engine.optim import make_optimizer, make_schedule
from kdjax.parallel.sharding import batch_sharding, make_mesh, param_shardings, replicated, shard_batch
from kdjax.engine.state import ModelDef, TeacherState, TrainState, apply_model, split_model
from kdjax.engine.step import StepSpec, make_eval_step, make_train_step
from kdjax.engine.teachers import EMA, Cached, Frozen, FunctionTeacher, NoTeacher, Peers, TeacherSource
from kdjax.engine.teacher_cache import build_teacher_cache, teacher_predict_fn

__all__ = [
  "Distiller",
  "TeacherSource",
  "NoTeacher",
  "Frozen",
  "Cached",
  "EMA",
  "Peers",
  "evaluate_distiller",
  "exact_match",
  "FunctionTeacher",
  "Hook",
  "Progress",
  "train",
  "NONFINITE_EXIT",
  "PREEMPTED_EXIT",
  "Fault",
  "NonFiniteLoss",
  "Preempted",
  "fault_from_env",
  "build",
  "load_teacher",
  "build_teacher_cache",
  "teacher_predict_fn",
  "evaluate",
  "fit",
  "group_name",
  "make_optimizer",
  "make_schedule",
  "batch_sharding",
  "make_mesh",
  "param_shardings",
  "replicated",
  "shard_batch",
  "ModelDef",
  "TeacherState",
  "TrainState",
  "apply_model",
  "split_model",
  "StepSpec",
  "make_eval_step",
  "make_train_step",
]
