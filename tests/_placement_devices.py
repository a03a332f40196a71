"""Subprocess for test_placement: the same 20 steps with the teacher colocated, tensor-parallel
(``sharded``) and on its own sub-mesh (``split``), on 8 forced CPU devices, through ``kdjax.train``.

Usage: python tests/_placement_devices.py OUT.pkl   (sets the 8-device flag itself)
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pickle  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _engine_setup as E  # noqa: E402
import kdjax  # noqa: E402
from kdjax import checkpoint as ckpt  # noqa: E402
from kdjax.parallel import sharding  # noqa: E402

STEPS = 20
ROWS = 24  # divides 8 devices, and both sub-meshes of 2 + 6 and 4 + 4
LM_TEACHER = ("transformer_lm", {"num_layers": 1, "dim": 128, "num_heads": 4, "max_len": 8})
VOCAB = 256  # big enough that the embedding and the head are split too

PLACEMENTS = {
  "colocated": kdjax.Placement(),
  "sharded": kdjax.Placement(model=2),
  "split26": kdjax.Placement(teacher_devices=2),
  "split44": kdjax.Placement(teacher_devices=4),
  "pinned": kdjax.Placement(teacher_memory="pinned_host"),
}
LM_PLACEMENTS = {
  "colocated": kdjax.Placement(),
  "sharded": kdjax.Placement(model=4),
  "split_sharded": kdjax.Placement(teacher_devices=4, model=2),
}


_BUILT: dict = {}


def digits(placement, mesh=None):
  """The CRD+KD problem under ``placement``, built (and compiled) once per placement on the default mesh."""
  if mesh is not None:
    return E.setup("crd+kd", placement=placement, batch_rows=ROWS, mesh=mesh)
  if placement not in _BUILT:
    _BUILT[placement] = E.setup("crd+kd", placement=placement, batch_rows=ROWS)
  return _BUILT[placement]


def lm(placement):
  # SGD: Adam's g/√v would blow the float32 rounding of near-zero gradient entries up to the step size.
  return E.setup(
    "kd",
    student=E.LM,
    teachers=(LM_TEACHER,),
    num_classes=VOCAB,
    placement=placement,
    batch_rows=ROWS,
    tx=optax.sgd(0.5),
  )


def runs(make, placements, batches) -> dict:
  out = {}
  for name, p in placements.items():
    s = make(p)
    state, metrics = E.train(s, E.cycle(batches), STEPS, state=s.fresh())
    out[name] = {
      "state": E.host(state),
      "metrics": metrics,
      "teacher_bytes": s.distiller.teacher_param_bytes(),
      "teacher_specs": [tuple(x.sharding.spec) for x in jax.tree.leaves(s.distiller.teacher_state)],
      "teacher_shapes": [(x.shape, x.dtype.itemsize) for x in jax.tree.leaves(s.distiller.teacher_state)],
      "student_devices": s.distiller.mesh.size,
      "teacher_devices": s.distiller.teacher_mesh.size,
      "eval": s.distiller.evaluate(state, batches[:2]),
    }
  return out


def dispatch_order(batches) -> dict:
  """Instrument a split run: when each teacher forward is dispatched, each student step dispatched and
  each step's metrics awaited; and whether an implicit transfer inside the step dispatch is refused."""
  s = digits(PLACEMENTS["split26"])
  d, events, guard = s.distiller, [], []
  ids = {id(b): i for i, b in enumerate(batches)}
  teacher_outputs, step = d.teacher_outputs, d.step

  def traced_teacher(batch, **kw):
    events.append(("teacher", ids[id(batch)]))
    return teacher_outputs(batch, **kw)

  def traced_step(state, batch, **kw):
    try:  # an implicit host-to-device transfer: refused while the loop dispatches
      state.step + np.ones((), np.int32)
      guard.append("allowed")
    except Exception:  # noqa: BLE001 - jax raises a plain RuntimeError/XlaRuntimeError
      guard.append("refused")
    events.append(("student", ids[id(batch)]))
    return step(state, batch, **kw)

  class Await(kdjax.hooks.Hook):
    def after_step(self, progress):
      jax.block_until_ready(progress.metrics)
      events.append(("await", progress.step - 1))

  d.teacher_outputs, d.step = traced_teacher, traced_step
  try:
    kdjax.train(d, s.fresh(), iter(batches), steps=len(batches), hooks=[Await()])
  finally:
    del d.teacher_outputs, d.step  # the class's own methods again: the next user of this Distiller is not traced
  return {"events": events, "guard": guard}


def checkpoints(batches) -> dict:
  """10 steps under one placement, saved; restored under another and continued for 10; vs 20 straight."""
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for src, dst in (("split26", "sharded"), ("colocated", "split26"), ("split44", "split44"), ("sharded", "sharded")):
      s = digits(PLACEMENTS[src])
      state, _ = E.train(s, E.cycle(batches), 10, state=s.fresh())
      c = ckpt.Checkpointer(f"{tmp}/{src}-{dst}", save_every=0, max_to_keep=1)
      c.save(10, state, {"step": 10}, force=True)
      c.close()
      t = digits(PLACEMENTS[dst])
      c = ckpt.Checkpointer(f"{tmp}/{src}-{dst}", save_every=0, max_to_keep=1)
      step, restored, _ = c.restore_latest(t.distiller.abstract_state, lambda step, meta: None)
      c.close()
      state, _ = E.train(t, E.cycle(batches, 10), 20, state=restored)
      out[f"{src}->{dst}"] = {"state": E.host(state), "restored_step": step}
  return out


def _step_on(s, batch):
  return s.distiller.step(s.state, batch)


def errors() -> dict:
  """One-line messages of bad placements."""
  cases = {
    "teacher_devices_8": lambda: digits(kdjax.Placement(teacher_devices=8)),
    "batch_rows": lambda: _step_on(E.setup("kd", placement=kdjax.Placement(teacher_devices=3)), E.digits_batch(0, 8)),
    "model_layer": lambda: digits(
      kdjax.Placement(model=3), mesh=sharding.make_mesh(devices=jax.devices()[:6], model=3)
    ),
    "model_devices": lambda: digits(kdjax.Placement(model=3)),
  }
  out = {}
  for name, make in cases.items():
    try:
      make()
      out[name] = None
    except ValueError as e:
      out[name] = str(e)
  return out


def main(out_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  dig = [E.digits_batch(i, batch=ROWS) for i in range(4)]
  toks = [E.token_batch(i, batch=ROWS, vocab=VOCAB) for i in range(4)]
  res = {
    "digits": runs(digits, PLACEMENTS, dig),
    "lm": runs(lm, LM_PLACEMENTS, toks),
    "order": dispatch_order(dig[:4] + [E.digits_batch(i, batch=ROWS) for i in range(4, 6)]),
    "checkpoints": checkpoints(dig),
    "errors": errors(),
  }
  four = sharding.make_mesh(devices=jax.devices()[:4])  # the device count of the two-process run
  s = digits(kdjax.Placement(teacher_devices=2), mesh=four)
  state, metrics = E.train(s, E.cycle(dig), STEPS)
  res["split22"] = {"state": E.host(state), "metrics": metrics}
  with open(out_path, "wb") as fh:
    pickle.dump(res, fh)


if __name__ == "__main__":
  main(sys.argv[1])
