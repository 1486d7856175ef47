"""Planning a conversion: the units of work (dense shards, expert files, source hashes) and where each expert
projection is read from, from shard headers alone, before anything is written."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Collection, NamedTuple

from moepack import arch
from moepack.convert import encodings
from moepack.convert.recipe import Recipe
from moepack.convert.source import Checkpoint, TensorInfo
from moepack.errors import SourceError
from moepack.formats import dtypes

log = logging.getLogger(__name__)

DENSE_SHARD_BYTES = 2 << 30


@dataclass
class Unit:
    """One independent piece of output: a dense shard, one expert file, or the hash of one source file."""

    id: str
    kind: str  # "dense" | "expert" | "table" | "hash"
    cost: int  # source bytes, for the progress bar
    payload: dict = field(default_factory=dict)
    reads: tuple[str, ...] = ()  # the source files it reads (a streamed conversion fetches them first)


def expert_relpath(layer: int, expert: int) -> str:
    return f"experts/{layer:03d}/{expert:04d}.bin"


def table_relpath(name: str) -> str:
    return f"tables/{name}.bin"


HEAD = re.compile(r"(^|\.)(lm_)?head\.weight$")


def streamed_tables(cfg: dict, recipe: Recipe, dense: dict[str, list[int]], quantized: Collection[str] = ()) -> list[str]:
    """The dense tensors (name -> shape) the pack stores as streamed tables (SPEC 3.6): the input embedding, unless
    the LM head shares it (no head of its own in the checkpoint, or ``tie_word_embeddings``), and the family's other
    row tables (``arch.ROW_TABLES``: Gemma 4's per-layer embeddings, Qwen3.8's PLE n-gram embeddings); none
    ``quantized`` in the release (carried as it is)."""
    if not recipe.stream_tables:
        return []
    tied = cfg.get("tie_word_embeddings") or not any(HEAD.search(n) for n in dense)
    return [n for n, shape in dense.items() if len(shape) == 2 and n not in quantized and (
        arch.is_row_table(n) or not tied and arch.is_embedding(n) and arch.layer_of(n) is None)]


class Read(NamedTuple):
    """Where one expert projection comes from: tensor ``name``, ``[index]`` of a fused tensor's expert axis (None
    for a per-expert tensor), then ``sel`` = (start, stop, step) along ``axis`` of what remains, then a transpose
    to the pack's [out, in] orientation."""

    name: str
    index: int | None = None
    sel: tuple[int, int, int] | None = None
    axis: int = 0
    transpose: bool = False

    def shape(self, src: tuple[int, ...]) -> tuple[int, ...]:
        s = list(src[(0 if self.index is None else 1):])
        if self.sel is not None:
            s[self.axis] = len(range(*self.sel))
        return tuple(reversed(s)) if self.transpose else tuple(s)


def _fused_reads(name: str, e: int, proj: str, bias: str, shape: tuple[int, ...], layout: arch.FusedLayout) -> dict:
    """Expert ``e``'s projections in one fused tensor ``[E, ...]``: {"gate", "up"} or {"down"} (+ ``bias`` suffix)."""
    transpose = layout.transposed and not bias  # a bias [E, D] has one axis: nothing to transpose
    if proj == "down_proj":
        return {"down" + bias: Read(name, e, transpose=transpose)}
    axis = 1 if transpose else 0  # the 2I axis: [H, 2I] when transposed, else [2I, H] (or a bias's only axis)
    return {p + bias: Read(name, e, sel, axis, transpose) for p, sel in layout.split(shape[1 + axis]).items()}


def reads_of(ckpt: Checkpoint, t: TensorInfo | encodings.QuantizedTensor | encodings.ShardedTensor) -> tuple[str, ...]:
    """The shard files a logical tensor is read from: its own, or those of a quantized tensor's or a table's parts."""
    if encodings.is_quantized(t):
        return tuple(sorted({ckpt.tensors[n].file for n in t.parts.values()}))
    if isinstance(t, encodings.ShardedTensor):
        return tuple(sorted({p.file for p in t.parts}))
    return (t.file,)


def _union(files) -> tuple[str, ...]:
    return tuple(sorted(set().union(*files)))


def plan_units(ckpt: Checkpoint, recipe: Recipe) -> tuple[list[Unit], dict]:
    """The units of work that convert ``ckpt`` and the manifest's ``architecture``, from shard headers alone; a
    source that cannot make a whole pack (a missing expert, a wrong shape) is refused here, before anything is
    written."""
    cfg = arch.text_config(ckpt.config)
    fam = arch.family_for(cfg)
    n_layers = arch.num_layers(cfg)
    n_experts = int(arch.get(cfg, "num_experts"))
    # zero (identity) experts have no weights; transformers' own saves carry unused gate/up rows for them, left out
    n_zero = int(arch.get(cfg, "zero_experts", 0) or 0)
    moe_layers = arch.moe_layers(cfg)
    hidden, width = int(cfg["hidden_size"]), arch.expert_width(cfg)

    dense: list[str] = []
    # experts[(layer, expert)][proj] = where to read it
    experts: dict[tuple[int, int], dict[str, Read]] = {}
    dropped = 0
    tensors = encodings.logical_tensors(ckpt)  # quantized weights grouped with their scales, under pack names
    for name, info in tensors.items():
        layer = arch.layer_of(name)
        if arch.SKIPPED.match(name) or arch.DERIVED.search(name):
            dropped += 1  # multi-token-prediction heads, vision towers, buffers the runtime derives
            continue
        if layer is not None and layer >= n_layers:
            dropped += 1  # multi-token-prediction layers beyond num_hidden_layers
            continue
        quantized = encodings.is_quantized(info)
        if not quantized and info.dtype not in dtypes.FLOATS and \
                not (info.dtype in dtypes.INTEGERS and not arch.EXPERT_TENSOR.match(name)):
            raise SourceError(
                f"{ckpt.root / info.file}: tensor {name} has dtype {info.dtype}; this converter reads "
                f"float32/float16/bfloat16 tensors, integer tables and the quantized formats "
                f"{', '.join(encodings.FORMATS)}"
            )
        if (m := arch.EXPERT_TENSOR.match(name)) and n_experts <= int(m["expert"]) < n_experts + n_zero:
            dropped += 1
        elif m:
            proj = arch.PROJ_ALIASES[m["proj"]] + ("_bias" if m["part"] == "bias" else "")
            experts.setdefault((int(m["layer"]), int(m["expert"])), {})[proj] = Read(name)
        elif m := arch.STACKED_EXPERT_TENSOR.match(name):
            if info.shape[0] != n_experts:
                raise SourceError(f"{ckpt.root / info.file}: {name} has {info.shape[0]} experts, config says {n_experts}")
            for e in range(n_experts):
                experts.setdefault((int(m["layer"]), e), {})[arch.PROJ_ALIASES[m["proj"]]] = Read(name, e)
        elif m := arch.FUSED_EXPERT_TENSOR.match(name):
            L, bias = int(m["layer"]), "_bias" if m["bias"] else ""
            if info.shape[0] not in (n_experts, n_experts + n_zero):
                raise SourceError(f"{ckpt.root / info.file}: {name} has {info.shape[0]} experts, config says {n_experts}")
            for e in range(n_experts):
                # quantized tensors are [out, in] whatever the family's float layout (gpt-oss: [in, out])
                layout = replace(fam.fused, transposed=False) if quantized else fam.fused
                experts.setdefault((L, e), {}).update(_fused_reads(name, e, m["proj"], bias, info.shape, layout))
        else:
            dense.append(name)
    if dropped:
        log.info("dropped %d tensors of multi-token prediction (or layers beyond num_hidden_layers=%d), vision "
                 "towers, zero experts and buffers derived from the config", dropped, n_layers)

    # Every MoE layer must have every expert, with the shapes the config promises.
    expect = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
    biases = {"gate_bias": (width,), "up_bias": (width,), "down_bias": (hidden,)}  # checked where present
    for L in moe_layers:
        for e in range(n_experts):
            projs = experts.get((L, e), {})
            for p, shape in {**expect, **{b: s for b, s in biases.items() if b in projs}}.items():
                if p not in projs:
                    raise SourceError(f"{ckpt.root}: layer {L} expert {e} has no {p} projection; is a shard missing?")
                r = projs[p]
                src_shape = r.shape(tensors[r.name].shape)
                if src_shape != shape:
                    raise SourceError(
                        f"{ckpt.root / tensors[r.name].file}: {r.name} has shape {src_shape} for layer {L} "
                        f"expert {e} {p}, expected {shape} from config.json"
                    )
    stray = sorted({L for (L, _) in experts} - set(moe_layers))
    if stray:
        raise SourceError(f"{ckpt.root}: expert tensors found in layers {stray}, which config.json says are dense")

    units: list[Unit] = []
    quantized = {n for n in dense if encodings.is_quantized(tensors[n])}
    for name in streamed_tables(cfg, recipe, {n: list(tensors[n].shape) for n in dense}, quantized):
        dense.remove(name)
        units.append(Unit(f"table-{name}", "table", tensors[name].nbytes,
                          {"file": table_relpath(name), "name": name, "source": tensors[name]},
                          reads_of(ckpt, tensors[name])))
    # Dense tensors grouped by the source shard they come from (so a streamed conversion can drop each shard once
    # read), in a stable order within, split into files of bounded size.
    layer_key = lambda n: (arch.layer_of(n) if arch.layer_of(n) is not None else -1, n)
    by_file: dict[tuple[str, ...], list[str]] = {}
    for name in dense:
        by_file.setdefault(reads_of(ckpt, tensors[name]), []).append(name)
    shards = []
    for files in sorted(by_file):
        shard, size = [], 0
        for name in sorted(by_file[files], key=layer_key):
            nb = tensors[name].nbytes
            if shard and size + nb > DENSE_SHARD_BYTES:
                shards.append(shard)
                shard, size = [], 0
            shard.append(name)
            size += nb
        shards.append(shard)
    for i, names in enumerate(shards):
        units.append(Unit(f"dense-{i:05d}", "dense", sum(tensors[n].nbytes for n in names),
                          {"file": f"dense/dense-{i:05d}.bin", "names": names, "sources": {n: tensors[n] for n in names}},
                          _union(reads_of(ckpt, tensors[n]) for n in names)))
    for (L, e) in sorted(experts):
        projs = experts[(L, e)]
        cost = sum(tensors[r.name].nbytes // (tensors[r.name].shape[0] if r.index is not None else 1)
                   for r in projs.values())
        units.append(Unit(f"expert-{L:03d}-{e:04d}", "expert", cost,
                          {"file": expert_relpath(L, e), "layer": L, "expert": e, "projs": projs,
                           "sources": {r.name: tensors[r.name] for r in projs.values()}},
                          _union(reads_of(ckpt, tensors[r.name]) for r in projs.values())))
    for f in ckpt.source_files():
        units.append(Unit(f"hash-{f}", "hash", 0, {"file": f}, (f,)))

    top_k = int(arch.get(cfg, "top_k"))
    architecture = {
        "family": fam.name,
        "model_type": cfg.get("model_type"),
        "num_layers": n_layers,
        "moe_layers": moe_layers,
        "num_experts": n_experts,
        "top_k": top_k,
        "hidden_size": hidden,
        "expert_width": width,
        "vocab_size": cfg.get("vocab_size"),
    }
    return units, architecture
