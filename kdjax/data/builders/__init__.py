"""Embedded TFDS datasets that need no network.

Importing this package registers ``mnist1d``, ``digits``, ``arithmetic`` (a
token dataset: addition with worked carries) and ``hmm_lm`` (continuations of a
random hidden-Markov language whose true distribution is known) with TFDS; kdjax
prepares them into ``data_dir`` as ArrayRecord on first use (generated locally:
nothing is downloaded, no TensorFlow), readable with ``tfds.data_source``.
"""

from kdjax.data.builders.arithmetic import Arithmetic, ArithmeticConfig
from kdjax.data.builders.digits import Digits
from kdjax.data.builders.hmm import HmmConfig, HmmLm
from kdjax.data.builders.mnist1d import Mnist1d, Mnist1dConfig

__all__ = ["Arithmetic", "ArithmeticConfig", "Digits", "HmmConfig", "HmmLm", "Mnist1d", "Mnist1dConfig"]
