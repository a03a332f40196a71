"""Datasets prepared once into ``data_dir`` as TFDS ArrayRecord, then used by name (``--data.name``).

  * :func:`text`: a JSONL or Parquet file of prompt/response pairs or chat
    ``messages`` and a Hugging Face tokenizer (with its chat template) → a
    token dataset with prompt positions unscored, a length limit and optional
    packing (``kdjax prepare text``);
  * :func:`images`: NumPy arrays or a folder of images → an image dataset
    (``kdjax prepare images``);
  * :func:`tfds`: a TFDS catalogue dataset downloaded and stored
    (``kdjax prepare NAME``).

Every prepared dataset is read like the built-in ones — the same Grain
loader, per-process reading and exact resume — and appears in ``data_dir``
only once it is whole.
"""

from kdjax.data.prepare.examples import Fields
from kdjax.data.prepare.images import images
from kdjax.data.prepare.text import Prepared, text
from kdjax.data.tfds import prepare as tfds

__all__ = ["Fields", "Prepared", "images", "text", "tfds"]
