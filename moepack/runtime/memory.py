"""Memory budgets: parsing "8GB", the machine's available memory, and what a pack costs when resident."""

from __future__ import annotations

import os
import re
import sys

import mlx.core as mx
import numpy as np

from moepack.formats import dtypes
from moepack.formats.manifest import TensorRecord

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_bytes(value: int | float | str | None) -> int | None:
    """``8GB``, ``512MiB``, ``1.5G`` or a plain integer of bytes (binary units: 1 GB = 2**30 bytes)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    if not m or m[2].upper() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size; write e.g. 8GB, 512MB or a number of bytes")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def available_memory() -> int:
    """Bytes the OS says could be given to a new process without swapping (MemAvailable on Linux)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget() -> int:
    """60% of available memory: leaves room for the OS, the KV cache, activations and other programs."""
    return int(available_memory() * 0.6)


def resident_dtype(stored: str, compute: mx.Dtype) -> mx.Dtype:
    """The dtype a stored float takes in memory: widened to float32 when computing in float32 (MLX's CPU
    back end runs float32 several times faster than bf16); other dtypes stay as stored."""
    d = dtypes.get(stored).mlx
    if compute == mx.float32 and d in (mx.float16, mx.bfloat16):
        return mx.float32
    return d


def resident_bytes(rec: TensorRecord, compute: mx.Dtype) -> int:
    return sum(int(np.prod(b.shape)) * resident_dtype(b.dtype, compute).size for b in rec.parts.values())


def default_compute_dtype(pack_dtype: str) -> mx.Dtype:
    """float32 on the CPU back end; on a GPU the pack's own float dtype (bf16/f16 halve memory traffic)."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    return dtypes.get(pack_dtype).mlx


def peak_rss() -> int:
    """Peak resident set size of this process in bytes.

    Linux: VmHWM, since ru_maxrss carries the parent's peak across fork+exec. macOS: ru_maxrss (bytes there).
    """
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def current_rss() -> int:
    """Resident set size of this process now, in bytes: VmRSS on Linux. Elsewhere the peak (``peak_rss``), an
    upper bound, since the current figure needs an OS-specific API (psutil is not a dependency)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status") as f:
                m = re.search(r"^VmRSS:\s*(\d+)\s*kB", f.read(), re.MULTILINE)
            if m:
                return int(m[1]) * 1024
        except OSError:
            pass
    return peak_rss()


def memory_stats() -> dict[str, int]:
    """This process's resident memory and MLX's allocator figures (the server's /stats reports them)."""
    return {"rss_bytes": current_rss(), "mlx_active_bytes": mx.get_active_memory(),
            "mlx_cache_bytes": mx.get_cache_memory()}


def human_bytes(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 KiB`` ... ``2.0 TiB`` (binary units, as budgets are parsed)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
