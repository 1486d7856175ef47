"""Byte sizes as people write and read them ("8GB", "1.5 KiB"): parsed for budgets, printed in reports. No MLX here,
so the CLI can use it without loading the runtime."""

from __future__ import annotations

import re

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


def human_bytes(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 KiB`` ... ``2.0 TiB`` (binary units, as budgets are parsed)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
