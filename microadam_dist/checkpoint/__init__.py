"""Save, load and reshard MicroAdam checkpoints.

- `reshard`: pure functions that move the state of one flat tensor between shardings
  (EF dequantized to global positions, window entries re-binned by global index and
  age, overflow folded into the EF, EF requantized once).
- `io`: atomic, checksummed files and checkpoint directories.
- `sharded`: the engine-agnostic sharded checkpoint directory (per-rank files +
  metadata) and its reshard / consolidate / split.
- CLI: `python -m microadam_dist.checkpoint reshard --src DIR --dst DIR --world-size M`.

See docs/checkpoints.md for the format and the exact guarantee.
"""

from .reshard import (ReshardError, ReshardReport, ShardState, consolidate_tensor, even_ranges,
                      reshard_tensor, split_tensor)

__all__ = ["ReshardError", "ReshardReport", "ShardState", "consolidate_tensor", "even_ranges",
           "reshard_tensor", "split_tensor"]
