"""The MLX runtime of mlx-serving: line-delimited JSON-RPC 2.0 over stdio on mlx-lm."""

from .fdlimit import import_mlx_lm

__version__ = "0.1.0"

import_mlx_lm()  # first, before any module imports mlx_lm: see fdlimit.py
