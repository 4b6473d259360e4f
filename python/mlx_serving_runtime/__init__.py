"""The MLX runtime of mlx-serving: line-delimited JSON-RPC 2.0 over stdio on mlx-lm."""

__version__ = "0.1.0"
