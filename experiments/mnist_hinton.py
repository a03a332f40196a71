"""MNIST: Hinton, Vinyals & Dean (2015), "Distilling the knowledge in a neural network", §3.

Teacher ``mlp_1200`` (784-1200-1200-10 ReLU) trained with dropout (0.5 on
the hidden layers, 0.2 on the input) and inputs jittered by up to 2 pixels;
student ``mlp_800`` (784-800-800-10 ReLU) without regularisation, trained on
the same 60,000 images either on hard labels alone (the paper: 146 test
errors) or with the teacher's soft targets at T = 20 (74 errors; the teacher
makes 67). The soft term is multiplied by T² (``kd`` does this) and the hard
term gets a much lower weight, as the paper recommends: 0.1·CE + 0.9·T²·KL.

Not reproduced from the paper: its max-norm weight constraints, and its
optimizer/schedule, which the paper does not state. kdjax uses SGD with
momentum 0.9, lr 0.05 with a cosine schedule, batch 128, 60 epochs (teacher
and student alike).

Data: TFDS ``mnist``, which must be downloaded once. Offline, the run stops
with one line saying how to prepare it (``tfds build mnist --data_dir DIR``
on a machine with network, or ``--data.download`` where this machine has
network).

Configs:
  kd (default)  the student with soft targets at T = 20 (published 74 errors → 99.26 %)
  scratch       the student on hard labels alone (146 errors → 98.54 %)
and ``kdjax train-teacher mnist_hinton`` trains the teacher (67 errors → 99.33 %).
"""

import dataclasses

from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, OptimConfig, RunConfig

TEST_EXAMPLES = 10_000
PUBLISHED_ERRORS = {"teacher": 67, "scratch": 146, "kd": 74}


def _acc(errors: int) -> float:
  """Published test errors (of 10,000) as accuracy in %."""
  return round(100.0 * (TEST_EXAMPLES - errors) / TEST_EXAMPLES, 2)


def _optim() -> OptimConfig:
  return OptimConfig(name="sgd", lr=0.05, momentum=0.9, schedule="cosine", epochs=60.0)


def get_config() -> Experiment:
  return Experiment(
    name="mnist_hinton",
    mode="offline",
    data=DataConfig(name="mnist", batch_size=128, eval_batch_size=1000, view="none"),
    teacher=ModelConfig(name="mlp_1200", checkpoint="workdirs/mnist_hinton/teacher"),
    student=ModelConfig(name="mlp_800"),
    method=MethodConfig(name="kd", temperature=20.0),
    optim=_optim(),
    run=RunConfig(workdir="workdirs/mnist_hinton/kd", log_every=100),
    published=_acc(PUBLISHED_ERRORS["kd"]),
  )


def teacher_config(cfg: Experiment) -> Experiment:
  """What ``kdjax train-teacher mnist_hinton`` trains: ``mlp_1200`` with dropout and ±2 px jitter."""
  return cfg.replace(
    name="mnist_hinton_teacher",
    mode="teacher",
    student=dataclasses.replace(cfg.teacher, checkpoint=None),
    method=MethodConfig(name="ce"),
    data=dataclasses.replace(cfg.data, view="jitter"),
    run=dataclasses.replace(cfg.run, workdir="workdirs/mnist_hinton/teacher"),
    published=_acc(PUBLISHED_ERRORS["teacher"]),
  )


def _scratch() -> Experiment:
  c = get_config()
  return c.replace(
    method=MethodConfig(name="ce"),
    teacher=dataclasses.replace(c.teacher, checkpoint=None),
    run=dataclasses.replace(c.run, workdir="workdirs/mnist_hinton/scratch"),
    published=_acc(PUBLISHED_ERRORS["scratch"]),
  )


CONFIGS = {"kd": get_config, "scratch": _scratch}
