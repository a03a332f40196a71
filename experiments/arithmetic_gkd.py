"""Language-model distillation on 4-digit addition: supervised KD, SeqKD and on-policy GKD.

The embedded ``arithmetic`` dataset (config ``add4``): ``<bos> a + b =``
with digits least significant first, answered with its worked carries
``s0 c0 s1 c1 … s4 <eos>`` (10 generated tokens; 30,000 training and 1,000
test pairs). Exact match is checked on greedy generations from the prompt.

The setting of Agarwal et al. (2024), "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes" (GKD), on a task small enough
for a CPU: a 4-layer teacher (``lm_4x64``) trained on the data, then a
1-layer, half-width student (``lm_1x32``) trained for the same number of
steps from scratch and by five distillation variants:

  teacher         lm_4x64 on the data (CE)
  scratch         the student alone on the data (CE)
  supervised_kd   forward KL(teacher ‖ student) per token on the data's answers
  seqkd           CE on the teacher's greedy answers (Kim & Rush 2016)
  gkd_rkl         on-policy: every answer sampled from the student (λ = 1,
                  temperature 1), reverse KL(student ‖ teacher) per token
  gkd_jsd         on-policy as above with the generalized JSD, β = 0.5

The teacher trains for 3,000 steps of batch 32 (AdamW 3e-3, cosine); every
student variant for 1,000 steps of batch 64 with the same optimizer. The
distillation configs read the teacher from ``workdirs/arithmetic/teacher/seed0``
(``kdjax train-teacher experiments/arithmetic_gkd.py`` writes it);
``scripts/lm_experiment.sh`` runs the whole table with ``kdjax sweep`` (three
teacher seeds, the students distil from the best) and ``kdjax report``.
"""

import dataclasses

from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, OptimConfig, RunConfig
from kdjax.data.builders.arithmetic import EOS, PAD
from kdjax.responses import ResponseConfig

TEACHER_DIR = "workdirs/arithmetic/teacher/seed0"
TEACHER_STEPS = 3000  # batch 32
STUDENT_STEPS = 1000  # batch 64


def get_config() -> Experiment:
  """On-policy GKD with reverse KL (the default config)."""
  return _student(
    "gkd_rkl",
    MethodConfig(name="reverse_kl"),
    ResponseConfig(student_fraction=1.0, temperature=1.0, stop_tokens=(EOS,), pad_token=PAD),
  )


def _student(name: str, method: MethodConfig, responses: ResponseConfig | None = None) -> Experiment:
  responses = responses if responses is not None else ResponseConfig()
  return Experiment(
    name=f"arithmetic_{name}",
    mode="offline",
    data=DataConfig(name="arithmetic", view="tokens", batch_size=64, eval_batch_size=500),
    teacher=ModelConfig(name="lm_4x64", checkpoint=TEACHER_DIR),
    student=ModelConfig(name="lm_1x32"),
    method=method,
    responses=responses,
    optim=OptimConfig(
      name="adamw", lr=3e-3, weight_decay=0.01, schedule="cosine", warmup_epochs=0.2, steps=STUDENT_STEPS, clip_norm=1.0
    ),
    run=RunConfig(workdir=f"workdirs/arithmetic/{name}", eval_every=250, log_every=50),
  )


def teacher_config(cfg: Experiment) -> Experiment:
  """What ``kdjax train-teacher experiments/arithmetic_gkd.py`` trains: lm_4x64 on the data."""
  return cfg.replace(
    name="arithmetic_teacher",
    mode="teacher",
    student=dataclasses.replace(cfg.teacher, checkpoint=None),
    method=MethodConfig(name="ce"),
    responses=ResponseConfig(),
    data=dataclasses.replace(cfg.data, batch_size=32),
    optim=dataclasses.replace(cfg.optim, steps=TEACHER_STEPS),
    run=dataclasses.replace(cfg.run, workdir=TEACHER_DIR, eval_every=1000),
  )


CONFIGS = {
  "teacher": lambda: teacher_config(get_config()),
  "scratch": lambda: _student("scratch", MethodConfig(name="ce")),
  "supervised_kd": lambda: _student("supervised_kd", MethodConfig(name="forward_kl")),
  "seqkd": lambda: _student(
    "seqkd",
    MethodConfig(name="ce"),
    ResponseConfig(others="teacher", teacher_temperature=0.0, stop_tokens=(EOS,), pad_token=PAD),
  ),
  "gkd_rkl": get_config,
  "gkd_jsd": lambda: _student(
    "gkd_jsd",
    MethodConfig(name="gkd", gkd_beta=0.5),
    ResponseConfig(student_fraction=1.0, temperature=1.0, stop_tokens=(EOS,), pad_token=PAD),
  ),
}
