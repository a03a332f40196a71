"""scikit-learn's 8×8 digits (embedded): small CNN teacher → MLP-free CNN student.

A fast sanity experiment: 1,797 images, 10 classes. The teacher is
``cnn_digits``; the student is the same architecture trained with KD (a
born-again-style self-distillation check), or use ``--student.name`` to pick
another model.
"""

import dataclasses

from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, OptimConfig, RunConfig


def get_config() -> Experiment:
  return Experiment(
    name="digits_kd",
    mode="offline",
    data=DataConfig(name="digits", batch_size=64, eval_batch_size=256),
    teacher=ModelConfig(name="cnn_digits", checkpoint="workdirs/digits/teacher"),
    student=ModelConfig(name="cnn_digits"),
    method=MethodConfig(name="kd", temperature=4.0),
    optim=OptimConfig(name="adam", lr=3e-3, steps=1000),
    run=RunConfig(workdir="workdirs/digits/kd", eval_every=200, log_every=50),
  )


def teacher_config(cfg: Experiment) -> Experiment:
  return cfg.replace(
    name="digits_teacher",
    mode="teacher",
    student=dataclasses.replace(cfg.teacher, checkpoint=None),
    method=MethodConfig(name="ce"),
    run=dataclasses.replace(cfg.run, workdir="workdirs/digits/teacher"),
  )


CONFIGS = {"kd": get_config}
