"""moepack: run Mixture-of-Experts models larger than RAM by streaming routed experts from SSD.

Two halves share the on-disk format in :mod:`moepack.formats`:
:mod:`moepack.convert` writes packs, :mod:`moepack.runtime` reads and runs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, memory_budget=None, **kwargs):
    """Load a pack for inference; see :func:`moepack.runtime.engine.load`."""
    from moepack.runtime.engine import load as _load

    return _load(path, memory_budget=memory_budget, **kwargs)
