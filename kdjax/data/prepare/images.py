"""``images``: NumPy arrays (``.npz``, or ``.npy`` with a labels ``.npy``) or a folder of images → an image
dataset by name.

Arrays: an ``.npz`` holding images under ``x``/``images``/``image``/``inputs``
and integer labels under ``y``/``labels``/``label``/``targets`` (or Keras-style
``x_train``, ``y_train``, ``x_test``, ``y_test``, which give both splits).
A folder: one sub-folder per class (``DIR/cat/*.png``), or ``DIR/train/CLASS/…``
and ``DIR/test/CLASS/…``; images are decoded with Pillow to ``uint8``
``(H, W, C)`` and must share one size. Features ``image`` (as stored: ``uint8``
images are scaled by 1/255 by the views, floats used as they are) and
``label`` (a ``ClassLabel``: the dataset's class count). Train with
``--data.name NAME`` and the view that suits it (``none``, ``flip``, ``cifar`` …).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdjax.data.prepare import writer
from kdjax.data.prepare.text import Prepared, _split
from kdjax.errors import ConfigError

IMAGE_KEYS = ("x", "images", "image", "inputs")
LABEL_KEYS = ("y", "labels", "label", "targets")
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _pick(arrays: dict, keys: tuple[str, ...], what: str, source: str) -> np.ndarray:
  found = next((k for k in keys if k in arrays), None)
  if found is None:
    raise ConfigError(f"{source}: no {what} array (looked for {', '.join(keys)}; it holds {', '.join(arrays)})")
  return np.asarray(arrays[found])


def _npz(p: Path, labels: str | Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """split → (images, labels) from an ``.npz`` / ``.npy`` file."""
  try:
    loaded = np.load(p, allow_pickle=False)
    arrays = dict(loaded) if p.suffix == ".npz" else {"x": loaded}
  except (OSError, ValueError) as e:
    raise ConfigError(f"{p.name}: not a NumPy file ({str(e).splitlines()[0]})") from None
  if labels is not None:
    arrays["y"] = np.load(Path(labels).expanduser(), allow_pickle=False)
  if "x_train" in arrays:
    splits = {s: (f"x_{s}", f"y_{s}") for s in ("train", "test") if f"x_{s}" in arrays}
    return {
      s: (_pick(arrays, (x,), "image", p.name), _pick(arrays, (y,), "label", p.name)) for s, (x, y) in splits.items()
    }
  return {"train": (_pick(arrays, IMAGE_KEYS, "image", p.name), _pick(arrays, LABEL_KEYS, "label", p.name))}


def _decode(f: Path) -> np.ndarray:
  from PIL import Image

  try:
    with Image.open(f) as im:
      a = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
  except OSError as e:
    raise ConfigError(f"{f}: not a readable image ({str(e).splitlines()[0]})") from None
  return a[..., None] if a.ndim == 2 else a


def _folder(d: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
  """split → (images, labels) and the class names (sorted sub-folder names) of an image folder."""
  roots = {s: d / s for s in ("train", "test") if (d / s).is_dir()} or {"train": d}
  classes = sorted(c.name for c in roots["train"].iterdir() if c.is_dir())
  if not classes:
    raise ConfigError(f"{d}: no class sub-folders (expected DIR/CLASS/image.png)")
  out = {}
  for split, root in roots.items():
    ims, labs = [], []
    for k, c in enumerate(classes):
      files = sorted(f for f in (root / c).glob("*") if f.suffix.lower() in SUFFIXES) if (root / c).is_dir() else []
      ims += [_decode(f) for f in files]
      labs += [k] * len(files)
    shapes = sorted({a.shape for a in ims})
    if len(shapes) > 1:
      raise ConfigError(f"{root}: images differ in size ({shapes[0]} and {shapes[-1]}); resize them to one size")
    if not ims:
      raise ConfigError(f"{root}: no images ({', '.join(SUFFIXES)}) in its class folders")
    out[split] = (np.stack(ims), np.asarray(labs))
  return out, classes


def _check(split: str, x: np.ndarray, y: np.ndarray, num_classes: int, source: str) -> dict[str, np.ndarray]:
  if len(x) == 0 or len(x) != len(y) or y.ndim != 1:
    raise ConfigError(f"{source}: split {split!r} has {len(x)} images and labels of shape {y.shape}")
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
    raise ConfigError(f"{source}: split {split!r} labels must be integers in [0, {num_classes})")
  if x.dtype not in (np.uint8, np.float32) or x.ndim < 2:
    raise ConfigError(f"{source}: images must be uint8 or float32 arrays (N, ...), got {x.dtype} {x.shape}")
  return {"image": x, "label": y.astype(np.int64)}


def images(
  path: str | Path,
  name: str,
  data_dir: str | None = None,
  *,
  labels: str | Path | None = None,
  test_size: int = 0,
  seed: int = 0,
  overwrite: bool = False,
) -> Prepared:
  """Store ``path`` (see the module docstring) as TFDS dataset ``name`` in ``data_dir``; ``test_size``
  examples of a file without a test split are held out (seeded by ``seed``)."""
  from kdjax.data.tfds import default_data_dir

  data_dir = default_data_dir(data_dir)
  writer.check_name(name, data_dir, overwrite)
  p = Path(path).expanduser()
  if p.is_dir():
    raw, classes = _folder(p)
  elif p.suffix in (".npz", ".npy") and p.is_file():
    raw = _npz(p, labels)
    classes = [str(k) for k in range(int(max(int(np.max(y)) for _, y in raw.values())) + 1)]
  else:
    raise ConfigError(f"{str(path)!r}: expected an .npz/.npy file or a folder of class sub-folders")
  if test_size and "test" not in raw:
    x, y = raw["train"]
    tr, te = _split(list(range(len(x))), test_size, seed, p.name)
    raw = {"train": (x[tr], y[tr]), "test": (x[te], y[te])}
  arrays = {s: writer.Columns(_check(s, x, y, len(classes), p.name)) for s, (x, y) in raw.items()}
  meta = {"kind": "image", "source": p.name}
  directory = writer.write(
    name,
    data_dir,
    arrays,
    supervised=("image", "label"),
    metadata=meta,
    classes={"label": classes},
    overwrite=overwrite,
  )
  rows = {s: len(a) for s, a in arrays.items()}
  shape = next(iter(arrays.values())).arrays["image"].shape[1:]
  parts = ", ".join(f"{s} {n}" for s, n in rows.items())
  summary = f"{name}: {parts} images of {shape} in {len(classes)} classes from {p.name}; in {directory}"
  return Prepared(name, data_dir, str(directory), rows, summary)
