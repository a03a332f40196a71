"""Hidden-state distillation on the hidden-Markov language: which layer map — chosen by CKA, uniform or last?

The task, the teacher and the exact metrics are those of :mod:`experiments.hmm_lm` (``hmm_lm``: a random
hidden-Markov language of 4 topics × 6 states whose true next-token distribution is known, so every student
is scored exactly by KL(true ‖ student) on held-out responses). The teacher's hidden states carry its belief
over the latent topic and state, which a small student must learn to track from the prompt; a term on those
states is a second, denser signal than the next-token distribution alone.

Models and budget (every cell shares them; only the hidden-state term and its layer map vary):

  teacher   lm_4x64 (4 layers, width 64), the ``hmm_lm`` teacher (``workdirs/hmm_lm/teacher/seed0``,
            3,000 steps of CE); not retrained here.
  student   lm_2x32 (2 layers, width 32, a learned projection 32 → 64 per layer pair for the
            hidden-state term), STUDENT_STEPS steps of batch 64 (half of ``hmm_lm``'s budget), AdamW 3e-3,
            cosine, 10 % warm-up, weight decay 0.01, clip 1; evaluated at the end.

The cells (``CONFIGS``):

  fkl        supervised KD: forward KL(teacher ‖ student) per response token (logit term only)
  auto       forward KL + ``hidden_cos`` (weight HIDDEN_WEIGHT) over the map ``layer_map=auto`` chooses:
             linear CKA between every student and teacher layer on 4 training batches at set-up, then
             the order-preserving map of the largest summed CKA
  uniform    the same term over TinyBERT's uniform map (student layer i of 2 ↔ teacher layer 2i + 1)
  last       the same term on the last layers only (student 1 ↔ teacher 3)

The hidden-state term is DistilBERT's cosine loss (``hidden_cos``, 1 − cos(W·h_s, h_t) per real token):
TinyBERT's MSE (``hidden_mse``) on this teacher's unnormalised residual stream (13–40 per dimension) outweighs
the KL and made the student worse at every weight tried (0.001–1); the scale-free cosine helped.
``scripts/layer_map_hmm.sh`` runs the cells with ``kdjax sweep`` and writes the page with ``kdjax report``.
"""

import dataclasses
import importlib.util
from pathlib import Path

from kdjax.config import Experiment, MethodConfig, OptimConfig, RunConfig


def _load_hmm_lm():
  """``experiments/hmm_lm.py`` next to this file (experiment files are loaded by path, not as a package)."""
  spec = importlib.util.spec_from_file_location("kdjax_experiment_hmm_lm", Path(__file__).with_name("hmm_lm.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


hmm_lm = _load_hmm_lm()

WORKDIRS = "workdirs/hmm_layer_map"
STUDENT = "lm_2x32"
STUDENT_STEPS = 300  # batch 64
HIDDEN_TERM = "hidden_cos"
HIDDEN_WEIGHT = 1.0
SEEDS = 5
MAPS = ("auto", "uniform", "last")


def _cell(name: str, layer_map: str | None) -> Experiment:
  """``hmm_lm``'s forward-KL cell with this experiment's student and budget, plus the hidden-state term over
  ``layer_map`` (None: the logit term alone)."""
  base = hmm_lm.get_config()
  terms = () if layer_map is None else (f"{HIDDEN_TERM}={HIDDEN_WEIGHT:g}",)
  method = MethodConfig(name="forward_kl", terms=terms, layer_map=() if layer_map is None else (layer_map,))
  optim: OptimConfig = dataclasses.replace(base.optim, steps=STUDENT_STEPS)
  run: RunConfig = dataclasses.replace(base.run, workdir=f"{WORKDIRS}/{name}", eval_every=STUDENT_STEPS)
  return base.replace(
    name=f"hmm_layer_map_{name}",
    student=dataclasses.replace(base.student, name=STUDENT),
    method=method,
    optim=optim,
    run=run,
  )


def get_config() -> Experiment:
  """The logit term alone (forward KL), the reference the hidden-state cells are compared with."""
  return _cell("fkl", None)


CONFIGS = {"fkl": get_config, **{m: (lambda m=m: _cell(m, m)) for m in MAPS}}
