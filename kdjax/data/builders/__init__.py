"""Embedded TFDS datasets that need no network.

Importing this package registers ``mnist1d``, ``digits`` and ``arithmetic`` (a
token dataset: addition with worked carries) with TFDS; kdjax
prepares them into ``data_dir`` as ArrayRecord on first use (generated locally:
nothing is downloaded, no TensorFlow), readable with ``tfds.data_source``.
"""

from kdjax.data.builders.arithmetic import Arithmetic, ArithmeticConfig
from kdjax.data.builders.digits import Digits
from kdjax.data.builders.mnist1d import Mnist1d, Mnist1dConfig

__all__ = ["Arithmetic", "ArithmeticConfig", "Digits", "Mnist1d", "Mnist1dConfig"]
