"""Expert heat profiles: which experts a workload uses, saved beside (not inside) the pack.

Packs are shared and may be read-only, so a profile goes to a sidecar in the user's cache,
``$XDG_CACHE_HOME/moepack/heat/<pack id>.json`` (``~/.cache`` by default), keyed by the blake3 of the
pack's manifest; ``--into-pack`` writes ``heat.json`` into the pack when the user asks for it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import blake3

from moepack.errors import MoepackError
from moepack.formats.reader import PackReader

log = logging.getLogger(__name__)

HEAT_FILE = "heat.json"


def pack_id(reader: PackReader) -> str:
    from moepack.formats.files import read_pack_file
    from moepack.formats.validate import MAX_MANIFEST_BYTES

    return blake3.blake3(read_pack_file(reader.root, "manifest.json", MAX_MANIFEST_BYTES)).hexdigest()[:32]


def sidecar_path(reader: PackReader) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moepack" / "heat"
    return base / f"{pack_id(reader)}.json"


def save(reader: PackReader, heat: dict[tuple[int, int], int], path: Path | None = None, into_pack: bool = False) -> Path:
    if into_pack:
        path = reader.root / HEAT_FILE
    path = Path(path or sidecar_path(reader))
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(([L, e, n] for (L, e), n in heat.items()), key=lambda r: -r[2])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pack": pack_id(reader), "experts": rows}))
    os.replace(tmp, path)
    return path


HEAT_BYTES = 64 << 20  # a profile lists each expert once: ~20 bytes each, 1.5 M experts would fit


def _read(reader: PackReader, p: Path) -> bytes | None:
    """A profile's bytes: the pack's own heat.json through the pack's containment rules, a sidecar as a bounded
    regular file; None when there is none."""
    from moepack.formats.files import open_regular

    if p == reader.root / HEAT_FILE:
        return reader.side_file(HEAT_FILE, HEAT_BYTES)
    try:
        fd = open_regular(p)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(HEAT_BYTES + 1)
    if len(data) > HEAT_BYTES:
        raise ValueError(f"over {HEAT_BYTES} bytes")
    return data


def _experts(data: bytes, reader: PackReader) -> list[tuple[int, int]]:
    """The (layer, expert) rows of a profile, checked against the pack: a ValueError names the first bad one."""
    from moepack.formats.files import parse_json

    d = parse_json(data, "heat profile", "heat profile")
    if type(d) is not dict or type(d.get("experts")) is not list:
        raise ValueError('not an object with an "experts" list')
    if d.get("pack") not in (None, pack_id(reader)):
        raise ValueError("it was made for another pack")
    layers, n = set(reader.moe_layers), reader.manifest.architecture["num_experts"]
    out = []
    for row in d["experts"]:
        if type(row) is not list or len(row) != 3 or not all(type(v) is int for v in row) or \
                row[0] not in layers or not 0 <= row[1] < n:
            raise ValueError(f"{str(row)[:60]} is not [layer, expert, count] of an expert of this pack")
        out.append((row[0], row[1]))
    return out


def load(reader: PackReader, path: Path | None = None) -> list[tuple[int, int]]:
    """Experts hottest first; [] when there is no profile. A malformed profile, or one made for another pack, is
    skipped with a warning (it only warms the pool up, so the run goes on without it)."""
    candidates = [Path(path)] if path else [sidecar_path(reader), reader.root / HEAT_FILE]
    for p in candidates:
        try:
            data = _read(reader, p)
            if data is None:
                continue
            return _experts(data, reader)
        except (OSError, ValueError, MoepackError) as e:  # PackError from the pack's rules is a MoepackError
            log.warning("heat profile %s skipped: %s", p, getattr(e, "strerror", None) or e)
    return []


def heat_keys(reader: PackReader, heat: str | Path | bool | None) -> list[tuple[int, int]]:
    if not heat:
        return []
    return load(reader, None if heat is True else Path(heat))
