#!/usr/bin/env python
"""Two expert teachers, one student, on-policy: routing each row to its task's teacher vs either teacher alone.

Two token tasks on one prompt format, ``<bos> TASK d1 d2 d3 d4 =`` (four
digits), answered with four digits and ``<eos>``:

  reverse  the digits in reverse order       (task 0)
  shift    each digit + 3 mod 10, in order   (task 1)

Each teacher (``transformer_lm``, 2 layers, width 64) is trained on its own
task only, so it is expert on its half and has never seen the other's task
token. One student (2 layers, width 32, from scratch) is then distilled
on-policy on the mixed stream (every row's answer sampled from the current
student at temperature 1, λ = 1; per-token reverse KL(student ‖ teacher),
GKD's on-policy objective), with the same budget in every arm:

  route        each row scored by the teacher of its task (batch["task"])
  reverse_only every row scored by the reverse teacher
  shift_only   every row scored by the shift teacher
  average      every row scored by the two teachers' averaged logits
  mixture      every row scored by the mixture of their two distributions

Exact match of greedy answers on held-out digit strings (those divisible by
7 never appear in training), per task, for the teachers and every student;
one line of JSON per run, then a summary table with mean ± 95 % t interval
over the seeds (``--out`` appends the JSON lines to a file; ``--table FILE``
prints the table of a file's runs).

    nice -n 10 python scripts/multi_teacher_on_policy.py --seeds 0 1 2 --out results/multi_teacher_on_policy.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax
from flax import nnx
from scipy import stats

import kdjax
from kdjax import models
from kdjax.engine.evaluation import student_model
from kdjax.methods import MethodConfig
from kdjax.responses import ResponseConfig

PAD, BOS, EOS, SEP = 0, 1, 2, 3
TASK_TOKEN = (4, 5)  # reverse, shift
DIGIT0, DIGITS, V = 6, 4, 16
L = 1 + 1 + DIGITS + 1 + DIGITS + 1  # the full sequence: 12 tokens; rows hold its inputs and next tokens
TASKS = ("reverse", "shift")
ARMS = ("route", "reverse_only", "shift_only", "average", "mixture")


def answer(task: int, digits: np.ndarray) -> np.ndarray:
  """``(N, 4)`` digits → ``(N, 4)`` answer digits of ``task``."""
  return digits[:, ::-1] if task == 0 else (digits + 3) % 10


def rows(rng: np.random.Generator, tasks: np.ndarray, held_out: bool) -> dict:
  """Token rows ``inputs``/``label`` ``(N, L)`` (−1 on prompt positions) and ``task`` ``(N,)``."""
  n = len(tasks)
  digits = rng.integers(0, 10, (12 * n, DIGITS))  # ≥ n held-out strings (1 in 7) with near certainty
  value = (digits * 10 ** np.arange(DIGITS)).sum(1)
  digits = digits[(value % 7 == 0) == held_out][:n]
  ans = np.stack([answer(int(t), d[None])[0] for t, d in zip(tasks, digits)])
  seq = np.concatenate(
    [
      np.full((n, 1), BOS),
      np.asarray(TASK_TOKEN)[tasks][:, None],
      digits + DIGIT0,
      np.full((n, 1), SEP),
      ans + DIGIT0,
      np.full((n, 1), EOS),
      np.full((n, 1), PAD),
    ],
    1,
  ).astype(np.int32)
  label = seq[:, 1:].copy()
  label[:, : 2 + DIGITS] = -1  # prompt positions; the first scored target follows "="
  label[:, L - 1 :] = -1  # the padding after <eos> is not scored
  return {"inputs": seq[:, :L], "label": label, "task": tasks.astype(np.int32)}


def lm(layers: int, dim: int, seed: int) -> nnx.Module:
  return models.create(
    "transformer_lm", num_classes=V, num_layers=layers, dim=dim, num_heads=4, max_len=L + 1, rngs=nnx.Rngs(seed)
  )


def optimizer(steps: int, lr: float):
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(lr, steps), 1e-2))


def train(d: kdjax.Distiller, seed: int, steps: int, batch: int, task_of) -> object:
  """``steps`` steps of ``batch`` fresh rows (``task_of(rng, n)`` their tasks); the final state."""
  rng = np.random.default_rng(1000 + seed)
  state = None
  for _ in range(steps):
    b = rows(rng, task_of(rng, batch), held_out=False)
    state = d.init(jax.random.key(seed), b) if state is None else state
    state, _ = d.step(state, b)
  return state


def exact_match(d: kdjax.Distiller, state, evals: list[dict]) -> list[float]:
  """Greedy exact match on each task's held-out rows."""
  return [d.exact_match(state, [{"inputs": e["inputs"], "label": e["label"]}])["exact_match"] for e in evals]


def run_seed(seed: int, args) -> list[dict]:
  evals = [rows(np.random.default_rng(7), np.full(args.eval_rows, t), held_out=True) for t in range(2)]
  out, teachers = [], []
  for t in range(2):
    start = time.time()
    d = kdjax.Distiller(lm(2, 64, 10 * seed + t), None, method="ce", optimizer=optimizer(args.teacher_steps, 3e-3))
    state = train(d, seed, args.teacher_steps, args.batch, lambda rng, n, t=t: np.full(n, t))
    teachers.append(student_model(d, state))
    out.append(dict(seed=seed, run=f"teacher_{TASKS[t]}", em=exact_match(d, state, evals), s=time.time() - start))
    print(json.dumps(out[-1]), flush=True)
  on_policy = ResponseConfig(student_fraction=1.0, temperature=1.0, max_new_tokens=DIGITS + 1, stop_tokens=(EOS,))
  arms = {
    "route": dict(teacher=teachers, multi_teacher="route"),
    "reverse_only": dict(teacher=teachers[0]),
    "shift_only": dict(teacher=teachers[1]),
    "average": dict(teacher=teachers, multi_teacher="average"),
    "mixture": dict(teacher=teachers, multi_teacher="mixture"),
  }
  for name in args.arms:
    start = time.time()
    d = kdjax.Distiller(
      lm(2, 32, 100 + seed),
      **arms[name],
      method=MethodConfig(name="reverse_kl"),
      optimizer=optimizer(args.student_steps, 3e-3),
      responses=on_policy,
    )
    state = train(d, seed, args.student_steps, args.batch, lambda rng, n: rng.integers(0, 2, n))
    out.append(dict(seed=seed, run=name, em=exact_match(d, state, evals), s=time.time() - start))
    print(json.dumps(out[-1]), flush=True)
  return out


def interval(xs) -> str:
  """``mean ± half-width`` of the 95 % t interval, in %."""
  xs = 100 * np.asarray(xs, float)
  half = stats.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / np.sqrt(len(xs)) if len(xs) > 1 else float("nan")
  return f"{xs.mean():.1f} ± {half:.1f}"


def table(results: list[dict]) -> str:
  """Markdown table of exact match per task, mean ± 95 % interval over seeds (a rerun replaces its run)."""
  results = list({(r["seed"], r["run"]): r for r in results}.values())
  names = [f"teacher_{t}" for t in TASKS] + [a for a in ARMS if any(r["run"] == a for r in results)]
  lines = ["| run | reverse EM % | shift EM % | mean of both % |", "|---|---|---|---|"]
  for name in names:
    em = np.array([r["em"] for r in results if r["run"] == name])
    lines.append(f"| {name} | {interval(em[:, 0])} | {interval(em[:, 1])} | {interval(em.mean(1))} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
  p.add_argument("--teacher-steps", type=int, default=200)
  p.add_argument("--student-steps", type=int, default=200)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--eval-rows", type=int, default=256)
  p.add_argument("--out", default=None, help="append the runs to this file as JSON lines")
  p.add_argument("--table", default=None, help="only print the table of this file's runs")
  args = p.parse_args(argv)
  if args.table:
    with open(args.table) as f:
      print(table([json.loads(line) for line in f if line.strip()]))
    return
  results = [r for seed in args.seeds for r in run_seed(seed, args)]
  if args.out:
    with open(args.out, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in results)
  print(table(results))


if __name__ == "__main__":
  main()
