"""scikit-learn's 8x8 handwritten digits (UCI optdigits test set) as a TFDS dataset.

1797 images, values 0..16, stored as uint8 ``(8, 8, 1)`` (divide by 16 to get
[0, 1]; ``kdjax.data.default_view("digits")`` does).  sklearn ships no split:
``train``/``test`` are a fixed permutation (``np.random.default_rng(0)``) cut
80/20 (1438 / 359).  Bundled with scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from kdjax.data.builders._base import LocalBuilder

TRAIN_FRACTION = 0.8


def split_indices() -> dict[str, np.ndarray]:
  perm = np.random.default_rng(0).permutation(1797)
  cut = int(round(TRAIN_FRACTION * 1797))
  return {"train": np.sort(perm[:cut]), "test": np.sort(perm[cut:])}


class Digits(LocalBuilder):
  """sklearn ``load_digits``: 10 classes, 8x8x1 uint8 in 0..16."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "From sklearn.datasets.load_digits.", "1.1.0": "The same examples, stored as ArrayRecord."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,  # keep generation order: index = example id
      homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    return {name: self._generate_examples(images[idx], labels[idx]) for name, idx in split_indices().items()}

  def _generate_examples(self, images, labels):
    for i in range(len(images)):
      yield i, {"image": images[i], "label": int(labels[i])}
