"""The distillation engine: pure jitted steps over a mesh, and the ``fit`` loop."""

from kdjax.engine.loop import (NONFINITE_EXIT, PREEMPTED_EXIT, NonFiniteLoss, Preempted, build, build_teacher_cache,
                               evaluate, fit, group_name)
from kdjax.engine.optim import make_optimizer, make_schedule
from kdjax.engine.sharding import batch_sharding, make_mesh, param_shardings, replicated, shard_batch
from kdjax.engine.state import ModelDef, TeacherState, TrainState, apply_model, split_model
from kdjax.engine.step import StepSpec, make_eval_step, make_train_step

__all__ = [
    "NONFINITE_EXIT", "PREEMPTED_EXIT", "NonFiniteLoss", "Preempted", "build", "build_teacher_cache", "evaluate",
    "fit", "group_name",
    "make_optimizer", "make_schedule", "batch_sharding", "make_mesh", "param_shardings", "replicated", "shard_batch",
    "ModelDef", "TeacherState", "TrainState", "apply_model", "split_model", "StepSpec", "make_eval_step",
    "make_train_step",
]
