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

from moepack.formats.reader import PackReader

log = logging.getLogger(__name__)

HEAT_FILE = "heat.json"


def pack_id(reader: PackReader) -> str:
    return blake3.blake3((reader.root / "manifest.json").read_bytes()).hexdigest()[:32]


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


def load(reader: PackReader, path: Path | None = None) -> list[tuple[int, int]]:
    """Experts hottest first; [] when there is no profile."""
    candidates = [Path(path)] if path else [sidecar_path(reader), reader.root / HEAT_FILE]
    for p in candidates:
        if p.is_file():
            data = json.loads(p.read_text())
            if data.get("pack") not in (None, pack_id(reader)):
                log.warning("heat profile %s was made for another pack; ignoring it", p)
                continue
            return [(int(L), int(e)) for L, e, _ in data["experts"]]
    return []


def heat_keys(reader: PackReader, heat: str | Path | bool | None) -> list[tuple[int, int]]:
    if not heat:
        return []
    return load(reader, None if heat is True else Path(heat))
