"""A CPU stand-in for flash-linear-attention (package `fla`), for tests only: see fla/ops/delta_rule."""
