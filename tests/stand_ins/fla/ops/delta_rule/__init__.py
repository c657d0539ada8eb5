"""A CPU stand-in for `fla.ops.delta_rule` (flash-linear-attention), for tests only: see chunk.py."""
from .chunk import CALLS, chunk_delta_rule, chunk_delta_rule_bwd, chunk_delta_rule_fwd  # noqa: F401
