"""Embedded TFDS datasets that need no network.

Importing this package registers ``mnist1d`` and ``digits`` with TFDS, so
``tfds.load("mnist1d")`` / ``tfds.load("digits")`` build them into ``data_dir``
on first use (generated locally: nothing is downloaded).
"""

from kdjax.data.builders.digits import Digits
from kdjax.data.builders.mnist1d import Mnist1d, Mnist1dConfig

__all__ = ["Digits", "Mnist1d", "Mnist1dConfig"]
