"""Shipped experiments: the CIFAR-100 CRD table (configs, abstract validation of
every pair, a 2-step smoke run of every method on mock data) and Hinton's MNIST.

The smoke runs use ``tfds.testing.mock_data`` (random CIFAR-100-shaped
examples) and the cheapest CIFAR pair, resnet8 → resnet8, batch 8: each method
compiles its own train step, which dominates this file's runtime.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from kdjax import checkpoint as ckpt
from kdjax import cli, engine, models

EXP = cli.load_experiment("cifar100_crd_table")

# Channel widths of the CIFAR zoo (RepDistiller's architectures): stage2 and pooled features.
STAGE2 = {
  "wrn_40_2": 64,
  "wrn_16_2": 64,
  "wrn_40_1": 32,
  "resnet56": 32,
  "resnet20": 32,
  "resnet110": 32,
  "resnet32": 32,
  "resnet32x4": 128,
  "resnet8x4": 128,
  "vgg13": 256,
  "vgg8": 256,
}
POOLED = {
  "wrn_40_2": 128,
  "wrn_16_2": 128,
  "wrn_40_1": 64,
  "resnet56": 64,
  "resnet20": 64,
  "resnet110": 64,
  "resnet32": 64,
  "resnet32x4": 256,
  "resnet8x4": 256,
  "vgg13": 512,
  "vgg8": 512,
}


# ---------------------------------------------------------------- configs


def test_table_has_every_cell_and_the_reference_recipe():
  methods = {
    "kd",
    "fitnet",
    "at",
    "sp",
    "cc",
    "vid",
    "rkd",
    "pkt",
    "ab",
    "ft",
    "fsp",
    "nst",
    "crd",
    "crd+kd",
    "dkd",
    "dist",
  }
  pairs = {
    ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"),
  }
  assert set(EXP.METHODS) == methods and set(EXP.PAIRS) == pairs
  cells = [n for n in EXP.CONFIGS if not n.startswith(("teachers/", "students/"))]
  assert len(cells) == 16 * 7 - 1  # FSP wrn_40_2 → wrn_40_1 is n/a (see test below)
  assert sorted(n for n in EXP.CONFIGS if n.startswith("teachers/")) == [
    "teachers/resnet110",
    "teachers/resnet32x4",
    "teachers/resnet56",
    "teachers/vgg13",
    "teachers/wrn_40_2",
  ]
  assert len([n for n in EXP.CONFIGS if n.startswith("students/")]) == 6
  for name in cells:
    cfg = EXP.CONFIGS[name]()
    pair, method = name.split("/")
    assert pair == f"{cfg.teacher.name}-{cfg.student.name}" and cfg.method.name == method
    o, d = cfg.optim, cfg.data
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.schedule) == ("sgd", 0.05, 0.9, 5e-4, "step")
    assert (o.decay_epochs, o.decay_factor, o.epochs, o.steps) == ((150.0, 180.0, 210.0), 0.1, 240.0, 0)
    assert (d.name, d.batch_size, d.view, d.download) == ("cifar100", 64, "cifar", False)
    assert cfg.method.init_epochs == (30.0 if method in ("ab", "ft", "fsp") else 0.0)
    assert cfg.teacher.checkpoint == f"workdirs/cifar100/teachers/{cfg.teacher.name}"


@pytest.mark.parametrize(
  "name, published",
  [
    ("wrn_40_2-wrn_16_2/crd", 75.48),
    ("wrn_40_2-wrn_40_1/crd+kd", 74.38),
    ("resnet56-resnet20/kd", 70.66),
    ("resnet110-resnet20/fsp", 70.11),
    ("resnet110-resnet32/ab", 70.98),
    ("resnet32x4-resnet8x4/dkd", 76.32),
    ("resnet32x4-resnet8x4/dist", 76.31),
    ("vgg13-vgg8/pkt", 72.88),
    ("resnet110-resnet20/dkd", None),
    ("vgg13-vgg8/dist", None),
    ("teachers/resnet32x4", 79.42),
    ("teachers/wrn_40_2", 75.61),
    ("students/resnet20", 69.06),
    ("students/vgg8", 70.36),
  ],
)
def test_published_numbers(name, published):
  """Spot checks against the tables of CRD (Tian et al. 2020, ICLR), DKD (Zhao et al.
  2022, CVPR) and DIST (Huang et al. 2022, NeurIPS)."""
  assert EXP.CONFIGS[name]().published == published


def test_reference_weights_and_dkd_beta_per_pair():
  want_beta = {
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
    ("vgg13", "vgg8"): 6.0,
    ("resnet32x4", "resnet8x4"): 8.0,
    ("resnet110", "resnet20"): 8.0,
  }
  for (t, s), beta in want_beta.items():
    assert EXP.CONFIGS[f"{t}-{s}/dkd"]().method.dkd_beta == beta
  terms = {m: EXP.check_config(EXP.make_config("resnet32x4", "resnet8x4", m))["terms"] for m in EXP.METHODS}
  assert terms["kd"] == {"ce": 0.1, "kd": 0.9}
  assert terms["crd+kd"] == {"ce": 1.0, "kd": 1.0, "crd": 0.8}
  assert terms["dist"] == {"ce": 1.0, "dist": 2.0}
  want_b = {
    "fitnet": ("hint", 100.0),
    "at": ("at", 1000.0),
    "sp": ("sp", 3000.0),
    "cc": ("cc", 0.02),
    "vid": ("vid", 1.0),
    "rkd": ("rkd", 1.0),
    "pkt": ("pkt", 30000.0),
    "nst": ("nst", 50.0),
    "crd": ("crd", 0.8),
    "ft": ("ft", 200.0),
  }
  for m, (term, b) in want_b.items():
    assert terms[m][term] == b and terms[m]["ce"] == 1.0


@pytest.mark.slow
def test_every_pair_validates_abstractly():
  """Every cell: models, feature names/shapes, adapters and the loss of each stage, traced without compiling."""
  for name, make in EXP.CONFIGS.items():
    cfg = make()
    r = EXP.check_config(cfg)
    assert r["loss_shape"] == {st: () for st in r["stages"]}
    if cfg.mode == "teacher" or cfg.method.name == "ce":
      continue
    s, t = cfg.student.name, cfg.teacher.name
    assert r["student"].feature_shapes["pooled"] == (POOLED[s],)
    assert r["teacher"].feature_shapes["pooled"] == (POOLED[t],)
    assert r["student"].feature_shapes["stage2"][-1] == STAGE2[s]
    ad = r["adapter_shapes"]
    if cfg.method.name in ("crd", "crd+kd"):
      assert ad["crd"]["student"]["w"] == (POOLED[s], 128) and ad["crd"]["teacher"]["w"] == (POOLED[t], 128)
    if cfg.method.name == "fitnet":  # regressor: student stage2 channels → teacher stage2 channels
      assert ad["hint"]["conv"]["w"][-2:] == (STAGE2[s], STAGE2[t])
    if cfg.method.name in ("ab", "ft", "fsp"):
      assert r["stages"] == ("init", "main")


def test_fsp_on_wrn40_1_is_rejected_like_the_paper():
  """The CRD table has no FSP number for wrn_40_2 → wrn_40_1: the channel counts never match."""
  assert "wrn_40_2-wrn_40_1/fsp" not in EXP.CONFIGS
  with pytest.raises(ValueError, match="FSP needs matching channels"):
    EXP.check_config(EXP.make_config("wrn_40_2", "wrn_40_1", "fsp"))


def test_cell_and_teacher_selection_from_the_cli(tmp_path):
  cfg = cli.build_config(["cifar100_crd_table", "wrn_40_2-wrn_16_2/crd", "--workdir", str(tmp_path)])
  want = EXP.make_config("wrn_40_2", "wrn_16_2", "crd")
  assert cfg == want.replace(run=dataclasses.replace(want.run, workdir=str(tmp_path)))
  t = cli.build_config(["cifar100_crd_table", "wrn_40_2-wrn_16_2/crd"], mode="teacher")
  assert (t.mode, t.student.name, t.method.name, t.published) == ("teacher", "wrn_40_2", "ce", 75.61)
  assert cli.build_config(["cifar100_crd_table", "teachers/vgg13"], mode="teacher") == EXP.make_teacher("vgg13")
  with pytest.raises(cli.CliError, match="has no config 'wrn_40_2-wrn_16_2/nope'"):
    cli.build_config(["cifar100_crd_table", "wrn_40_2-wrn_16_2/nope"])


# ---------------------------------------------------------------- 2-step smoke runs on mock CIFAR-100


@pytest.fixture(scope="module")
def mock_teacher(tmp_path_factory):
  """A randomly initialised resnet8 exported as a teacher checkpoint."""
  d = tmp_path_factory.mktemp("teacher8")
  m = models.create("resnet8", num_classes=100, rngs=nnx.Rngs(0))
  _, params, stats, _ = nnx.split(m, nnx.Param, nnx.BatchStat, ...)
  ckpt.export_model(
    d / ckpt.EXPORT_DIR,
    model_name="resnet8",
    num_classes=100,
    dtype="float32",
    params=params,
    model_state=stats,
    extra={},
  )
  return str(d)


def _smoke_config(method: str, teacher_dir: str, data_dir: str, workdir: str):
  cfg = EXP.make_config("resnet8", "resnet8", method)
  two = method in EXP.TWO_STAGE
  # 16 mock examples / batch 8 = 2 steps per epoch: init_epochs 0.5 = 1 init-stage step, then 1 main step.
  return cfg.replace(
    data=dataclasses.replace(cfg.data, batch_size=8, eval_batch_size=8, data_dir=data_dir, download=True),
    teacher=dataclasses.replace(cfg.teacher, checkpoint=teacher_dir),
    method=dataclasses.replace(cfg.method, init_epochs=0.5 if two else 0.0),
    optim=dataclasses.replace(cfg.optim, steps=1 if two else 2, epochs=0.0),
    run=dataclasses.replace(cfg.run, workdir=workdir, quiet=True),
  )


# One method of each kind runs concretely at the table's shapes (logits, a hint with a regressor, a two-stage
# method, the memory bank); every method's config is traced at these shapes by test_every_pair_validates_abstractly
# and every preset trains through the jitted step in test_engine.
CONCRETE = ("kd", "fitnet", "ab", "crd+kd")


@pytest.mark.slow
@pytest.mark.parametrize("method", CONCRETE)
def test_one_method_of_each_kind_runs_two_steps_on_mock_cifar100(method, mock_teacher, tmp_path):
  cfg = _smoke_config(method, mock_teacher, str(tmp_path / "tfds"), str(tmp_path / "run"))
  with tfds.testing.mock_data(num_examples=16), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    run = engine.build(cfg)
  assert run.total_steps == 2 and run.init_steps == (1 if method in EXP.TWO_STAGE else 0)
  state = run.state
  p0 = [np.array(x, copy=True) for x in jax.tree.leaves(state.params)]  # the step donates the state
  m0 = [np.array(x, copy=True) for x in jax.tree.leaves(state.method_state)]
  seen = []
  it = iter(run.loader)
  method_ = run.distiller.spec.method
  for i in range(run.total_steps):
    stage = "init" if i < run.init_steps else "main"
    state, metrics = run.distiller.step(state, next(it), stage=stage)
    want = {f"loss/{t.name}" for t in method_.stage_terms(stage)} | {"loss/total"}
    got = {k for k in metrics if k.startswith("loss/")}
    assert got == want, (stage, got)
    assert all(np.isfinite(np.asarray(metrics[k])).all() for k in got), metrics
    seen.append(stage)
  assert int(state.step) == 2
  assert seen == (["init", "main"] if method in EXP.TWO_STAGE else ["main", "main"])
  p1 = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  assert any(not np.array_equal(a, b) for a, b in zip(p0, p1)), "student parameters did not change"
  if method in ("crd", "crd+kd"):  # the memory bank moved towards the batch embeddings
    m1 = [np.asarray(x) for x in jax.tree.leaves(state.method_state)]
    assert any(not np.array_equal(a, b) for a, b in zip(m0, m1))


# ---------------------------------------------------------------- a Hugging Face model on the user's data


def test_hf_distill_cells_differ_only_in_their_objective():
  hf = cli.load_experiment("hf_distill")
  cells = {name: make() for name, make in hf.CONFIGS.items()}
  assert {c.method.name for c in cells.values()} == {"forward_kl", "reverse_kl", "gkd"}
  assert hf.get_config() == cells["forward_kl"]
  for c in cells.values():
    assert (c.teacher.name, c.student.name, c.student.layer_stride, c.data.view) == ("hf", "hf", 2, "tokens")
    same = dict(c.__dict__, method=None, name=None, run=None)
    assert same == dict(cells["forward_kl"].__dict__, method=None, name=None, run=None)


def test_hmm_layer_map_cells_differ_only_in_their_layer_map():
  exp = cli.load_experiment("hmm_layer_map")
  cells = {name: make() for name, make in exp.CONFIGS.items()}
  assert exp.get_config() == cells["fkl"]
  assert {n: (c.method.terms, c.method.layer_map) for n, c in cells.items()} == {
    "fkl": ((), ()),
    "auto": (("hidden_cos=1",), ("auto",)),
    "uniform": (("hidden_cos=1",), ("uniform",)),
    "last": (("hidden_cos=1",), ("last",)),
  }
  for c in cells.values():
    assert (c.method.name, c.student.name, c.teacher.name, c.optim.steps) == ("forward_kl", "lm_2x32", "lm_4x64", 300)
    same = dict(c.__dict__, method=None, name=None, run=None)
    assert same == dict(cells["fkl"].__dict__, method=None, name=None, run=None)
    assert dataclasses.replace(c.method, terms=(), layer_map=()) == cells["fkl"].method


# ---------------------------------------------------------------- Hinton et al. 2015, MNIST


def test_mnist_hinton_configs():
  hin = cli.load_experiment("mnist_hinton")
  kd, scratch = hin.CONFIGS["kd"](), hin.CONFIGS["scratch"]()
  teacher = hin.teacher_config(kd)
  assert (kd.student.name, kd.teacher.name, kd.method.name, kd.method.temperature) == (
    "mlp_800",
    "mlp_1200",
    "kd",
    20.0,
  )
  assert (teacher.mode, teacher.student.name, teacher.data.view) == ("teacher", "mlp_1200", "jitter")
  assert (scratch.method.name, kd.data.view, kd.data.name) == ("ce", "none", "mnist")
  # 67 / 146 / 74 test errors of 10,000 (Hinton et al. 2015, §3).
  assert (teacher.published, scratch.published, kd.published) == (99.33, 98.54, 99.26)
  t = nnx.eval_shape(lambda: models.create("mlp_1200", rngs=nnx.Rngs(0)))
  assert (t.dropout.rate, t.input_dropout.rate) == (0.5, 0.2)
  assert nnx.eval_shape(lambda: models.create("mlp_800", rngs=nnx.Rngs(0))).dropout is None


def test_mnist_hinton_offline_is_one_line(tmp_path, capsys):
  rc = cli.main(
    ["train-teacher", "mnist_hinton", "--workdir", str(tmp_path / "t"), "--data.data_dir", str(tmp_path / "empty")]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and len(err) == 1, err
  assert "'mnist' is not prepared" in err[0] and "kdjax prepare mnist" in err[0] and "kdjax[tfds]" in err[0]


# ---------------------------------------------------------------- scripts/*.sh

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
# The scripts set up .venv unless KDJAX_PYTHON names an interpreter that has kdjax: this one.
SCRIPT_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "KDJAX_PYTHON": sys.executable}


def test_every_shell_script_parses():
  scripts = sorted(SCRIPTS.glob("*.sh"))
  assert {"_venv.sh", "demo.sh", "lm_experiment.sh", "reproduce_cifar100.sh"} <= {s.name for s in scripts}
  for script in scripts:
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, (script.name, p.stderr)


def test_venv_setup_uses_kdjax_python_and_installs_nothing(tmp_path):
  """With KDJAX_PYTHON set, scripts/_venv.sh only sets PY: no .venv is created and pip is not run."""
  (tmp_path / "scripts").mkdir()
  (tmp_path / "scripts" / "_venv.sh").write_bytes((SCRIPTS / "_venv.sh").read_bytes())
  env = {**SCRIPT_ENV, "PYTHON": str(tmp_path / "no-such-python")}  # would fail if a venv were made
  p = subprocess.run(
    ["bash", "-c", 'set -euo pipefail; source scripts/_venv.sh; echo "$PY"'],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == sys.executable and not (tmp_path / ".venv").exists()


def test_reproduce_script_parses_and_rejects_an_unknown_pair():
  """The full run (and --smoke) is for machines with time; here: syntax, and the pair list comes from the experiment."""
  script = SCRIPTS / "reproduce_cifar100.sh"
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  p = subprocess.run(
    ["bash", str(script), "--smoke", "--pairs", "resnet56-resnet8"],
    capture_output=True,
    text=True,
    timeout=120,
    env=SCRIPT_ENV,
  )
  assert p.returncode == 1
  want = " ".join(f"{t}-{s}" for t, s in EXP.PAIRS)
  assert p.stderr.strip().splitlines()[-1] == f"reproduce_cifar100.sh: unknown pair resnet56-resnet8; pairs: {want}"
