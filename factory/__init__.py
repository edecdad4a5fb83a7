"""factory: a domain-specialized synthetic data factory with validation.

The library API (factory/api.py) is importable from here: `factory.generate`, `factory.validate`,
`factory.domains`, `factory.Run`, `factory.GateFailed`. They load lazily, so that `factory --help`
and `import factory` stay fast.
"""
import os

# OpenMP threads that spin while waiting make torch/XGBoost up to 7x slower when the
# 2 cores are shared (measured: a decoder training step took 8.0 s spinning vs 1.1 s
# passive, with one other busy process). Must be set before torch loads its OpenMP
# runtime; a user's explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["generate", "validate", "domains", "Run", "GateFailed", "__version__"]


def __getattr__(name: str):
    if name in ("generate", "validate", "domains", "Run", "GateFailed"):
        from factory import api

        return getattr(api, name)
    raise AttributeError(f"module 'factory' has no attribute {name!r}")
