"""Language-model distillation on a language whose true distribution is known: which objective wins?

The data: the embedded ``hmm_lm`` dataset (:mod:`kdjax.data.builders.hmm`), a
random hidden-Markov language (4 topics × 6 states, 20 symbols; the topic
read from the prompt governs the whole continuation). A row is a prompt of
8 symbols and a response of 24; 20,000 training and 1,000 held-out rows.
Its entropy rate is about 1.7 nats per token; a bigram model reaches 2.2.
Because the truth is known, every student is scored exactly
(:func:`kdjax.engine.evaluation.true_distribution`): teacher-forced
KL(true ‖ student) and KL(teacher ‖ student) on the held-out responses, and,
on the student's own continuations of the held-out prompts, their
log-likelihood under the truth (sampled at temperature 1 and greedy), the
sequence-level KL(student ‖ true) estimated from the samples, and distinct
4-grams (mode collapse).

Models and budget (every method cell shares them; only the objective and
where the responses come from vary):

  teacher   lm_4x64 (4 layers, width 64, 200 k parameters) trained on the data
            with cross-entropy: TEACHER_STEPS steps of batch 64, AdamW 3e-3,
            cosine, 10 % warm-up, clip 1; one seed (the students of every
            seed distil from ``workdirs/hmm_lm/teacher/seed0``).
  student   lm_1x32 (1 layer, width 32, 16 k parameters): too small to track
            the hidden state everywhere, so the objectives must trade
            coverage against precision. STUDENT_STEPS steps of batch 64,
            AdamW 3e-3, cosine, 10 % warm-up, weight decay 0.01, clip 1;
            evaluated EVAL_EVERY steps.

The cells (``CONFIGS``):

  scratch          cross-entropy on the data's responses
  fkl              supervised KD: forward KL(teacher ‖ student) per token on the data's responses
  rkl              reverse KL(student ‖ teacher), data's responses
  jsd_0.1 … 0.9    generalized JSD(β) (β = 0.1 near forward KL, 0.9 near reverse KL; GKD, TRL convention)
  skew_kl          DistiLLM's skew KL(teacher ‖ α·teacher + (1−α)·student), α = 0.1
  skew_rkl         DistiLLM's skew reverse KL(student ‖ α·student + (1−α)·teacher), α = 0.1
  seqkd            cross-entropy on the teacher's greedy responses (Kim & Rush 2016)
  onpolicy_jsd_λ   GKD: a fraction λ ∈ {0.5, 1} of each batch's responses sampled from the
                   current student at temperature 1, JSD(0.5) on them (the rest the data's)
  onpolicy_rkl_λ   as above with reverse KL (λ = 1 is MiniLLM's objective without its policy gradient)

``scripts/lm_experiment.sh`` trains the teacher and runs the table with
``kdjax sweep`` (SEEDS seeds per cell) and ``kdjax report``.
"""

import dataclasses

from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, OptimConfig, RunConfig
from kdjax.data.builders.hmm import PAD
from kdjax.responses import ResponseConfig

WORKDIRS = "workdirs/hmm_lm"
TEACHER_DIR = f"{WORKDIRS}/teacher/seed0"
TEACHER = "lm_4x64"
STUDENT = "lm_1x32"
TEACHER_STEPS = 3000  # batch 64
STUDENT_STEPS = 600  # batch 64
EVAL_EVERY = 150
SEEDS = 5
LR = 3e-3


def _optim(steps: int) -> OptimConfig:
  return OptimConfig(
    name="adamw", lr=LR, weight_decay=0.01, schedule="cosine", warmup_epochs=0.1, steps=steps, clip_norm=1.0
  )


def _on_policy(fraction: float) -> ResponseConfig:
  return ResponseConfig(student_fraction=fraction, temperature=1.0, pad_token=PAD)


def _student(name: str, method: MethodConfig, responses: ResponseConfig | None = None) -> Experiment:
  return Experiment(
    name=f"hmm_lm_{name}",
    mode="offline",
    data=DataConfig(name="hmm_lm", view="tokens", batch_size=64, eval_batch_size=500),
    teacher=ModelConfig(name=TEACHER, checkpoint=TEACHER_DIR),
    student=ModelConfig(name=STUDENT),
    method=method,
    responses=responses if responses is not None else ResponseConfig(),
    optim=_optim(STUDENT_STEPS),
    run=RunConfig(workdir=f"{WORKDIRS}/{name}", eval_every=EVAL_EVERY, log_every=50),
  )


def get_config() -> Experiment:
  """Supervised KD, forward KL (the reference every method is compared with)."""
  return _student("fkl", MethodConfig(name="forward_kl"))


def teacher_config(cfg: Experiment) -> Experiment:
  """What ``kdjax train-teacher experiments/hmm_lm.py`` trains: the teacher model on the data (CE)."""
  return cfg.replace(
    name="hmm_lm_teacher",
    mode="teacher",
    student=dataclasses.replace(cfg.teacher, checkpoint=None),
    method=MethodConfig(name="ce"),
    responses=ResponseConfig(),
    optim=_optim(TEACHER_STEPS),
    run=dataclasses.replace(cfg.run, workdir=TEACHER_DIR, eval_every=TEACHER_STEPS // 4),
  )


CONFIGS = {
  "teacher": lambda: teacher_config(get_config()),
  "scratch": lambda: _student("scratch", MethodConfig(name="ce")),
  "fkl": get_config,
  "rkl": lambda: _student("rkl", MethodConfig(name="reverse_kl")),
  **{f"jsd_{b}": (lambda b=b: _student(f"jsd_{b}", MethodConfig(name="gkd", gkd_beta=b))) for b in (0.1, 0.5, 0.9)},
  "skew_kl": lambda: _student("skew_kl", MethodConfig(name="skew_kl", skew_alpha=0.1)),
  "skew_rkl": lambda: _student("skew_rkl", MethodConfig(name="skew_reverse_kl", skew_alpha=0.1)),
  "seqkd": lambda: _student(
    "seqkd", MethodConfig(name="ce"), ResponseConfig(others="teacher", teacher_temperature=0.0, pad_token=PAD)
  ),
  **{
    f"onpolicy_jsd_{f:g}": (
      lambda f=f: _student(f"onpolicy_jsd_{f:g}", MethodConfig(name="gkd", gkd_beta=0.5), _on_policy(f))
    )
    for f in (0.5, 1.0)
  },
  **{
    f"onpolicy_rkl_{f:g}": (lambda f=f: _student(f"onpolicy_rkl_{f:g}", MethodConfig(name="reverse_kl"), _on_policy(f)))
    for f in (0.5, 1.0)
  },
}
METHODS = [k for k in CONFIGS if k != "teacher"]
