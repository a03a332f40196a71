"""The parallel layer: meshes and shardings, logical axes and partition rules, teacher placement and its cost model.

``sharding`` builds ``("data", "fsdp"[, "model"])`` meshes and the
shardings of batches and parameters; ``partition`` maps parameters to
logical axes and logical axes to mesh axes (:func:`partition.spec_for`);
``placement`` says where a frozen teacher lives (:class:`Placement`) and
moves its outputs between sub-meshes; ``cost`` predicts each placement's
step time and memory. It depends on JAX and Flax only: models, generation
and the engine build on it.
"""

from kdjax.parallel.partition import logical_axes, spec_for, teacher_specs
from kdjax.parallel.placement import Placement, placement_meshes
from kdjax.parallel.sharding import batch_sharding, make_mesh, param_shardings, replicated, shard_batch

__all__ = [
  "Placement",
  "batch_sharding",
  "logical_axes",
  "make_mesh",
  "param_shardings",
  "placement_meshes",
  "replicated",
  "shard_batch",
  "spec_for",
  "teacher_specs",
]
