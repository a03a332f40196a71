"""MNIST-1D: 1-D CNN teacher → MLP student (the default, offline experiment).

The setting of Hinton et al. (2015)'s transfer-set experiment on MNIST-1D
(Greydanus & Kobak 2020): the teacher (the MNIST-1D paper's 3-conv CNN,
~5.2k params, ≈94% in the paper) is trained on the 4,000 labelled examples;
the 40-100-100-10 MLP student (≈68% from scratch in the paper) learns from
the labelled set plus 40,000 unlabelled inputs drawn from the same generator
with another seed, labelled only by the teacher's soft targets.

Training as in the MNIST-1D notebook: Adam, lr 1e-2, batch 100, 6,000 steps.

Configs:
  kd (default)  KD (0.1·CE + 0.9·KD, T=4) with the transfer set
  kd_labelled   the same KD on the 4,000 labelled examples only
  scratch       the student alone (CE), no teacher
"""

import dataclasses

from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, OptimConfig, RunConfig

STEPS = 6000
# Test accuracy (%) in the MNIST-1D paper (Greydanus & Kobak 2020), default
# 4000/1000 split: CNN 94, MLP 68. The paper has no KD numbers.
PUBLISHED_CNN = 94.0
PUBLISHED_MLP = 68.0


def get_config() -> Experiment:
  return Experiment(
    name="mnist1d_kd",
    mode="offline",
    data=DataConfig(name="mnist1d", batch_size=100, eval_batch_size=1000, transfer_split="transfer"),
    teacher=ModelConfig(name="cnn1d", checkpoint="workdirs/mnist1d/teacher"),
    student=ModelConfig(name="mlp"),
    method=MethodConfig(name="kd", temperature=4.0),
    optim=OptimConfig(name="adam", lr=1e-2, steps=STEPS),
    run=RunConfig(workdir="workdirs/mnist1d/kd", eval_every=500, log_every=100),
  )


def teacher_config(cfg: Experiment) -> Experiment:
  """What `kdjax train-teacher mnist1d_kd` trains: the CNN on labelled data."""
  return cfg.replace(
    name="mnist1d_teacher",
    mode="teacher",
    student=dataclasses.replace(cfg.teacher, checkpoint=None),
    method=MethodConfig(name="ce"),
    data=dataclasses.replace(cfg.data, transfer_split=None),
    run=dataclasses.replace(cfg.run, workdir="workdirs/mnist1d/teacher"),
    published=PUBLISHED_CNN,
  )


def _kd_labelled() -> Experiment:
  c = get_config()
  return c.replace(
    data=dataclasses.replace(c.data, transfer_split=None),
    run=dataclasses.replace(c.run, workdir="workdirs/mnist1d/kd_labelled"),
  )


def _scratch() -> Experiment:
  c = get_config()
  return c.replace(
    method=MethodConfig(name="ce"),
    data=dataclasses.replace(c.data, transfer_split=None),
    run=dataclasses.replace(c.run, workdir="workdirs/mnist1d/scratch"),
    published=PUBLISHED_MLP,
  )


CONFIGS = {"kd": get_config, "kd_labelled": _kd_labelled, "scratch": _scratch}
