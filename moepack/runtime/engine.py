"""Loading a pack and running it: ``moepack.load(path)`` -> :class:`Engine`.

The engine interface (:class:`BaseEngine`) is what the CLI, chat, the server and the generation loop use:
``forward`` over a block of tokens with a cache (logits only where asked), ``make_cache``, ``stats``, ``close``.
:class:`Engine` runs a pack in this process; ``runtime.distributed.PipelineEngine`` runs it over several hosts.

Follow one token: ``generation.decode`` -> ``BaseEngine.forward`` -> ``Engine.run`` -> ``CausalLM.run_layers``
(models/base.py) -> the MoE block's router and ``StreamedExperts`` (models/moe.py) -> ``ExpertStore.acquire``
(store.py) -> ``DirectReader.read_into`` (io.py), one ``preadv`` per expert file.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moepack import arch
from moepack.errors import PackError
from moepack.formats.reader import PackReader
from moepack.runtime import kernels, memory
from moepack.runtime.heat import heat_keys
from moepack.runtime.memory import MemoryPlan, plan_memory
from moepack.runtime.models import module_for
from moepack.runtime.models.moe import MoE
from moepack.runtime.policy import DEFAULT_POLICY, POLICIES, EvictionPolicy, PinnedPolicy
from moepack.runtime.store import ExpertStore
from moepack.runtime.tables import StreamedEmbedding, TableCounters, TableStore

log = logging.getLogger(__name__)

__all__ = ["BaseEngine", "Engine", "MemoryPlan", "Stage", "load", "plan_memory"]

# Tokens in one forward pass. A prompt passes through the model layer by layer as one block (each expert it needs is
# read at most once per layer); only prompts longer than this, or than ACTIVATION_BYTES of activations allow (the
# larger of 512 MiB and a sixteenth of the budget), are split into passes.
MAX_PASS = 16384
ACTIVATION_BYTES = 512 << 20

Logits = Literal["last", "all"]


class BaseEngine(ABC):
    """The engine interface. Subclasses implement one pass (``_pass``), caches, stats and close; the rest is shared."""

    config: dict
    max_pass: int = MAX_PASS

    @abstractmethod
    def make_cache(self) -> list:
        """Per-layer caches (``offset``, ``trim(n)``) for one sequence."""

    @abstractmethod
    def _pass(self, ids: list[int], cache: list | None, logits: Logits) -> np.ndarray:
        """``ids`` through the whole model, appended to ``cache``; float32 logits [1 or len(ids), vocab]."""

    @abstractmethod
    def stats(self) -> dict: ...

    @abstractmethod
    def close(self) -> None: ...

    def forward(self, ids: Sequence[int], cache: list | None = None, logits: Logits = "last") -> np.ndarray:
        """Append ``ids`` to ``cache`` (None: a fresh sequence, kept nowhere); float32 logits of the last position
        [1, vocab], or of every position [len(ids), vocab] with ``logits="all"``."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("forward needs at least one token")
        if cache is None and len(ids) > self.max_pass:
            cache = self.make_cache()  # several passes must share a cache
        outs = [self._pass(ids[s : s + self.max_pass], cache, logits) for s in range(0, len(ids), self.max_pass)]
        return np.concatenate(outs) if logits == "all" and len(outs) > 1 else outs[-1]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Full forward pass without a cache: float32 [len(token_ids), vocab]."""
        return self.forward(token_ids, None, "all")

    def generate(self, token_ids: Sequence[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_tokens: Sequence[int] | None = None,
                 cache: list | None = None) -> Iterator[int]:
        """Yield up to ``max_tokens`` new token ids, stopping after a stop token (the generation loop's tokens)."""
        from moepack.runtime.generation import Generation
        from moepack.runtime.sampling import SamplingParams

        if not token_ids:
            raise ValueError("generate needs at least one prompt token")
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        for s in Generation(self, token_ids, max_tokens, params, stop_tokens or (), cache):
            yield s.token

    def __enter__(self) -> "BaseEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Stage:
    """The layers ``start .. stop-1`` an engine runs, of a ``count``-stage pipeline: the first stage also embeds the
    tokens, the last applies the final norm and the LM head. One process runs the single stage of :meth:`whole`."""

    index: int
    count: int
    start: int
    stop: int
    tied: bool = False  # tie_word_embeddings: the last stage needs the embedding matrix as its head

    @classmethod
    def whole(cls, n_layers: int) -> "Stage":
        return cls(0, 1, 0, n_layers)

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    def owns(self, name: str) -> bool:
        """Whether this stage loads the dense tensor ``name`` (a pack name)."""
        layer = arch.layer_of(name)
        if layer is not None:
            return self.start <= layer < self.stop
        if arch.is_embedding(name):
            return self.first or (self.last and self.tied)
        if "rotary_emb" in name:
            return True  # a learned rope every layer uses (Mistral Large 4's model.rotary_emb.alpha)
        return self.last  # final norm, lm_head (and what collapses hyper-connection streams before them)

    def drop_others(self, model: nn.Module) -> None:
        """Remove what other stages run from a freshly built (not yet loaded) CausalLM, so it is never allocated.

        Other stages' layers become empty modules in place, so the kept ones keep their index and their pack names.
        """
        if self.count == 1:
            return
        layers = model.model.layers
        for i in range(len(layers)):
            if i not in self.layers:
                layers[i] = nn.Module()
        if not self.first and not (self.last and self.tied):
            model.model.pop("embed_tokens")
        if not self.last:  # the final norm and whatever else runs after the layers (DeepSeek V4's hc_head)
            for name in [k for k in model.model if k not in ("layers", "embed_tokens", "rotary_emb")]:
                model.model.pop(name)
            model.pop("lm_head", None)


class Engine(BaseEngine):
    def __init__(self, path: str | Path, memory_budget: int | str | None = None, *,
                 compute_dtype: mx.Dtype | None = None, direct_io: bool = True, io_threads: int = 8,
                 policy: EvictionPolicy | str | None = None, prefetch: bool = False,
                 heat: str | Path | bool | None = True, pin_hot: float = 0.0, verify: bool = False,
                 keep_decode_set: bool = True, reserve_tokens: int = 0, stage: Stage | None = None):
        """``policy``: "lfu" (the default, ``DEFAULT_POLICY``), "lru" or an EvictionPolicy. ``heat``: a heat profile to warm-start the pool from (a path;
        True, the default, uses the one `moepack profile` saved for this pack in the user cache if there is one); ``pin_hot``:
        the fraction of slots whose hottest experts are never evicted. ``prefetch``: guess the next layer's
        experts during decode and read them early (never changes output; off by default because on the machines
        measured so far it did not pay, see BENCHMARKS.md). ``verify``: check each file's blake3 the first time it is
        read (dense files at load, each expert file on its first read; cost in RELIABILITY.md). ``keep_decode_set``: a
        prompt's expert reads go into the pool as first victims, and each layer's most used experts of the prompt are
        kept for the decode that follows (False: prompt reads are cached like decode's). ``reserve_tokens``: count the
        working memory of a context of that many tokens (KV cache, activations, scratch) inside the budget, taking it
        from the expert slots, so the whole process stays within the budget. ``stage``: load only a
        pipeline stage's layers (``moepack.runtime.distributed`` runs it)."""
        self.path = Path(path).expanduser()
        self.reader = PackReader(self.path, verify=verify)  # validates the manifest and config.json up front
        self.config = arch.text_config(self.reader.config)  # a multimodal wrapper's language model (Kimi K2.5)
        self.family = arch.family_for(self.config)
        self.compute_dtype = compute_dtype or memory.compute_dtype_for(self.reader)
        self.stage = stage or Stage.whole(arch.num_layers(self.config))
        budget = memory.parse_budget(memory_budget)
        self.working = memory.working_memory(self.reader, self.compute_dtype, io_threads)
        allowance = max(ACTIVATION_BYTES, (budget or memory.default_budget()) // 16)
        self.max_pass = max(256, min(MAX_PASS, allowance // self.working.act_per_token))
        need = memory.memory_need(self.reader, self.compute_dtype, stage)
        while reserve_tokens and budget and self.max_pass > 256 and \
                need.minimum + self.working.bytes(reserve_tokens, self.max_pass) > budget:
            self.max_pass //= 2  # a context that does not fit in one pass goes in several (each reads its experts)
        reserve = self.working.bytes(reserve_tokens, self.max_pass) if reserve_tokens else 0
        self.plan = plan_memory(self.reader, budget, self.compute_dtype, stage, reserve)
        mx.set_cache_limit(memory.MLX_CACHE_BYTES)  # freed buffers MLX keeps for reuse count against memory too
        hot = heat_keys(self.reader, heat)
        if isinstance(policy, str) or policy is None:
            policy = POLICIES[policy or DEFAULT_POLICY](need.experts)
        if pin_hot > 0 and hot:
            policy = PinnedPolicy(policy, set(hot[: int(pin_hot * self.plan.n_slots)]))
        self.store = ExpertStore(self.reader, self.plan.n_slots, self.compute_dtype, direct=direct_io,
                                 threads=io_threads, policy=policy, prefetch=prefetch, verify=verify,
                                 keep_decode_set=keep_decode_set, layers=self.stage.layers)
        self.tables: dict[str, TableStore] = {}
        try:
            self.model = module_for(self.family.name).Model(self.config, self.store)
            self.stage.drop_others(self.model)
            self._stream_tables(verify)
            self._load_dense()
        except BaseException:
            self.store.close()
            raise
        self._wire_prefetch()
        if hot:
            n = self.store.preload(hot)
            log.info("warm start: preloaded %d experts from the heat profile", n)
        self.compute_s = 0.0
        self.tokens_processed = 0
        log.info("loaded %s: %s, %d expert slots of %d bytes, dense %d bytes, reads %s", path, self.family.name,
                 self.plan.n_slots, self.plan.slot_bytes, self.plan.dense_bytes, self.store.io.mode)

    def _stream_tables(self, verify: bool) -> None:
        """Put a StreamedEmbedding where the model has a table the pack streams (this stage's only: the input embedding
        in the first, PLE tables in their layers' stages)."""
        for name, t in self.reader.tables.items():
            if not self.stage.owns(name):
                continue
            parent, _, leaf = self.model.module_paths(name)[0].rpartition(".")
            holder = dict(self.model.named_modules()).get(parent)
            want = getattr(holder[leaf], "weight", None) if holder is not None and leaf in holder else None
            if want is None or list(want.shape) != t.shape:
                raise PackError(f"{self.path}: table {name} {t.shape} is not an embedding of this "
                                f"{self.family.name} model ({None if want is None else list(want.shape)})")
            rows = self.plan.table_rows * arch.table_rows_per_token(self.config, name)  # PLE: one per n-gram head
            store = TableStore(self.reader, name, rows, self.compute_dtype, self.store.io, verify, self.store.executor)
            self.tables[name] = store
            setattr(holder, leaf, StreamedEmbedding(store))

    def _load_dense(self) -> None:
        weights = self.model.sanitize(self.reader.dense_weights(self.stage.owns))
        recs = {path: r for n, r in self.reader.manifest.dense.items() if r.encoding != "raw"
                for path in self.model.module_paths(n)}  # keyed by module path, as nn.quantize's predicate sees it

        def quantized(path: str, module: nn.Module):
            rec = recs.get(path)  # affine or mxfp4: MLX quantization modes of the same name
            return rec is not None and {"group_size": rec.group_size, "bits": rec.bits, "mode": rec.encoding}

        nn.quantize(self.model, class_predicate=quantized)
        try:
            self.model.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise PackError(f"{self.path}: dense weights do not match the {self.family.name} model: {e}") from e
        self.model.set_dtype(self.compute_dtype)
        # Routers stay float32 (as transformers keeps them): in bf16, near-tied experts could be chosen differently.
        keep = [(f"{path}.{k}", weights[f"{path}.{k}"].astype(mx.float32))
                for path, m in self.model.named_modules() if getattr(m, "float32", False)
                for k in m.parameters() if f"{path}.{k}" in weights
                and mx.issubdtype(weights[f"{path}.{k}"].dtype, mx.floating)]  # not a hash router's table
        if keep:
            self.model.load_weights(keep, strict=False)
        mx.eval(self.model.parameters())
        kernels.blas_for_many_rows(self.model)  # CPU only: prompts' matmuls through numpy's BLAS
        del weights
        self.reader.release()

    def moe_blocks(self) -> list[MoE]:
        """This engine's MoE blocks in layer order."""
        blocks = [m for _, m in self.model.named_modules() if isinstance(m, MoE)]
        return sorted(blocks, key=lambda m: m.experts.layer)

    def _wire_prefetch(self) -> None:
        """Give each MoE block the next MoE block's router, to guess (and read early) that layer's experts."""
        blocks = self.moe_blocks()
        for cur, nxt in zip(blocks, blocks[1:]):
            if nxt.by_token:  # a hash-routed layer reads its experts exactly, as it starts (MoE.prefetch)
                continue
            cur.experts.next_layer = nxt.experts.layer
            cur.experts.predict = nxt.router

    # ---- inference --------------------------------------------------------------------------
    def run(self, x: mx.array, cache: list | None, logits: Logits = "last", tokens: mx.array | None = None) -> mx.array:
        """One pass of this engine's stage: token ids [1, T] (the first stage) or hidden states (``hidden_shape``)
        through its layers, all T positions through a layer before the next; the last stage returns float32 logits
        [1, 1 or T, vocab] (the head runs only on the positions asked for). ``tokens``: the ids [1, T] where a later
        stage's layers route by them (``needs_tokens``)."""
        t0, io0 = time.perf_counter(), self.io_wait_s()
        st, m = self.stage, self.model
        h = m.embed(x) if st.first else x
        h = m.run_layers(h, cache, st.layers, tokens=x if st.first else tokens)
        if st.last:
            h = m.head(h if logits == "all" else h[:, -1:]).astype(mx.float32)
        mx.eval(h)
        self.compute_s += time.perf_counter() - t0 - (self.io_wait_s() - io0)
        self.tokens_processed += x.shape[1]
        return h

    def io_wait_s(self) -> float:
        """Seconds spent waiting for reads so far: expert files and table rows."""
        return self.store.counters.io_wait_s + sum(t.counters.io_wait_s for t in self.tables.values())

    def _pass(self, ids: list[int], cache: list | None, logits: Logits) -> np.ndarray:
        return np.array(self.run(mx.array([ids], dtype=mx.int32), cache, logits)[0])

    @property
    def needs_tokens(self) -> bool:
        """Whether the layers need the token ids besides the hidden state (every stage, not only the first)."""
        return self.model.routes_by_token

    def hidden_shape(self, tokens: int) -> tuple[int, ...]:
        """The hidden state one pipeline stage hands the next for ``tokens`` positions."""
        return self.model.hidden_shape(1, tokens)

    def working_memory(self, context: int) -> int:
        """Bytes beyond the budget a sequence of ``context`` tokens may take at peak (README "Memory")."""
        return self.working.bytes(context, self.max_pass)

    def make_cache(self) -> list:
        """Caches for this engine's layers (a pipeline stage's only)."""
        full = self.model.make_cache()
        return full if self.stage.count == 1 else [full[i] for i in self.stage.layers]

    def stats(self) -> dict:
        c = self.store.counters
        return {**c.as_dict(), "compute_s": self.compute_s, "tokens": self.tokens_processed,
                "slots": self.plan.n_slots, "slot_bytes": self.plan.slot_bytes, "expert_file_bytes": self.store.file_bytes,
                "io_threads": self.store.threads, "io_mode": self.store.io.mode,
                "table_cache_rows": self.plan.table_rows if self.tables else 0,
                "table_cache_bytes": sum(t.cache_bytes for t in self.tables.values()),
                **{f"table_{k}": v for k, v in self.table_counters().as_dict().items()}}

    def table_counters(self) -> TableCounters:
        """The streamed tables' read counters, summed over the tables."""
        total = TableCounters()
        for t in self.tables.values():
            for k, v in vars(t.counters).items():
                setattr(total, k, getattr(total, k) + v)
        return total

    def reset_counters(self) -> None:
        """Zero the expert store's and the tables' read counters (bench runs count from here)."""
        self.store.counters = type(self.store.counters)()
        for t in self.tables.values():
            t.counters = type(t.counters)()

    def close(self) -> None:
        self.store.close()


def load(path: str | Path, memory_budget: int | str | None = None, **kwargs) -> Engine:
    """Open a pack (``~`` expands) with a memory budget ("12GB", bytes, or None for 60% of available memory)."""
    return Engine(path, memory_budget=memory_budget, **kwargs)
