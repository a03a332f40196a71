"""The default experiment end to end: teacher, student from scratch, student
with KD on a transfer set — over several seeds — then a table and a plot.

Run through ``scripts/demo.sh`` (which sets up the virtualenv first).
Everything is measured by kdjax itself on the embedded MNIST-1D dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdjax import engine, report  # noqa: E402
from kdjax.cli import base_config, load_experiment  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=6000)
  ap.add_argument("--workdir", default="workdirs/demo")
  ap.add_argument("--out", default="results/mnist1d_kd.md")
  args = ap.parse_args()

  mod = load_experiment("mnist1d_kd")
  root = Path(args.workdir)
  t0 = time.time()

  def with_run(cfg, workdir, seed):
    return cfg.replace(
      optim=dataclasses.replace(cfg.optim, steps=args.steps),
      run=dataclasses.replace(cfg.run, workdir=str(workdir), seed=seed, quiet=True),
    )

  kd = mod.get_config()
  cells = {
    "scratch": base_config(mod, "scratch"),
    "kd_labelled": base_config(mod, "kd_labelled"),
    "kd": kd,
  }
  print(
    f"[demo] MNIST-1D, {args.seeds} seeds: a {kd.teacher.name} teacher on the 4,000 labelled examples, then the "
    f"{kd.student.name} student from scratch, with KD on the labelled set, and with KD + the transfer set",
    flush=True,
  )
  run_dirs = []
  for seed in range(args.seeds):
    # One teacher per seed, so the spread over seeds includes the teacher's.
    teacher_dir = root / "teacher" / f"seed{seed}"
    t_res = engine.fit(with_run(mod.teacher_config(kd), teacher_dir, seed))
    run_dirs.append(teacher_dir)
    print(f"[demo]   seed {seed} {'teacher':12s} test accuracy {100 * t_res['test_accuracy']:.2f}%", flush=True)
    for name, cfg in cells.items():
      cfg = cfg.replace(teacher=dataclasses.replace(cfg.teacher, checkpoint=str(teacher_dir)))
      wd = root / name / f"seed{seed}"
      res = engine.fit(with_run(cfg, wd, seed))
      run_dirs.append(wd)
      print(
        f"[demo]   seed {seed} {name:12s} test accuracy {100 * res['test_accuracy']:.2f}% "
        f"(agreement with teacher {100 * res['agreement']:.1f}%)",
        flush=True,
      )

  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  md = report.make_report([str(d) for d in run_dirs], str(out))
  header = (
    f"# MNIST-1D: {kd.teacher.name} teacher → {kd.student.name} student\n\n"
    f"Measured by `scripts/demo.sh` ({args.seeds} seeds, Adam lr 1e-2, batch 100, {args.steps} steps, "
    f"KD = 0.1·CE + 0.9·KD at T = 4; transfer set = 40,000 unlabelled MNIST-1D inputs from the generator; "
    f"one teacher per seed). Wall time {time.time() - t0:.0f} s.\n\n"
  )
  out.write_text(header + md)
  print(header + md)
  print(f"[demo] table: {out}; plots next to it", flush=True)


if __name__ == "__main__":
  main()
