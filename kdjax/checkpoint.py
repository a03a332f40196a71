"""Orbax checkpoints that make every run resumable, bit for bit.

One checkpoint item per step, written by ``orbax.checkpoint.CheckpointManager``
(async, ``max_to_keep``, atomic: Orbax writes into a temporary directory and
renames it only when complete, so a half-written save is never "latest"):

* ``state`` — the whole :class:`~kdjax.engine.state.TrainState` (student
  params, BN stats, optimizer state, adapters, method state such as the CRD
  bank, step, RNG key), restored onto the *current* mesh's shardings;
* ``meta`` — JSON: data-iterator position, elapsed seconds, best accuracy so
  far, the steps this run resumed from, the mesh that saved it, the full
  config, its hash, the teacher hash, library versions
  (:func:`library_versions`) and the git commit (:func:`git_commit`).

A run that restarts restores the newest checkpoint that reads back; one that
does not (truncated, corrupt) is moved to ``checkpoints_corrupt/`` with a
warning naming it (:meth:`Checkpointer.restore_latest`). A leftover of a save
cut short by SIGKILL is a temporary directory, never a step, and is removed.
:func:`read_checkpoint` reads any checkpoint as NumPy, whatever mesh saved it.

The trained model is also *exported* as one standalone msgpack file
(``export/model.msgpack`` + ``export/model.json``; see :mod:`kdjax.export`);
teachers are loaded from exports, and their content hash (:func:`file_hash`)
is the first 16 hex digits of the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, serialization

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
EXPORT_PARAMS = "model.msgpack"
EXPORT_META = "model.json"


def pure_dict(state: nnx.State) -> dict:
  """``nnx.State`` → nested plain dict of arrays (works across Flax versions)."""
  return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def batch_stats(rest: Any) -> Any:
  """The ``nnx.BatchStat`` entries of a model's non-param state (what inference needs)."""
  if not isinstance(rest, nnx.State):
    return rest
  return nnx.filter_state(rest, nnx.BatchStat) if hasattr(nnx, "filter_state") else rest.filter(nnx.BatchStat)


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
  """Typed PRNG keys → raw uint32 data (Orbax stores plain arrays)."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct) and _is_key(x):
      shape = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=x.sharding)
    return jax.random.key_data(x) if _is_key(x) else x
  return jax.tree.map(one, tree)


def _key_impl(ref):
  if isinstance(ref, jax.ShapeDtypeStruct):  # an abstract key: its dtype knows the implementation
    return ref.dtype._impl  # noqa: SLF001 - no public accessor for abstract keys
  return jax.random.key_impl(ref)


def data_to_keys(tree: Any, like: Any) -> Any:
  """Inverse of :func:`keys_to_data` using ``like`` (arrays or abstract) to know which were keys."""
  return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x, impl=_key_impl(ref)) if _is_key(ref) else x,
                      tree, like)


def library_versions() -> dict[str, str]:
  import flax
  import optax

  import kdjax

  return {"kdjax": kdjax.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax": getattr(ocp, "__version__", "unknown")}


def git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                         text=True, timeout=5)
    return out.stdout.strip() or None
  except Exception:  # noqa: BLE001 - not a git checkout, no git binary …
    return None


class Checkpointer:
  """Save/restore ``TrainState`` + JSON metadata under ``directory``."""

  def __init__(self, directory: str | Path, *, save_every: int = 0, max_to_keep: int = 2, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=max(save_every, 1),
        enable_async_checkpointing=async_save,
        create=True,
        # Saves cut short (SIGKILL while an async save was in flight) leave a
        # ``<step>.orbax-checkpoint-tmp-*`` directory that is never a step;
        # remove such leftovers when the run restarts.
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    self._saved: set[int] = set(self.manager.all_steps())
    self._closed = False

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Start an async save of ``state`` + ``meta`` at ``step``.

    Without ``force`` only every ``save_every`` steps. A step already saved
    (or being saved) is skipped. The device→host copy happens before this
    returns, so ``state`` may be donated to the next step right away.
    Returns whether a save was started.
    """
    if step in self._saved:
      return False
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    started = self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(keys_to_data(state)), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    if started:
      self._saved.add(step)
    return started

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restore the newest *good* checkpoint onto ``abstract_state``'s shardings.

    A checkpoint that fails to restore (truncated or corrupt files) is moved
    aside to ``<directory>_corrupt/<step>`` with a warning naming it, and the
    previous one is tried.
    """
    target = keys_to_data(abstract_state)
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        if not isinstance(restored["meta"], dict) or not restored["meta"]:
          raise ValueError("its metadata is empty")
      except Exception as e:  # noqa: BLE001 - a restore that fails in any way means "not usable"
        aside = self.directory.parent / f"{self.directory.name}_corrupt" / str(step)
        n = 1
        while aside.exists():  # never overwrite an earlier one
          aside, n = aside.with_name(f"{step}.{n}"), n + 1
        msg = (f"checkpoint {self.directory / str(step)} is unreadable ({type(e).__name__}: "
               f"{str(e).splitlines()[0][:200] if str(e) else ''}); moved it to {aside} and trying the previous one")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        if jax.process_index() == 0:
          aside.parent.mkdir(parents=True, exist_ok=True)
          shutil.move(str(self.directory / str(step)), str(aside))
        self._saved.discard(step)
        self.manager.reload()
        continue
      # Outside the try: a bug here must surface, not get a good checkpoint moved aside.
      state = data_to_keys(restored["state"], abstract_state)
      _check_same_structure(state, abstract_state)
      return step, state, dict(restored["meta"])
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Wait for saves in flight, then release the manager (idempotent)."""
    if self._closed:
      return
    self._closed = True
    self.manager.wait_until_finished()
    self.manager.close()


def read_checkpoint(directory: str | Path, step: int | None = None) -> tuple[int, dict, dict]:
  """``(step, state, meta)`` of a saved checkpoint (default: the latest).

  ``state`` is the saved :class:`~kdjax.engine.state.TrainState` as a nested
  dict of host NumPy arrays (PRNG keys as raw ``uint32`` data), restored
  without a target: for inspection, tools and tests, not for resuming.
  """
  directory = Path(directory).absolute()
  if not directory.is_dir():
    raise ValueError(f"no checkpoint directory {str(directory)!r}")
  mgr = ocp.CheckpointManager(directory, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                       "meta": ocp.JsonCheckpointHandler()},
                              options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False))
  try:
    steps = sorted(mgr.all_steps())
    if not steps or (step is not None and step not in steps):
      raise ValueError(f"{str(directory)!r} has no checkpoint {'' if step is None else f'at step {step} '}"
                       f"(steps: {steps})")
    step = steps[-1] if step is None else step
    # A target on one local device: readable whatever mesh saved it.
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                          mgr.item_metadata(step)["state"], is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  finally:
    mgr.close()
  return step, jax.tree.map(np.asarray, r["state"]), dict(r["meta"])


def _check_same_structure(state, abstract) -> None:
  a, b = jax.tree.structure(state), jax.tree.structure(abstract)
  if a != b:
    raise ValueError(f"restored tree structure differs from the target: {a} vs {b}")


# ----------------------------------------------------------------------------
# Export: a standalone params file + model description.


def export_model(directory: str | Path, *, model_name: str, num_classes: int, dtype: str, params: Any,
                 model_state: Any, extra: dict | None = None) -> Path:
  """Write ``model.msgpack`` (params + BN stats) and ``model.json`` atomically.

  ``model_state`` should hold only what inference needs (``nnx.BatchStat``);
  RNG streams are not part of a trained model.

  Returns the msgpack path. Every process must call it (arrays split across
  processes are gathered with a collective); only process 0 writes.
  """
  directory = Path(directory)
  path = directory / EXPORT_PARAMS
  from jax.experimental import multihost_utils

  def host(tree):
    tree = pure_dict(tree) if isinstance(tree, nnx.State) else tree
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        if jax.process_count() > 1 else np.asarray(x), keys_to_data(tree))

  payload = {"params": host(params), "model_state": host(model_state)}
  if jax.process_index() != 0:
    return path
  directory.mkdir(parents=True, exist_ok=True)
  blob = serialization.msgpack_serialize(payload)
  tmp = path.with_suffix(".tmp")
  tmp.write_bytes(blob)
  os.replace(tmp, path)
  meta = {"model": model_name, "num_classes": num_classes, "dtype": dtype, **(extra or {})}
  meta_tmp = directory / (EXPORT_META + ".tmp")
  meta_tmp.write_text(json.dumps(meta, indent=2))
  os.replace(meta_tmp, directory / EXPORT_META)
  return path


def resolve_export(path: str | Path, what: str = "teacher checkpoint") -> Path:
  """A run workdir, an export dir or a ``.msgpack`` file → the msgpack path."""
  p = Path(path)
  for cand in (p, p / EXPORT_PARAMS, p / EXPORT_DIR / EXPORT_PARAMS):
    if cand.is_file():
      return cand
  if (p / "checkpoints").is_dir():
    why = "its run has checkpoints but did not finish; re-run its command to resume and export it"
  elif p.exists():
    why = f"it holds no {EXPORT_DIR}/{EXPORT_PARAMS}"
  else:
    why = "no such file or directory"
  fix = ("train one with `kdjax train-teacher EXPERIMENT --workdir DIR` and pass --teacher.checkpoint DIR"
         if what.startswith("teacher") else "pass the workdir of a finished run")
  raise ValueError(f"{what} {str(p)!r} not found ({why}); {fix}")


def file_hash(path: str | Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()[:16]


def load_export(path: str | Path, what: str = "teacher checkpoint") -> tuple[dict, dict, str]:
  """``(meta, payload, hash)`` of an exported model; ``what`` names it in errors."""
  msgpack = resolve_export(path, what)
  meta_path = msgpack.parent / EXPORT_META
  try:
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    payload = serialization.msgpack_restore(msgpack.read_bytes())
    if not isinstance(payload, dict) or "params" not in payload:
      raise TypeError("no 'params' entry")
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{what} {str(msgpack)!r} is corrupt or not a kdjax export ({type(e).__name__}); "
                     f"re-export it from its run's workdir") from None
  return meta, payload, file_hash(msgpack)


def fill_model(model: nnx.Module, payload: dict) -> nnx.Module:
  """Load exported params/BN stats into a freshly created model (in place)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  p_dict = pure_dict(params)
  _check_same_shapes(payload["params"], p_dict, "params")
  nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, payload["params"]))
  r_dict = pure_dict(rest)
  saved = payload.get("model_state", {})
  merged = _merge_known(r_dict, saved)
  nnx.replace_by_pure_dict(rest, merged)
  nnx.update(model, params, rest)
  return model


def _merge_known(target: Any, saved: Any) -> Any:
  if isinstance(target, dict):
    return {k: (_merge_known(v, saved[k]) if isinstance(saved, dict) and k in saved else v) for k, v in target.items()}
  if isinstance(saved, np.ndarray) and not _is_key(target):
    return jnp.asarray(saved, dtype=target.dtype)
  return target


def _check_same_shapes(saved: Any, target: Any, what: str) -> None:
  s = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(saved)}
  t = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(target)}
  if s != t:
    missing = sorted(set(t) - set(s))[:3]
    wrong = [k for k in t if k in s and s[k] != t[k]][:3]
    raise ValueError(f"checkpoint {what} do not fit the model: missing {missing}, shape mismatch {wrong}")
