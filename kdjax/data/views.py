"""Deterministic, vectorised views (augmentations) in NumPy.

Every random choice is a pure function of a 64-bit *view key*
``view_key(seed, id, epoch, stream)`` (a splitmix64 hash chain), so any view
can be regenerated later from ``(seed, example id, epoch or view index)`` —
the teacher cache relies on this.  Streams: 0 = student view (and the teacher
in ``view_mode="consistent"``), 1 = teacher view in ``"independent"`` mode,
2 = mixup/cutmix draws (shared by teacher and student so they mix the same
pair with the same λ).

Kinds (``ViewConfig.kind``):
  * ``"none"``: normalise only.
  * ``"tokens"``: integer token ids ``(B, L)``, passed through unchanged
    (no scaling, dtype kept) — language-model data.
  * ``"flip"``: random horizontal flip (last spatial axis).
  * ``"cifar"``: zero-pad 4 px, random 32x32 crop, random flip (RepDistiller /
    torchvision ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``), then
    CIFAR-100 mean/std.
  * ``"jitter"``: random integer translation by up to ``max_shift`` (2) px
    along every spatial axis with zero fill (Hinton et al.'s MNIST teacher).
  * ``"imagenet"``: Inception crop (area 8–100 %, aspect 3/4–4/3) resized to
    ``image_size`` (bilinear, Pillow) + flip, ImageNet mean/std; eval: resize
    the short side to ``image_size / 0.875`` and centre-crop.  Per example
    (images of any size, a list or an array).

Layouts: ``(B, H, W, C)`` images, or ``(B, L)`` / ``(B, L, C)`` 1-D signals.

Scaling (``normalize``): raw values are divided by ``scale`` (default 255 for
uint8, 1 for floats; digits store 0..16, so use ``scale=16`` —
``kdjax.data.default_view("digits")`` does), then ``(x - mean) / std`` per
channel when a mean/std is given (CIFAR-100's for ``"cifar"``, ImageNet's
for ``"imagenet"``, none otherwise).  ``normalize=False`` keeps only the
division by ``scale``.

Mixup / cutmix: λ ~ Beta(α, α) per example by inverse CDF of a uniform from its
stream-2 key (α = 1 is Beyer et al.'s λ ~ U[0, 1]).  If both α > 0 each
example picks cutmix or mixup with probability 1/2.  The mixed input is
``w·x + (1 − w)·x_b`` with ``w = λ`` (mixup) or ``w = 1 − box`` (cutmix; λ is
then the kept-area fraction after clipping the box).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kdjax.errors import ConfigError

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("none", "tokens", "cifar", "imagenet", "flip", "jitter")
STREAM_STUDENT, STREAM_TEACHER, STREAM_MIX = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """What view to make of each example (see the module docstring)."""

  kind: str = "none"
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  normalize: bool = True
  image_size: int | None = None  # "imagenet" output side (default 224)
  scale: float | None = None  # raw / scale; None: 255 for uint8, else 1
  mean: tuple[float, ...] | None = None  # None: by kind (cifar, imagenet)
  std: tuple[float, ...] | None = None
  pad: int = 4  # "cifar" crop padding
  max_shift: int = 2  # "jitter" translation bound
  min_area: float = 0.08  # "imagenet" inception crop

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"ViewConfig.kind={self.kind!r}; expected one of {KINDS}")
    if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
      raise ConfigError(f"ViewConfig mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}: must be >= 0")
    if self.kind == "tokens" and self.mixes:
      raise ConfigError("ViewConfig kind='tokens' cannot mix token ids: set mixup_alpha and cutmix_alpha to 0")
    if (self.mean is None) != (self.std is None):
      raise ConfigError("ViewConfig.mean and ViewConfig.std must be given together")

  @property
  def mixes(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  @property
  def out_size(self) -> int:
    return self.image_size or 224

  def stats(self, dtype) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    scale = self.scale if self.scale is not None else (255.0 if np.dtype(dtype) == np.uint8 else 1.0)
    mean, std = self.mean, self.std
    if mean is None and self.normalize:
      if self.kind == "cifar":
        mean, std = CIFAR100_MEAN, CIFAR100_STD
      elif self.kind == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if not self.normalize or mean is None:
      return scale, None, None
    return scale, np.asarray(mean, np.float32), np.asarray(std, np.float32)


# ----------------------------------------------------------------- keys
_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
  with np.errstate(over="ignore"):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _u64(x) -> np.ndarray:
  return np.asarray(x).astype(np.int64).astype(np.uint64)


def view_key(seed, ids, epoch, stream=0) -> np.ndarray:
  """splitmix64 chain of (seed, id, epoch, stream) -> uint64 key per id (vectorised, broadcasting)."""
  with np.errstate(over="ignore"):
    h = _mix64(_u64(seed) + _G)
    for v in (ids, epoch, stream):
      h = _mix64((h ^ _u64(v)) + _G)
  return np.asarray(h, np.uint64)


def uniform(keys: np.ndarray, k: int) -> np.ndarray:
  """The k-th U[0, 1) draw (float64) of each key."""
  with np.errstate(over="ignore"):
    z = _mix64(keys + _G * np.uint64(k + 1))
  return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def randint(keys: np.ndarray, k: int, n) -> np.ndarray:
  """The k-th integer draw in [0, n) of each key."""
  return np.minimum((uniform(keys, k) * n).astype(np.int64), np.asarray(n) - 1)


def beta(keys: np.ndarray, k: int, alpha: float) -> np.ndarray:
  """Beta(alpha, alpha) draw by inverse CDF (alpha = 1 gives U[0, 1])."""
  u = uniform(keys, k)
  if alpha == 1.0:
    return u
  from scipy.special import betaincinv

  return betaincinv(alpha, alpha, u)


# ----------------------------------------------------------------- helpers
def _spatial_axes(ndim: int) -> tuple[int, ...]:
  if ndim == 4:
    return (1, 2)  # (B, H, W, C)
  if ndim in (2, 3):
    return (1,)  # (B, L) or (B, L, C)
  raise ConfigError(f"images of rank {ndim}: expected (B,H,W,C), (B,L) or (B,L,C)")


def _shift_crop(x: np.ndarray, pad: int, offsets: list[np.ndarray], flip: np.ndarray | None) -> np.ndarray:
  """Zero-pad every spatial axis by ``pad`` and take a window at ``offsets`` (each in [0, 2*pad]).

  ``flip`` (bool (B,)) reverses the last spatial axis.  One fancy-index gather.
  """
  axes = _spatial_axes(x.ndim)
  widths = [(0, 0)] * x.ndim
  for a in axes:
    widths[a] = (pad, pad)
  xp = np.pad(x, widths) if pad else x
  b = x.shape[0]
  index: list[Any] = [np.arange(b).reshape((b,) + (1,) * len(axes))]
  for j, (a, off) in enumerate(zip(axes, offsets)):
    n = x.shape[a]
    ar = np.arange(n)
    pos = off[:, None] + ar[None, :]
    if flip is not None and j == len(axes) - 1:
      pos = np.where(flip[:, None], off[:, None] + (n - 1 - ar)[None, :], pos)
    shape = [b] + [1] * len(axes)
    shape[1 + j] = n
    index.append(pos.reshape(shape))
  return xp[tuple(index)]


def _scale_norm(cfg: ViewConfig, x: np.ndarray, dtype) -> np.ndarray:
  scale, mean, std = cfg.stats(dtype)
  y = x.astype(np.float32)
  if scale != 1.0:
    y *= np.float32(1.0 / scale)
  if mean is not None:
    y -= mean
    y *= 1.0 / std
  return y


def _tokens(x: np.ndarray) -> np.ndarray:
  if not np.issubdtype(x.dtype, np.integer):
    raise ConfigError(f"view kind 'tokens' expects integer token ids, got {x.dtype} (use kind 'none' for signals)")
  return x


def normalize(cfg: ViewConfig, images) -> np.ndarray:
  """The eval-time transform: scale (+ mean/std); ImageNet: resize + centre crop."""
  if cfg.kind == "imagenet":
    return np.stack([imagenet_eval_view(im, cfg) for im in images])
  images = np.asarray(images)
  if cfg.kind == "tokens":
    return _tokens(images)
  return _scale_norm(cfg, images, images.dtype)


def augment(cfg: ViewConfig, images, keys: np.ndarray) -> np.ndarray:
  """The training view of each image: a deterministic function of (image, key)."""
  keys = np.asarray(keys, np.uint64)
  if cfg.kind == "imagenet":
    return np.stack([imagenet_train_view(im, k, cfg) for im, k in zip(images, keys)])
  images = np.asarray(images)
  if cfg.kind == "tokens":
    return _tokens(images)
  dtype = images.dtype
  if cfg.kind == "none":
    out = images
  elif cfg.kind == "flip":
    axes = _spatial_axes(images.ndim)
    zeros = [np.zeros(len(keys), np.int64) for _ in axes]
    out = _shift_crop(images, 0, zeros, uniform(keys, 0) < 0.5)
  elif cfg.kind == "cifar":
    axes = _spatial_axes(images.ndim)
    offs = [randint(keys, 1 + j, 2 * cfg.pad + 1) for j in range(len(axes))]
    out = _shift_crop(images, cfg.pad, offs, uniform(keys, 0) < 0.5)
  elif cfg.kind == "jitter":
    axes = _spatial_axes(images.ndim)
    offs = [randint(keys, 1 + j, 2 * cfg.max_shift + 1) for j in range(len(axes))]
    out = _shift_crop(images, cfg.max_shift, offs, None)
  else:  # pragma: no cover - guarded by ViewConfig
    raise ConfigError(cfg.kind)
  return _scale_norm(cfg, out, dtype)


# ----------------------------------------------------------------- mixing
def mix_weights(cfg: ViewConfig, mix_keys: np.ndarray, image_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Per-example mixing weight map ``w`` (B, *spatial, 1...) and λ (B,) float32.

  ``mixed = w * x + (1 - w) * x_b``; λ is the mean of ``w`` (exact for cutmix,
  = the Beta draw for mixup).
  """
  b = len(mix_keys)
  ndim = len(image_shape) + 1
  axes = _spatial_axes(ndim)
  spatial = [image_shape[a - 1] for a in axes]
  bshape = (b,) + (1,) * (ndim - 1)
  use_cut = np.zeros(b, bool)
  if cfg.cutmix_alpha > 0 and cfg.mixup_alpha > 0:
    use_cut = uniform(mix_keys, 0) < 0.5
  elif cfg.cutmix_alpha > 0:
    use_cut = np.ones(b, bool)
  lam_mix = beta(mix_keys, 1, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else np.ones(b)
  w = np.broadcast_to(lam_mix.reshape(bshape), (b,) + tuple(image_shape)).astype(np.float32)
  if use_cut.any():
    lam0 = beta(mix_keys, 2, cfg.cutmix_alpha)
    ratio = np.sqrt(1.0 - lam0)
    inside = np.ones((b,) + tuple(spatial), bool)
    for j, n in enumerate(spatial):
      cut = (n * ratio).astype(np.int64)
      centre = randint(mix_keys, 3 + j, n)
      lo, hi = np.clip(centre - cut // 2, 0, n), np.clip(centre + cut // 2, 0, n)
      ar = np.arange(n)
      m = (ar[None, :] >= lo[:, None]) & (ar[None, :] < hi[:, None])
      shape = [b] + [1] * len(spatial)
      shape[1 + j] = n
      inside &= m.reshape(shape)
    wc = (~inside).astype(np.float32)
    wc = wc.reshape(wc.shape + (1,) * (ndim - 1 - len(spatial)))
    wc = np.broadcast_to(wc, w.shape)
    w = np.where(use_cut.reshape(bshape), wc, w)
  lam = w.reshape(b, -1).mean(axis=1).astype(np.float32)
  lam = np.where(use_cut, lam, lam_mix.astype(np.float32))
  return w, lam


def apply_mix(w: np.ndarray, x: np.ndarray, x_b: np.ndarray) -> np.ndarray:
  return (w * x + (1.0 - w) * x_b).astype(np.float32)


# ----------------------------------------------------------------- imagenet (NumPy + Pillow)
def inception_box(
  key, height: int, width: int, min_area: float = 0.08, attempts: int = 10
) -> tuple[int, int, int, int]:
  """The Inception crop (Szegedy et al. 2015) of one image: ``(top, left, h, w)``.

  Attempt ``j`` draws an area fraction ~ U[min_area, 1], a log aspect ratio
  ~ U[log 3/4, log 4/3] and, if the box fits, its offset; after ``attempts``
  misses the whole image.  Every draw is a function of ``key``.
  """
  k = np.asarray([key], np.uint64)
  lo, hi = np.log(3 / 4), np.log(4 / 3)
  for j in range(attempts):
    area = height * width * (min_area + (1.0 - min_area) * uniform(k, 4 * j + 1)[0])
    ratio = np.exp(lo + (hi - lo) * uniform(k, 4 * j + 2)[0])
    w, h = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
    if 0 < w <= width and 0 < h <= height:
      return int(randint(k, 4 * j + 3, height - h + 1)[0]), int(randint(k, 4 * j + 4, width - w + 1)[0]), h, w
  return 0, 0, height, width


def _resize(image: np.ndarray, height: int, width: int, box=None) -> np.ndarray:
  """Bilinear resize of a (H, W, C) uint8 image (of ``box`` = (left, top, right, bottom) when given)."""
  from PIL import Image

  im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = np.asarray(im.resize((width, height), Image.BILINEAR, box=box))
  return out.reshape(height, width, image.shape[-1])


def imagenet_train_view(image, key, cfg: ViewConfig) -> np.ndarray:
  """Inception crop resized to ``image_size`` squared, random flip, normalise: (s, s, C) float32."""
  image = np.asarray(image)
  s = cfg.out_size
  top, left, h, w = inception_box(key, image.shape[0], image.shape[1], cfg.min_area)
  out = _resize(image, s, s, box=(left, top, left + w, top + h))
  if uniform(np.asarray([key], np.uint64), 0)[0] < 0.5:
    out = out[:, ::-1]
  return _scale_norm(cfg, out, image.dtype)


def imagenet_eval_view(image, cfg: ViewConfig) -> np.ndarray:
  """Resize the short side to ``image_size / 0.875``, centre-crop ``image_size`` squared, normalise."""
  image = np.asarray(image)
  s = cfg.out_size
  height, width = image.shape[:2]
  ratio = (s / 0.875) / min(height, width)
  nh, nw = max(s, int(round(height * ratio))), max(s, int(round(width * ratio)))
  out = _resize(image, nh, nw)
  top, left = (nh - s) // 2, (nw - s) // 2
  return _scale_norm(cfg, out[top : top + s, left : left + s], image.dtype)
