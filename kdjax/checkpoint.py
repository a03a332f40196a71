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

Every save records a digest of each array's exact bits (:func:`fingerprint`,
in ``meta``). A run that restarts restores the newest checkpoint that
verifies, and classifies what stops one by its cause
(:meth:`Checkpointer.restore_latest`): damage — metadata or array structure
missing or unreadable, arrays that cannot be read or do not match their
digest (a flipped bit, overwritten bytes) — moves it to
``checkpoints_corrupt/`` with one warning and the previous one is tried; one
that reads fine but comes from another configuration or state layout, one
this process has no permission to read (:func:`check_access`), and one saved
without a digest (unless the caller allows unverified checkpoints) are
refused, and nothing is moved. A full disk is one :class:`DiskFull` error.
A leftover of a save cut short by SIGKILL is a temporary directory, never a
step, and is removed.
:func:`read_checkpoint` reads any checkpoint as NumPy, whatever mesh saved it.

The trained model is also *exported* as one standalone msgpack file
(``export/model.msgpack`` + ``export/model.json``; see :mod:`kdjax.export`);
teachers are loaded from exports, and their content hash (:func:`file_hash`)
is the first 16 hex digits of the file's SHA-256.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, serialization

from kdjax.errors import ConfigError

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
  return jax.tree.map(
    lambda x, ref: jax.random.wrap_key_data(x, impl=_key_impl(ref)) if _is_key(ref) else x, tree, like
  )


def library_versions() -> dict[str, str]:
  import flax
  import optax

  from kdjax._version import __version__

  return {
    "kdjax": __version__,
    "jax": jax.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "orbax": getattr(ocp, "__version__", "unknown"),
  }


def git_commit() -> str | None:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
    )
    return out.stdout.strip() or None
  except Exception:  # noqa: BLE001 - not a git checkout, no git binary …
    return None


# ----------------------------------------------------------------------------
# Integrity: a digest of every saved array, checked on restore.

_GOLDEN, _M1, _M2 = 0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35


def _words(x: jax.Array) -> jax.Array:
  """The exact bits of ``x`` as a flat ``uint32`` vector (sub-word types zero-extended)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).ravel()
  size = x.dtype.itemsize
  if size < 4:
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32).ravel()
  return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()  # 8-byte types: two words each


def _fmix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of ``uint32`` with full avalanche."""
  h = (h ^ (h >> 16)) * jnp.uint32(_M1)
  h = (h ^ (h >> 13)) * jnp.uint32(_M2)
  return h ^ (h >> 16)


@jax.jit
def _digest_words(leaves: list[jax.Array]) -> list[jax.Array]:
  out = []
  for x in leaves:
    w = _words(x)
    i = jnp.arange(w.size, dtype=jnp.uint32)
    # Two lanes, each a sum (mod 2^32, so any reduction order and any sharding
    # give the same value) of a bijection of word i: changing one word always
    # changes both lanes; several changes cancel with probability ~2^-64.
    a = jnp.sum(_fmix(w ^ (i * jnp.uint32(_GOLDEN))), dtype=jnp.uint32)
    b = jnp.sum(_fmix((w + i * jnp.uint32(_M2)) ^ jnp.uint32(_M1)), dtype=jnp.uint32)
    out.append(jnp.stack([a, b]))
  return out


def fingerprint(tree: Any) -> dict[str, str]:
  """``{path: 16 hex digits}``: a digest of the exact bits of every array in ``tree``.

  Computed where the arrays live (one jitted pass, no host copy), so it is
  the same for one device, a mesh or several hosts, and equal to a digest of
  the bytes a checkpoint writes for that array. PRNG keys are digested as
  their raw data.
  """
  flat = jax.tree_util.tree_flatten_with_path(keys_to_data(tree))[0]
  arrays = [jnp.asarray(x) for _, x in flat]
  sums = _digest_words(arrays)
  host = [np.asarray(d.addressable_data(0)) if isinstance(d, jax.Array) else np.asarray(d) for d in sums]
  return {jax.tree_util.keystr(k): f"{int(h[0]):08x}{int(h[1]):08x}" for (k, _), h in zip(flat, host)}


def _path_parts(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _layout(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  """``{path: (shape, dtype)}`` of arrays, array metadata or abstract arrays."""
  is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
  return {
    _path_parts(p): (tuple(x.shape), str(np.dtype(x.dtype)))
    for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  }


def layout_difference(saved: Any, target: Any) -> str | None:
  """None when ``saved`` (checkpoint metadata) has ``target``'s arrays, shapes and dtypes; else in words."""
  s, t = _layout(saved), _layout(ocp.tree.serialize_tree(target, keep_empty_nodes=True))
  if s == t:
    return None
  name = lambda p: "/".join(p)  # noqa: E731
  missing, extra = sorted(set(t) - set(s)), sorted(set(s) - set(t))
  shapes = [p for p in t if p in s and s[p] != t[p]]
  parts = (
    ([f"{len(missing)} arrays missing (e.g. {name(missing[0])})"] if missing else [])
    + ([f"{len(extra)} unexpected (e.g. {name(extra[0])})"] if extra else [])
    + (
      [f"{len(shapes)} of another shape or dtype (e.g. {name(shapes[0])}: saved {s[shapes[0]]}, now {t[shapes[0]]})"]
      if shapes
      else []
    )
  )
  return "; ".join(parts)


class Checkpointer:
  """Save/restore ``TrainState`` + JSON metadata under ``directory``.

  Every save records :func:`fingerprint` of the state in the metadata
  (``meta["digest"]``); :meth:`restore_latest` checks it.
  """

  def __init__(self, directory: str | Path, *, save_every: int = 0, max_to_keep: int = 2, async_save: bool = True):
    self.directory = Path(directory).absolute()
    check_access(self.directory)
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
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
    self._saved: set[int] = set(self.manager.all_steps())
    self._closed = False

  @property
  def corrupt_directory(self) -> Path:
    """Where checkpoints that failed verification are moved (never deleted)."""
    return self.directory.parent / f"{self.directory.name}_corrupt"

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Start an async save of ``state`` + ``meta`` (+ the state's digest) at ``step``.

    Without ``force`` only every ``save_every`` steps. A step already saved
    (or being saved) is skipped. The device→host copy happens before this
    returns, so ``state`` may be donated to the next step right away.
    Returns whether a save was started.

    Raises:
      DiskFull: the device holding ``directory`` has no space left (this or
        the previous async save failed); earlier checkpoints stay usable.
    """
    if step in self._saved:
      return False
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    meta = {**meta, "digest": fingerprint(state)}
    with _disk_full_as_error(self.manager, self.directory):
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

  def restore_latest(
    self,
    abstract_state: Any,
    check_meta: Callable[[int, dict], None] | None = None,
    *,
    allow_unverified: bool = False,
  ) -> tuple[int, Any, dict] | None:
    """Restore the newest checkpoint that verifies, onto ``abstract_state``'s shardings.

    A failure is classified by its cause, newest checkpoint first:

    * **damage** — its metadata or array structure (``state/_METADATA``) is
      missing or unreadable, its arrays cannot be read, or they differ from
      the digest saved with them: it is moved to :attr:`corrupt_directory`
      with one warning, and the previous checkpoint is tried;
    * **another configuration** — it reads fine but ``check_meta(step,
      meta)`` objects, or its array layout differs from ``abstract_state``:
      ``ConfigError``, nothing is moved;
    * **no permission** to read it: ``ConfigError`` naming the path and the
      fix, nothing is moved;
    * **unverifiable** — saved without a digest: ``ConfigError`` unless
      ``allow_unverified`` (then it is only checked for non-finite values).

    Returns ``(step, state, meta)``, or None when no checkpoint verified.
    """
    target = keys_to_data(abstract_state)
    for step in reversed(self.all_steps()):
      meta, saved_layout = self._read_meta(step)
      if meta is None:
        continue
      if check_meta is not None:
        check_meta(step, meta)
      diff = layout_difference(saved_layout, target)
      if diff:
        raise ConfigError(
          f"checkpoint {self.directory / str(step)} holds another state layout than this run builds "
          f"({diff}); it belongs to another configuration: use a new workdir"
        )
      if not isinstance(meta.get("digest"), dict) and not allow_unverified:
        raise ConfigError(
          f"checkpoint {self.directory / str(step)} carries no digest of its arrays, so it cannot be verified; "
          f"pass --run.allow_unverified to resume from it unverified, or use a new --run.workdir"
        )
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
      except Exception as e:  # noqa: BLE001 - unreadable in any way means "not usable"
        self._unreadable(step, e)
        continue
      problem = _verify(restored["state"], meta.get("digest"))
      if problem:
        self._set_aside(step, problem)
        continue
      return step, data_to_keys(restored["state"], abstract_state), dict(meta)
    return None

  def _read_meta(self, step: int) -> tuple[dict | None, Any]:
    """``(meta, saved array layout)`` of ``step``, or ``(None, None)`` once it was found damaged and set aside."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if not isinstance(meta, dict) or not meta:
        raise _Damage("its metadata is empty")
      layout = self.manager.item_metadata(step)["state"]
      if layout is None or not _layout(layout):  # a state always holds arrays: its structure is gone
        raise _Damage("the structure of its arrays (state/_METADATA) is missing or unreadable")
    except Exception as e:  # noqa: BLE001 - unreadable in any way means "not usable"
      self._unreadable(step, e)
      return None, None
    return meta, layout

  def _unreadable(self, step: int, error: BaseException) -> None:
    """A checkpoint that could not be read: a permission problem is refused, anything else is damage."""
    if _is_permission_error(error):
      raise no_access(self.directory, self.directory / str(step), _why(error)) from None
    self._set_aside(step, _why(error), error)

  def set_aside_steps(self) -> list[str]:
    """Names of the checkpoints that were moved to :attr:`corrupt_directory` (by any run)."""
    d = self.corrupt_directory
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

  def _set_aside(self, step: int, why: str, error: BaseException | None = None) -> None:
    aside = self.corrupt_directory / str(step)
    n = 1
    while aside.exists():  # never overwrite an earlier one
      aside, n = aside.with_name(f"{step}.{n}"), n + 1
    msg = f"checkpoint {self.directory / str(step)} is damaged ({why}); moved it to {aside}, trying the previous one"
    warnings.warn(msg, CheckpointWarning, stacklevel=3)
    log.info("checkpoint %d set aside: %s", step, why, exc_info=error)
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(aside))
    self._saved.discard(step)
    self.manager.reload()

  def wait(self) -> None:
    with _disk_full_as_error(self.manager, self.directory):
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Wait for saves in flight, then release the manager (idempotent)."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self.manager.close()


class CheckpointWarning(RuntimeWarning):
  """A checkpoint failed verification and was moved aside."""


class DiskFull(OSError):
  """No space left where a run writes (``doing`` says what it was writing); the earlier checkpoints are intact."""

  def __init__(self, directory: Path, last_complete: int | None, doing: str = "saving a checkpoint"):
    kept = (
      f"the checkpoint of step {last_complete} is intact"
      if last_complete is not None
      else "no checkpoint was completed"
    )
    super().__init__(
      errno.ENOSPC,
      f"disk full: no space left on the device of {directory} while {doing}; {kept} — "
      f"free some space and re-run the same command to resume",
    )
    self.directory, self.last_complete = directory, last_complete

  def __str__(self) -> str:
    return self.strerror


@contextlib.contextmanager
def _disk_full_as_error(manager: ocp.CheckpointManager, directory: Path):
  """Turn Orbax/TensorStore's many-line ENOSPC failures into one :class:`DiskFull`."""
  try:
    yield
  except DiskFull:
    raise
  except Exception as e:  # noqa: BLE001 - re-raised unchanged unless it is ENOSPC
    if not is_disk_full(e):
      raise
    log.info("disk full while saving", exc_info=True)
    manager.reload()
    steps = manager.all_steps()
    raise DiskFull(directory, max(steps) if steps else None) from None


def _caused_by(e: BaseException | None, errnos: tuple[int, ...], texts: tuple[str, ...]) -> bool:
  """Whether ``e`` or an exception it was raised from carries one of ``errnos`` (or, from TensorStore, whose
  errors are not ``OSError``, one of ``texts``)."""
  while e is not None:
    if getattr(e, "errno", None) in errnos or any(t in str(e) for t in texts):
      return True
    e = e.__cause__ or e.__context__
  return False


def is_disk_full(e: BaseException | None) -> bool:
  """Whether ``e`` comes from a full disk (or an exhausted quota)."""
  return _caused_by(e, (errno.ENOSPC, errno.EDQUOT), ("No space left on device", "Disk quota exceeded"))


def _is_permission_error(e: BaseException | None) -> bool:
  return _caused_by(e, (errno.EACCES, errno.EPERM), ("Permission denied", "PERMISSION_DENIED"))


class _Damage(Exception):
  """What makes a checkpoint unusable, in words."""


def _why(e: BaseException) -> str:
  """The innermost cause of ``e`` in one short line."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip().splitlines()
  if isinstance(e, _Damage):
    return text[0]
  return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def no_access(directory: Path, path: Path, why: str = "permission denied") -> ConfigError:
  """The one-line refusal for a checkpoint directory this process may not read or write."""
  return ConfigError(
    f"cannot read or write {path} ({why}); kdjax needs read and write access to everything under "
    f"{directory}: run it as a user who has it (e.g. after `chmod -R u+rwX {directory}`) or use a new --run.workdir"
  )


def unreadable(directory: str | Path) -> Path | None:
  """The first path under ``directory`` (itself included) this process may not use, or None.

  Directories must be readable, writable and searchable (steps are listed,
  written, rotated and moved aside); files readable. A missing ``directory``
  is fine (it is created).
  """
  directory = Path(directory)
  if not directory.exists():
    return None

  def refused(p: Path, is_dir: bool) -> bool:  # (a path that vanished meanwhile, e.g. a finished save's temp, is fine)
    return not os.access(p, os.R_OK | os.W_OK | os.X_OK if is_dir else os.R_OK) and p.exists()

  if refused(directory, True):
    return directory
  failed: list[Path] = []
  walk = os.walk(directory, onerror=lambda e: failed.append(Path(e.filename)) if e.errno == errno.EACCES else None)
  for root, dirs, files in walk:
    for name, is_dir in [(d, True) for d in dirs] + [(f, False) for f in files]:
      if refused(Path(root) / name, is_dir):
        return Path(root) / name
  return failed[0] if failed else None


def check_access(directory: str | Path) -> None:
  """``ConfigError`` naming the first path under ``directory`` this process may not use (see :func:`unreadable`)."""
  bad = unreadable(directory)
  if bad is not None:
    raise no_access(Path(directory).absolute(), bad.absolute())


def complete_steps(directory: str | Path) -> list[int]:
  """The steps saved completely under ``directory`` (an interrupted save is a temporary directory, not a step)."""
  d = Path(directory)
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _verify(state: Any, digest: dict | None) -> str | None:
  """Why a restored state is not what was saved, or None."""
  if not isinstance(digest, dict):  # saved without a digest: at least refuse what training cannot have produced
    bad = [
      jax.tree_util.keystr(k)
      for k, x in jax.tree_util.tree_flatten_with_path(state)[0]
      if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.isfinite(x).all())
    ]
    return f"non-finite values in {bad[0]}" if bad else None
  now = fingerprint(state)
  if set(now) != set(digest):
    return "its digest does not list the same arrays"
  wrong = [k for k in now if now[k] != digest[k]]
  return f"{len(wrong)} arrays differ from the digest saved with them, e.g. {wrong[0]}" if wrong else None


def _item_handlers() -> dict:
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def read_checkpoint(directory: str | Path, step: int | None = None) -> tuple[int, dict, dict]:
  """``(step, state, meta)`` of a saved checkpoint (default: the latest).

  ``state`` is the saved :class:`~kdjax.engine.state.TrainState` as a nested
  dict of host NumPy arrays (PRNG keys as raw ``uint32`` data), restored
  without a target: for inspection, tools and tests, not for resuming.
  """
  directory = Path(directory).absolute()
  if not directory.is_dir():
    raise ConfigError(f"no checkpoint directory {str(directory)!r}")
  mgr = ocp.CheckpointManager(
    directory,
    item_handlers=_item_handlers(),
    options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False),
  )
  try:
    steps = sorted(mgr.all_steps())
    if not steps or (step is not None and step not in steps):
      raise ConfigError(
        f"{str(directory)!r} has no checkpoint {'' if step is None else f'at step {step} '}(steps: {steps})"
      )
    step = steps[-1] if step is None else step
    # A target on one local device: readable whatever mesh saved it.
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
      mgr.item_metadata(step)["state"],
      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )
    r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  finally:
    mgr.close()
  return step, jax.tree.map(np.asarray, r["state"]), dict(r["meta"])


# ----------------------------------------------------------------------------
# Export: a standalone params file + model description.


def export_model(
  directory: str | Path,
  *,
  model_name: str,
  num_classes: int,
  dtype: str,
  params: Any,
  model_state: Any,
  extra: dict | None = None,
) -> Path:
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
    return jax.tree.map(
      lambda x: (
        np.asarray(multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 else np.asarray(x)
      ),
      keys_to_data(tree),
    )

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
  if p.parent.name == "checkpoints" and p.name.isdigit():
    run = p.parent.parent
    raise ConfigError(
      f"{what} {str(p)!r} is a training checkpoint (step {p.name}) of the run {str(run)!r}, not an "
      f"exported model; pass that run's workdir once it has finished (it then holds "
      f"{EXPORT_DIR}/{EXPORT_PARAMS})"
    )
  if (p / "checkpoints").is_dir():
    why = "its run has checkpoints but did not finish; re-run its command to resume and export it"
  elif p.exists():
    why = f"it holds no {EXPORT_DIR}/{EXPORT_PARAMS}"
  else:
    why = "no such file or directory"
  fix = (
    "train one with `kdjax train-teacher EXPERIMENT --workdir DIR` and pass --teacher.checkpoint DIR"
    if what.startswith("teacher")
    else "pass the workdir of a finished run"
  )
  raise ConfigError(f"{what} {str(p)!r} not found ({why}); {fix}")


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
    raise ConfigError(
      f"{what} {str(msgpack)!r} is corrupt or not a kdjax export ({type(e).__name__}); "
      f"re-export it from its run's workdir"
    ) from None
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
    raise ConfigError(f"checkpoint {what} do not fit the model: missing {missing}, shape mismatch {wrong}")
