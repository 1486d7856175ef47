"""Reading a pack: the manifest, config.json (checked against it), dense tensors, expert file locations and
verification.

The runtime reads expert bytes itself (direct I/O into its slot pool); this module only says where they are.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

import mlx.core as mx
import numpy as np

from moepack.errors import MoepackError, PackError
from moepack.formats import dtypes
from moepack.formats.manifest import Blob, ExpertLayout, Manifest, Table, TensorRecord
from moepack.formats.quant import decode
from moepack.formats.files import check_tree, read_pack_file, read_pack_json
from moepack.formats.validate import MAX_CONFIG_BYTES, relpath_problem, show
from moepack.formats.writer import hash_file

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class PackReader:
    """A pack, validated before use (formats/validate.py): the manifest field by field, the file tree (no symlink
    out, no FIFO), config.json against the manifest. ``verify=True`` hashes each dense file when first mapped."""

    def __init__(self, path: str | os.PathLike, verify: bool = False):
        self.root = Path(path)
        if not self.root.is_dir():
            raise PackError(f"{path} is not a directory; give the folder `moepack convert` wrote")
        self.manifest = Manifest.load(self.root)
        check_tree(self.root, self.manifest.files)
        self.verify_reads = verify
        self._config = load_config(self.root, self.manifest.architecture, self.digest("config.json"))
        self._maps: dict[str, np.memmap] = {}
        self._experts = {e.layer: e for e in self.manifest.experts}

    # ---- side files -------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return copy.deepcopy(self._config)

    def digest(self, rel: str) -> str | None:
        """The blake3 a read of ``rel`` must match: the manifest's, with ``verify``; else None (not checked)."""
        info = self.manifest.files.get(rel)
        return info["blake3"] if self.verify_reads and info is not None else None

    def side_file(self, rel: str, max_bytes: int) -> bytes | None:
        """A side file of the pack (tokenizer, template, generation config, heat profile) through the pack's
        containment rules (formats/files.py), checked against the manifest with ``verify``; None when absent."""
        try:
            return read_pack_file(self.root, rel, max_bytes, self.digest(rel))
        except FileNotFoundError:
            return None

    def file_path(self, relpath: str) -> Path:
        """Resolve a manifest path, refusing anything that would leave the pack directory."""
        if problem := relpath_problem(relpath):
            raise PackError(f"manifest names a path outside the pack: {problem}")
        return self.root / relpath

    # ---- dense tensors ----------------------------------------------------------------------
    def _blob_array(self, blob: Blob) -> np.ndarray:
        assert blob.file is not None
        mm = self._maps.get(blob.file)
        if mm is None:
            path = self.file_path(blob.file)
            try:
                if self.verify_reads and hash_file(path) != self.manifest.files[blob.file]["blake3"]:
                    raise PackError(f"{path}: blake3 mismatch, the file is corrupt (run `moepack verify {self.root}`)")
                mm = self._maps[blob.file] = np.memmap(path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:  # missing, unreadable, or empty (numpy cannot map 0 bytes)
                raise PackError(f"{path}: cannot map it ({getattr(e, 'strerror', None) or e}); "
                                f"the pack is damaged (run `moepack verify {self.root}`)") from e
        if blob.offset + blob.length > mm.shape[0]:
            raise PackError(f"{blob.file}: blob at {blob.offset}+{blob.length} runs past the file's end ({mm.shape[0]})")
        d = dtypes.get(blob.dtype)
        if int(np.prod(blob.shape, dtype=np.int64)) * d.itemsize != blob.length:
            raise PackError(f"{blob.file}: blob length {blob.length} does not match shape {blob.shape} of {blob.dtype}")
        return mm[blob.offset : blob.offset + blob.length].view(d.numpy).reshape(blob.shape)

    def dense_parts(self, name: str) -> dict[str, mx.array]:
        """The stored parts of one dense tensor as MLX arrays (copied out of the file mapping)."""
        rec = self.manifest.dense[name]
        return {k: dtypes.from_numpy_bytes(np.array(self._blob_array(b)), b.dtype) for k, b in rec.parts.items()}

    def dense_tensor(self, name: str) -> mx.array:
        """One dense tensor, dequantized if it is stored quantized."""
        rec = self.manifest.dense[name]
        return decode(self.dense_parts(name), rec.encoding, rec.bits, rec.group_size)

    def dense_weights(self, keep: Callable[[str], bool] | None = None) -> dict[str, mx.array]:
        """Every dense tensor under MLX parameter names: ``x.weight`` raw, or ``x.weight/.scales(/.biases)`` quantized.

        ``keep``: read only the tensors whose pack name it accepts (a pipeline stage's, runtime/distributed/).
        """
        out: dict[str, mx.array] = {}
        for name, rec in self.manifest.dense.items():
            if keep is not None and not keep(name):
                continue
            parts = self.dense_parts(name)
            if rec.encoding == "raw":
                out[name] = parts["data"]
            else:
                base = name[: -len(".weight")] if name.endswith(".weight") else name
                out.update({f"{base}.{k}": v for k, v in parts.items()})  # weight, scales (, biases)
        return out

    def release(self) -> None:
        """Drop the file mappings used to load dense tensors (their pages would otherwise count as resident)."""
        self._maps.clear()

    @property
    def dense_bytes(self) -> int:
        return sum(r.nbytes for r in self.manifest.dense.values())

    # ---- experts ----------------------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return sorted(self._experts)

    def expert_layout(self, layer: int) -> ExpertLayout:
        return self.manifest.expert_layouts[self._experts[layer].layout]

    def expert_file(self, layer: int, expert: int) -> Path:
        return self.file_path(self._experts[layer].files[expert])

    def expert_digest(self, layer: int, expert: int) -> str:
        """The blake3 the manifest records for an expert's file (checked on first read with ``verify``)."""
        return self.manifest.files[self._experts[layer].files[expert]]["blake3"]

    def expert_tensor(self, layer: int, expert: int, name: str) -> mx.array:
        """One expert tensor, dequantized: the slow, simple path used by tests and tools, not the runtime."""
        rec: TensorRecord = self.expert_layout(layer).tensors[name]
        data = np.fromfile(self.expert_file(layer, expert), dtype=np.uint8)
        parts = {}
        for k, b in rec.parts.items():
            d = dtypes.get(b.dtype)
            parts[k] = dtypes.from_numpy_bytes(data[b.offset : b.offset + b.length].view(d.numpy).reshape(b.shape), b.dtype)
        return decode(parts, rec.encoding, rec.bits, rec.group_size)

    # ---- streamed tables -------------------------------------------------------------------
    @property
    def tables(self) -> dict[str, Table]:
        """Tensor name -> streamed table (SPEC 3.6; empty for a version 1 pack)."""
        return self.manifest.tables

    def table_path(self, name: str) -> Path:
        return self.file_path(self.manifest.tables[name].file)

    def table_rows(self, name: str, rows: list[int]) -> mx.array:
        """Rows of a table, dequantized: the slow, simple path used by tests and tools (the runtime reads rows
        through runtime/tables.py)."""
        t = self.manifest.tables[name]
        data = np.fromfile(self.table_path(name), dtype=np.uint8)
        parts = {k: dtypes.from_numpy_bytes(np.stack([data[t.row_offset(r) + b.offset:][: b.length] for r in rows]),
                                            b.dtype).reshape(len(rows), *b.shape) for k, b in t.row.parts.items()}
        return decode(parts, t.row.encoding, t.row.bits, t.row.group_size)

    # ---- verification -----------------------------------------------------------------------
    def verify(self, progress=None) -> VerifyReport:
        """Re-hash every file and check sizes, blob bounds and expert layouts against the manifest."""
        rep = VerifyReport()
        align = self.manifest.alignment
        for rel, info in self.manifest.files.items():
            rep.checked += 1
            try:
                path = self.file_path(rel)
            except PackError as e:
                rep.problems.append(str(e))
                continue
            if not path.is_file():
                rep.problems.append(f"{rel}: missing")
                continue
            size = path.stat().st_size
            if size != info["length"]:
                rep.problems.append(f"{rel}: size {size} != manifest {info['length']}")
            elif hash_file(path) != info["blake3"]:
                rep.problems.append(f"{rel}: blake3 mismatch (corrupt file)")
            if progress:
                progress(size)
        for name, rec in self.manifest.dense.items():
            for part, b in rec.parts.items():
                info = self.manifest.files.get(b.file or "")
                if info is None:
                    rep.problems.append(f"dense {name}.{part}: file {b.file!r} is not listed in the manifest")
                elif b.offset + b.length > info["length"]:
                    rep.problems.append(f"dense {name}.{part}: bytes {b.offset}+{b.length} past the end of {b.file}")
        for el in self.manifest.experts:
            layout = self.manifest.expert_layouts.get(el.layout)
            if layout is None:
                rep.problems.append(f"layer {el.layer}: unknown expert layout {el.layout!r}")
                continue
            if layout.length % align:
                rep.problems.append(f"layout {el.layout}: expert file length {layout.length} is not aligned to {align}")
            for t, rec in layout.tensors.items():
                for part, b in rec.parts.items():
                    if b.offset + b.length > layout.length:
                        rep.problems.append(f"layout {el.layout}: {t}.{part} runs past the expert file's end")
            for rel in el.files:
                info = self.manifest.files.get(rel)
                if info is None:
                    rep.problems.append(f"{rel}: expert file not listed in the manifest")
                elif info["length"] != layout.length:
                    rep.problems.append(f"{rel}: length {info['length']} != layout length {layout.length}")
        for name, t in self.manifest.tables.items():
            info = self.manifest.files.get(t.file)
            if info is None:
                rep.problems.append(f"table {name}: file {t.file!r} is not listed in the manifest")
            elif info["length"] != t.length:
                rep.problems.append(f"table {name}: {t.file} is {info['length']} bytes, {t.rows} rows take {t.length}")
        return rep


def load_config(root: Path, architecture: dict, blake3: str | None = None) -> dict:
    """config.json: a JSON object that agrees with the manifest's architecture (the model is built from it)."""
    try:
        cfg = read_pack_json(root, "config.json", MAX_CONFIG_BYTES, "config", blake3)
    except FileNotFoundError:
        raise PackError(f"{root / 'config.json'}: cannot read it (missing); the pack is incomplete (re-convert it)") from None
    if type(cfg) is not dict:
        raise PackError(f"{root / 'config.json'}: must be a JSON object, not {show(cfg)}")
    check_config(cfg, architecture, root / "config.json")
    return cfg


def check_config(cfg: dict, a: dict, where: Path | str = "config.json") -> None:
    """Refuse a config.json whose model shape differs from the manifest's ``architecture`` ``a``: the model is
    built from the config and its experts are read by the manifest, so a disagreement would misread the pack."""
    from moepack import arch  # the format knows no architectures; only this cross-check needs the table

    def bad(msg: str) -> NoReturn:
        raise PackError(f"{where}: {msg}; config.json and manifest.json disagree (a damaged or tampered pack)")

    try:
        tc = arch.text_config(cfg)
        if problem := arch.config_problem(tc):
            raise PackError(f"{where}: {problem}; the pack's config.json is damaged or tampered with")
        fam = arch.family_for(tc)
        if fam.name != a["family"]:
            bad(f"family {fam.name} != architecture.family {a['family']}")
        checks = [("num_layers", lambda: arch.num_layers(tc)), ("moe_layers", lambda: arch.moe_layers(tc)),
                  ("num_experts", lambda: int(arch.get(tc, "num_experts"))), ("top_k", lambda: int(arch.get(tc, "top_k"))),
                  ("hidden_size", lambda: int(tc["hidden_size"])), ("expert_width", lambda: arch.expert_width(tc))]
        for key, value in checks:  # num_layers first: it bounds the loop in moe_layers
            if key in a and (got := value()) != a[key]:
                bad(f"{key} is {show(got)} but manifest.json's architecture.{key} is {a[key]}")
    except MoepackError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError) as e:
        raise PackError(f"{where}: cannot read the model's shape from it ({type(e).__name__}: {e})") from None


def _rows_per_token(reader: PackReader, name: str) -> int:
    """Rows a token reads from table ``name``: the format knows no architectures, the family says."""
    from moepack import arch

    return arch.table_rows_per_token(arch.text_config(reader.config), name)


def summary(reader: PackReader) -> dict:
    """What ``moepack inspect`` shows: sizes and counts a user plans memory and bandwidth with."""
    m = reader.manifest
    a = m.architecture
    layouts = {el.layer: m.expert_layouts[el.layout] for el in m.experts}
    expert_params = sum(
        int(np.prod(rec.shape)) for L, lay in layouts.items() for rec in lay.tensors.values()
    ) * a["num_experts"]
    dense_params = sum(int(np.prod(r.shape)) for r in m.dense.values()) + \
        sum(int(np.prod(t.shape)) for t in m.tables.values())  # a streamed embedding is dense, only not resident
    per_expert = max((lay.length for lay in layouts.values()), default=0)
    encodings: dict[str, int] = {}
    for rec in [*m.dense.values(), *(t.row for t in m.tables.values()),
                *(r for lay in m.expert_layouts.values() for r in lay.tensors.values())]:
        key = {"raw": "raw", "affine": f"affine{rec.bits}/g{rec.group_size}"}.get(rec.encoding, rec.encoding)
        origin = ", ".join(filter(None, (rec.source_encoding, rec.carried)))  # e.g. "int4-pack-quantized-g32, lossless"
        key += f" {rec.dtype}" + (f" (from {origin})" if origin else "")
        encodings[key] = encodings.get(key, 0) + 1
    return {
        "path": str(reader.root),
        "format": f"{m.format} v{m.format_version}",
        "architecture": a,
        "parameters": {"total": dense_params + expert_params, "dense": dense_params, "routed_experts": expert_params,
                       "active_per_token": dense_params + expert_params // max(a["num_experts"], 1) * a["top_k"]},
        "bytes": {
            "total": sum(f["length"] for f in m.files.values()),
            "dense": reader.dense_bytes,
            "tables": sum(t.length for t in m.tables.values()),
            "table_per_token_uncached": sum(t.read_bytes() * _rows_per_token(reader, n) for n, t in m.tables.items()),
            "per_expert": per_expert,
            "experts": per_expert * a["num_experts"] * len(layouts),
            "per_token_uncached": per_expert * a["top_k"] * len(layouts),
        },
        "files": len(m.files),
        "tables": {k: {"shape": t.shape, "encoding": t.row.encoding, "row_bytes": t.row_bytes,
                       "block_bytes": t.block_bytes, "read_bytes": t.read_bytes(), "bytes": t.length}
                   for k, t in m.tables.items()},
        "alignment": m.alignment,
        "recipe": m.recipe,
        "encodings": encodings,
        "provenance": {k: v for k, v in m.provenance.items() if k != "source_files"},
    }
