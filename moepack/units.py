"""Byte sizes as people write and read them ("8GB", "1.5 KiB"): parsed for budgets, printed in reports. No MLX here,
so the CLI can use it without loading the runtime."""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_bytes(value: int | float | str | None, of: int | None = None) -> int | None:
    """A size as people write it: ``8GB``, ``512MiB``, ``1.5G``, ``12_000MB``, a number of bytes (``12000000000``,
    ``12e9``), or with ``of`` given, a percentage of it (``60%``). Binary units: 1 GB = 2**30 bytes. Anything
    else, zero or a negative size is a UsageError that says what to write."""
    from moepack.errors import UsageError

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"cannot read {value!r} as a size")
    text = str(value).strip()
    hint = "write e.g. 8GB, 512MB, 60% or a number of bytes"
    if "," in text:
        raise UsageError(f"cannot read {text!r} as a size: use a dot for decimals (12.5GB), no thousands commas")
    m = re.fullmatch(r"([+-]?(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][+-]?\d+)?)\s*([A-Za-z]*|%)", text)
    if not m or "__" in m[1] or m[1].endswith("_") or m[1].lstrip("+-").startswith("_"):
        raise UsageError(f"cannot read {text!r} as a size; {hint}")
    number, unit = float(m[1].replace("_", "")), m[2].upper()
    if unit == "%":
        if of is None:
            raise UsageError(f"{text}: a percentage is of this machine's available memory, which does not apply here; "
                             "give a size such as 8GB")
        if not 0 < number <= 100:
            raise UsageError(f"{text}: a percentage of available memory must be above 0 and at most 100")
        return int(of * number / 100)
    if unit not in _UNITS:
        raise UsageError(f"cannot read {text!r} as a size: unknown unit {m[2]!r}; {hint}")
    n = number * _UNITS[unit]
    if not 0 < n < 2**63:
        raise UsageError(f"{text}: a size must be positive (and below 8 EiB); {hint}")
    return int(n)


def suggest_bytes(n: int) -> str:
    """A budget spelling of at least ``n`` bytes, short and rounded up: 8.9 MiB -> ``9MB``, 1.5 GiB -> ``1.5GB``
    (a whole number where rounding up adds at most 10%, else one decimal)."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            v = n / size
            whole = -(-n // size)
            return f"{whole}{unit}" if whole <= 1.1 * v else f"{math.ceil(v * 10) / 10:g}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 KiB`` ... ``2.0 TiB`` (binary units, as budgets are parsed)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
