"""kdjax.losses: knowledge-distillation losses as pure functions of arrays.

``import kdjax.losses as kdl``. Every loss casts its inputs to float32,
returns a float32 scalar, and documents its formula, paper and the
direction of every divergence. Adapters/regressors belong to
``kdjax.methods``, not here.

The token divergences themselves are written once, per position, over a
pair of log-probability arrays in :mod:`kdjax.losses.divergences`; the
token losses here (full vocabulary, top-k cache, chunked, and fused with the
output head: :mod:`kdjax.losses.fused`) all call them.
"""

from kdjax.losses import divergences
from kdjax.losses.contrastive import CRDBank
from kdjax.losses.contrastive import crd
from kdjax.losses.contrastive import crd_init
from kdjax.losses.contrastive import crd_negatives
from kdjax.losses.features import activation_boundary
from kdjax.losses.features import attention_transfer
from kdjax.losses.features import factor_transfer
from kdjax.losses.features import fsp
from kdjax.losses.features import hint
from kdjax.losses.features import nst
from kdjax.losses.features import pool_to_match
from kdjax.losses.features import similarity_preserving
from kdjax.losses.features import vid
from kdjax.losses.hidden import attention_kl
from kdjax.losses.hidden import hidden_cosine
from kdjax.losses.hidden import hidden_mse
from kdjax.losses.hidden import relation_kl
from kdjax.losses.hidden import self_relation
from kdjax.losses.fused import CROSS_ENTROPY
from kdjax.losses.fused import FusedLosses
from kdjax.losses.fused import TokenHead
from kdjax.losses.fused import TokenPart
from kdjax.losses.fused import fused_cross_entropy
from kdjax.losses.fused import fused_token_loss
from kdjax.losses.fused import fused_token_losses
from kdjax.losses.fused import resolve_chunk
from kdjax.losses.fused import token_argmax
from kdjax.losses.logits import dist
from kdjax.losses.logits import dkd
from kdjax.losses.logits import kd
from kdjax.losses.relations import correlation_congruence
from kdjax.losses.relations import pkt
from kdjax.losses.relations import rkd
from kdjax.losses.sequence import chunked_token_loss
from kdjax.losses.sequence import forward_kl
from kdjax.losses.sequence import generalized_jsd
from kdjax.losses.sequence import reverse_kl
from kdjax.losses.sequence import skew_kl, topk_skew_kl
from kdjax.losses.sequence import sparse_kl
from kdjax.losses.sequence import teacher_topk
from kdjax.losses.sequence import topk_buckets
from kdjax.losses.sequence import topk_forward_kl
from kdjax.losses.sequence import topk_generalized_jsd
from kdjax.losses.sequence import topk_reverse_kl
from kdjax.losses.sequence import topk_to_logits
from kdjax.losses.sequence import topk_tvd
from kdjax.losses.sequence import tvd
from kdjax.losses.vocab import align_vocab
from kdjax.losses.vocab import uld
from kdjax.losses.vocab import uld_pairs

__all__ = [
  # logits
  "kd",
  "dkd",
  "dist",
  # features
  "hint",
  "attention_transfer",
  "similarity_preserving",
  "nst",
  "fsp",
  "factor_transfer",
  "activation_boundary",
  "vid",
  "pool_to_match",
  # hidden states and attention of sequence models
  "hidden_mse",
  "hidden_cosine",
  "attention_kl",
  "relation_kl",
  "self_relation",
  # relations
  "rkd",
  "pkt",
  "correlation_congruence",
  # contrastive
  "CRDBank",
  "crd_init",
  "crd",
  "crd_negatives",
  # sequence
  "forward_kl",
  "reverse_kl",
  "generalized_jsd",
  "tvd",
  "skew_kl",
  "topk_skew_kl",
  "sparse_kl",
  "teacher_topk",
  "topk_to_logits",
  "topk_buckets",
  "topk_forward_kl",
  "topk_reverse_kl",
  "topk_generalized_jsd",
  "topk_tvd",
  "chunked_token_loss",
  # fused output heads
  "TokenHead",
  "fused_token_loss",
  "fused_token_losses",
  "TokenPart",
  "FusedLosses",
  "CROSS_ENTROPY",
  "fused_cross_entropy",
  "resolve_chunk",
  "token_argmax",
  "divergences",
  # vocabularies
  "align_vocab",
  "uld",
  "uld_pairs",
]
