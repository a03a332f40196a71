"""Teacher placement: colocated, tensor-parallel (sharded) and split sub-meshes give the same training.

The runs happen in subprocesses (8 forced CPU devices; two ``jax.distributed`` processes of two devices
each), launched together once per test session; the tests read their results.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path

import jax
import numpy as np
import pytest

import _procs as P
import kdjax
from kdjax.config import Experiment, MethodConfig
from kdjax.parallel import placement as placement_lib

STEPS = 20


def _make(d: Path) -> None:
  P.run_together(
    ["_placement_devices.py", d / "devices.pkl"],
    *P.two_processes("_placement_multihost.py", d / "multihost.pkl"),
    timeout=600,
  )


@pytest.fixture(scope="module")
def runs(made_once):
  d = made_once("placement", _make)
  with open(d / "devices.pkl", "rb") as fh:
    dev = pickle.load(fh)
  with open(d / "multihost.pkl", "rb") as fh:
    mh = pickle.load(fh)
  return dev, mh


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same(a, b, atol: float, exact: bool = False) -> None:
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    if exact:
      assert fa[k].tobytes() == fb[k].tobytes(), k
    else:
      np.testing.assert_allclose(fb[k], fa[k], rtol=0, atol=atol, err_msg=k)


# Where the teacher's forward runs in another program (split) or with its matmuls split over devices
# (sharded), its outputs differ from the colocated ones by float32 reduction order (~1e-7 relative);
# 20 optimizer steps carry that to at most a few 1e-7 in the student's parameters.
DIGITS_ATOL = 2e-6


@pytest.mark.procs
def test_placements_train_the_same_student(runs):
  dig = runs[0]["digits"]
  ref = dig["colocated"]
  assert int(ref["state"].step) == STEPS
  assert ref["metrics"][-1]["loss/kd"] != ref["metrics"][0]["loss/kd"]  # it trained
  sizes = {k: (v["teacher_devices"], v["student_devices"]) for k, v in dig.items()}
  assert sizes == {"colocated": (8, 8), "sharded": (8, 8), "split26": (2, 6), "split44": (4, 4), "pinned": (8, 8)}
  for name in ("sharded", "split26", "split44", "pinned"):
    assert_same(ref["state"], dig[name]["state"], DIGITS_ATOL)
    for mr, mo in zip(ref["metrics"], dig[name]["metrics"], strict=True):
      for k in mr:
        np.testing.assert_allclose(mo[k], mr[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
    for k, v in ref["eval"].items():  # evaluation reads the teacher where it lives
      np.testing.assert_allclose(dig[name]["eval"][k], v, rtol=1e-5, atol=1e-6, err_msg=f"{name} eval {k}")


@pytest.mark.procs
def test_language_model_teacher_sharded_and_split(runs):
  lm = runs[0]["lm"]
  ref = lm["colocated"]
  assert ref["metrics"][-1]["loss/kd"] < ref["metrics"][0]["loss/kd"]
  for name in ("sharded", "split_sharded"):  # plain SGD: no Adam 1/√v blow-up of rounding in tiny gradients
    assert_same(ref["state"], lm[name]["state"], 1e-5)


@pytest.mark.procs
def test_sharded_teacher_bytes_per_device(runs):
  for task, name, model in (("lm", "sharded", 4), ("lm", "split_sharded", 2), ("digits", "sharded", 2)):
    r = runs[0][task][name]
    split = [("model" in spec, shape, size) for spec, (shape, size) in zip(r["teacher_specs"], r["teacher_shapes"])]
    whole = sum(int(np.prod(s)) * b for is_split, s, b in split if not is_split)
    parted = sum(int(np.prod(s)) * b for is_split, s, b in split if is_split)
    assert r["teacher_bytes"]["total"] == whole + parted
    assert r["teacher_bytes"]["max_per_device"] == whole + parted // model, (task, name)
    if task == "lm":  # every big layer is split: what stays whole is norms, biases, positions
      assert whole < 0.03 * r["teacher_bytes"]["total"], whole
  assert (
    runs[0]["lm"]["colocated"]["teacher_bytes"]["max_per_device"]
    == runs[0]["lm"]["colocated"]["teacher_bytes"]["total"]
  )


@pytest.mark.procs
def test_split_dispatches_the_next_teacher_forward_before_awaiting_the_student(runs):
  events = runs[0]["order"]["events"]
  n = sum(1 for e in events if e[0] == "student")
  assert n == 6
  at = {e: i for i, e in enumerate(events)}
  for t in range(n):
    assert at[("teacher", t)] < at[("student", t)]
    if t + 1 < n:
      assert at[("teacher", t + 1)] < at[("await", t)], events
  assert ("teacher", n) not in at  # nothing is computed past the last step
  assert runs[0]["order"]["guard"] == ["refused"] * n  # implicit transfers refused while dispatching


@pytest.mark.procs
def test_checkpoints_restore_across_placements(runs):
  dev = runs[0]
  for key, v in dev["checkpoints"].items():
    assert v["restored_step"] == 10
    src, dst = key.split("->")
    if src == dst:  # resuming under the same placement is bit for bit
      assert_same(dev["digits"][dst]["state"], v["state"], 0, exact=True)
    else:
      assert_same(dev["digits"]["colocated"]["state"], v["state"], DIGITS_ATOL)


@pytest.mark.procs
def test_two_processes_split_equal_one_process(runs):
  dev, mh = runs
  assert mh["local_rows"] == 12
  assert mh["teacher_devices"] == [0, 1] and mh["student_devices"] == [0, 1]  # each process feeds both sub-meshes
  assert_same(dev["split22"]["state"], mh["state"], 1e-6)


@pytest.mark.procs
def test_bad_placements_fail_with_one_line(runs):
  errs = runs[0]["errors"]
  expect = {
    "teacher_devices_8": ("placement.teacher_devices=8", "use 1 to 7"),
    "batch_rows": ("batch rows=8", "teacher's 3", "teacher_devices=3 of 8"),
    "model_layer": ("placement.model=3", "conv3.kernel"),
    "model_devices": ("placement.model=3", "device count 8"),
  }
  for name, words in expect.items():
    assert errs[name] is not None and "\n" not in errs[name], (name, errs[name])
    for w in words:
      assert w in errs[name], (name, errs[name])


@pytest.mark.parametrize(
  "kw, words",
  [
    ({"teacher_devices": -1}, "placement.teacher_devices must be ≥ 0"),
    ({"model": 0}, "placement.model must be ≥ 1"),
    ({"teacher_devices": 3, "model": 2}, "a divisor of placement.teacher_devices=3"),
    ({"teacher_memory": "disk"}, "placement.teacher_memory must be one of"),
  ],
)
def test_placement_fields_are_checked(kw, words):
  with pytest.raises(ValueError, match=words):
    kdjax.Placement(**kw)


def test_placement_kind_follows_its_fields():
  assert kdjax.Placement().kind == "colocated"
  assert kdjax.Placement(model=4).kind == "sharded"
  assert kdjax.Placement(teacher_devices=4, model=2).kind == "split"


def test_experiment_rejects_placements_without_a_teacher_model():
  split = kdjax.Placement(teacher_devices=1)
  with pytest.raises(ValueError, match="placement: places a teacher model; mode='teacher'"):
    Experiment(mode="teacher", placement=split)
  with pytest.raises(ValueError, match="placement.teacher_devices: the teacher runs ahead"):
    Experiment(
      mode="offline",
      placement=split,
      method=MethodConfig(name="reverse_kl"),
      responses=kdjax.ResponseConfig(student_fraction=1.0),
    )


def test_pinned_host_memory_missing_is_one_line():
  memories = [types.SimpleNamespace(kind="device")]
  device = types.SimpleNamespace(addressable_memories=lambda: memories, platform="tpu")
  mesh = types.SimpleNamespace(devices=np.array([device], object))
  with pytest.raises(ValueError, match=r"teacher_memory='pinned_host' is not supported on this backend \(tpu"):
    placement_lib.check_memory_kind(mesh, "pinned_host")


# ---------------------------------------------------------------------------
# The cost model


def _work(**kw):
  from kdjax.parallel import cost as placement_cost

  base = dict(
    teacher_flops=6e9, student_flops=2e9, teacher_bytes=8e9, student_bytes=1e9, output_bytes=4e8, tp_bytes=2e8
  )
  return placement_cost.Workload(**{**base, **kw})


def _rates(**kw):
  from kdjax.parallel import cost as placement_cost

  base = dict(teacher_flops_per_s=1e9, student_flops_per_s=5e8, parallelism=8, link_bytes_per_s=1e9)
  return placement_cost.Rates(**{**base, **kw})


def test_cost_model_formulas_by_hand():
  from kdjax.parallel import cost as placement_cost

  w, r = _work(), _rates()
  t_teacher, t_student = 6.0, 4.0  # seconds on one device
  colo = placement_cost.predict(w, r, 8)
  assert colo.placement == "colocated" and colo.step_seconds == pytest.approx((t_teacher + t_student) / 8)
  assert (colo.teacher_bytes_per_device, colo.student_bytes_per_device) == (8e9, 1e9)
  sh = placement_cost.predict(w, r, 8, model=4)
  assert sh.step_seconds == pytest.approx(10 / 8 + 2e8 * 2 * 3 / (8 * 1e9)) and sh.teacher_bytes_per_device == 2e9
  sp = placement_cost.predict(
    w, r, 8, teacher_devices=6
  )  # teacher stage 6/6 = 1 s, student stage 4/2 = 2 s: the student binds
  assert sp.step_seconds == pytest.approx(max(1.0, 2.0, 10 / 8) + 4e8 / 2 / 1e9)
  # Devices that share one CPU: nothing runs side by side, every placement costs the whole work.
  shared = _rates(parallelism=1.0)
  assert placement_cost.predict(w, shared, 8, teacher_devices=6).step_seconds == pytest.approx(10.0 + 4e8 / 2 / 1e9)


def test_cost_model_recommends_what_fits_then_what_is_fastest():
  from kdjax.parallel import cost as placement_cost

  w = _work(output_bytes=0.0, tp_bytes=0.0)
  best, preds = placement_cost.recommend(w, _rates(), 8)
  assert best.placement == "colocated"  # with ideal devices, nothing beats all devices doing everything
  assert (
    len(preds)
    == len(placement_cost.candidates(8))
    == 4 + sum(len([d for d in range(1, k + 1) if k % d == 0]) for k in range(1, 8))
  )
  # 8 GB teacher + 1 GB student on 4 GB devices: the teacher must be split at least 4 ways (8/4 + 1 ≤ 4 colocated,
  # or 8/2 = 4 on teacher devices of a split).
  best, preds = placement_cost.recommend(w, _rates(device_memory=4e9), 8)
  fitting = [p for p in preds if p.fits]
  assert best.fits and best == min(fitting, key=lambda p: (p.step_seconds, p.teacher_devices, p.model))
  assert not placement_cost.predict(w, _rates(device_memory=4e9), 8).fits and best.model >= 2
  assert all(not p.fits for p in preds if p.teacher_devices == 0 and p.model < 4)
