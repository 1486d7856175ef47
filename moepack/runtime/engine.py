"""Loading a pack and running it: ``moepack.load(path)`` -> :class:`Engine` with ``logits`` and ``generate``.

Follow one token: ``Engine.generate`` -> ``CausalLM.__call__`` (models/base.py) -> the family's MoE block
routes -> ``StreamedExperts`` asks ``ExpertStore.fetch`` (store.py) for slots -> misses are read by
``DirectReader.read_into`` (io.py) with one ``preadv`` per expert file.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moepack import arch
from moepack.errors import BudgetError, PackError
from moepack.formats.reader import PackReader
from moepack.runtime import memory
from moepack.runtime.models import module_for
from moepack.runtime.heat import heat_keys
from moepack.runtime.models.base import StreamedExperts
from moepack.runtime.sampling import Sampler, SamplingParams
from moepack.runtime.store import POLICIES, EvictionPolicy, ExpertStore, PinnedPolicy, slot_bytes

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512
ROUTER_F32 = re.compile(r"(\.gate\.weight|e_score_correction_bias)$")


@dataclass
class Plan:
    """How a budget is spent: dense weights resident, the rest as expert slots."""

    budget: int
    dense_bytes: int
    slot_bytes: int
    n_slots: int
    minimum: int


def plan_memory(reader: PackReader, budget: int | None, compute: mx.Dtype, stage=None) -> Plan:
    """``stage``: plan a pipeline stage's share only (its ``owns(name)`` dense tensors and MoE ``layers``)."""
    a = reader.manifest.architecture
    dense = sum(memory.resident_bytes(r, compute) for n, r in reader.manifest.dense.items() if stage is None or stage.owns(n))
    moe = [L for L in reader.moe_layers if stage is None or L in stage.layers]
    per_slot = slot_bytes(reader.expert_layout(moe[0]), compute) if moe else 0
    total_experts = len(moe) * a["num_experts"]
    minimum = dense + a["top_k"] * per_slot
    if budget is None:
        budget = max(minimum, memory.default_budget())
    if budget < minimum:
        raise BudgetError(
            f"memory budget {budget} bytes is too small for this pack: it needs at least {minimum} bytes "
            f"(dense weights {dense} + {a['top_k']} expert slots of {per_slot}); minimum budget: {minimum}",
            minimum,
        )
    n_slots = min(total_experts, (budget - dense) // per_slot) if per_slot else 0
    return Plan(budget, dense, per_slot, max(n_slots, a["top_k"] if per_slot else 0), minimum)


class Engine:
    def __init__(self, path: str | Path, memory_budget: int | str | None = None, compute_dtype: mx.Dtype | None = None,
                 direct_io: bool = True, io_threads: int = 8, policy: EvictionPolicy | str | None = None,
                 prefetch: bool = False, heat: str | Path | bool | None = True, pin_hot: float = 0.0,
                 verify: bool = False, stage=None):
        """``policy``: "lru" (default), "lfu" or an EvictionPolicy. ``heat``: a heat profile to warm-start the pool from (a path;
        True, the default, uses the one `moepack profile` saved for this pack in the user cache if there is one); ``pin_hot``:
        the fraction of slots whose hottest experts are never evicted. ``prefetch``: guess the next layer's
        experts during decode and read them early (never changes output; off by default because on the machines
        measured so far it did not pay, see BENCHMARKS.md). ``verify``: check each file's blake3 the first time it is
        read (dense files at load, each expert file on its first read; cost in RELIABILITY.md). ``stage``: load only a
        pipeline stage's layers (a ``runtime.distributed.Stage``; ``moepack.runtime.distributed`` runs it)."""
        self.path = Path(path)
        self.reader = PackReader(path, verify=verify)
        self.config = arch.text_config(self.reader.config)  # a multimodal wrapper's language model (Kimi K2.5)
        self.family = arch.family_for(self.config)
        self.compute_dtype = compute_dtype or memory.default_compute_dtype(self.reader.manifest.recipe.get("dtype", "float32"))
        self.stage = stage
        self.plan = plan_memory(self.reader, memory.parse_bytes(memory_budget), self.compute_dtype, stage)
        hot = heat_keys(self.reader, heat)
        if isinstance(policy, str) or policy is None:
            policy = POLICIES[policy or "lru"]()
        if pin_hot > 0 and hot:
            policy = PinnedPolicy(policy, set(hot[: int(pin_hot * self.plan.n_slots)]))
        self.store = ExpertStore(self.reader, self.plan.n_slots, self.compute_dtype, direct=direct_io,
                                 threads=io_threads, policy=policy, prefetch=prefetch, verify=verify,
                                 layers=stage.layers if stage is not None else None)
        try:  # config.json and the dense tensors are pack data: a mismatch is a bad pack, not a crash
            self.model = module_for(self.family.name).Model(self.config, self.store)
            if stage is not None:
                stage.trim(self.model)
            self._load_dense()
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
            self.store.close()
            raise PackError(f"{self.path}: the model cannot be built from this pack ({type(e).__name__}: {e})") from e
        self._wire_prefetch()
        if hot:
            n = self.store.preload(hot)
            log.info("warm start: preloaded %d experts from the heat profile", n)
        self.compute_s = 0.0
        self.tokens_processed = 0
        log.info("loaded %s: %s, %d expert slots of %d bytes, dense %d bytes, reads %s", path, self.family.name,
                 self.plan.n_slots, self.plan.slot_bytes, self.plan.dense_bytes, self.store.io.mode)

    def _load_dense(self) -> None:
        weights = self.model.sanitize(self.reader.dense_weights(self.stage.owns if self.stage is not None else None))
        recs = {self.model.rename(n)[: -len(".weight")]: r for n, r in self.reader.manifest.dense.items()
                if r.encoding != "raw"}  # keyed by module path, as nn.quantize's predicate sees it

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
        keep = [(k, v.astype(mx.float32)) for k, v in weights.items() if ROUTER_F32.search(k)]
        if keep:
            self.model.load_weights(keep, strict=False)
        mx.eval(self.model.parameters())
        del weights
        self.reader.release()

    def _wire_prefetch(self) -> None:
        """Give each MoE block the next MoE block's router, to guess (and read early) that layer's experts."""
        blocks = [m for _, m in self.model.named_modules() if isinstance(getattr(m, "experts", None), StreamedExperts)
                  and hasattr(m, "route")]
        blocks.sort(key=lambda m: m.experts.layer)
        for cur, nxt in zip(blocks, blocks[1:]):
            cur.experts.next_layer = nxt.experts.layer
            cur.experts.predict = nxt.route

    # ---- inference --------------------------------------------------------------------------
    def _forward(self, tokens: mx.array, cache) -> mx.array:
        t0 = time.perf_counter()
        io0 = self.store.counters.io_wait_s
        out = self.model(tokens, cache)
        mx.eval(out)
        self.compute_s += time.perf_counter() - t0 - (self.store.counters.io_wait_s - io0)
        self.tokens_processed += tokens.size
        return out

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Full forward pass without a cache: float32 [len(token_ids), vocab]."""
        out = self._forward(mx.array([list(token_ids)], dtype=mx.int32), None)
        return np.array(out[0].astype(mx.float32))

    def generate(self, token_ids: Sequence[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_tokens: Sequence[int] | None = None,
                 cache=None) -> Iterator[int]:
        """Yield up to ``max_tokens`` new token ids (stopping after a stop token), with a KV cache and chunked prefill."""
        if not token_ids:
            raise ValueError("generate needs at least one prompt token")
        sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed))
        cache = cache if cache is not None else self.make_cache()
        stops = set(stop_tokens or ())
        last = self.prefill(token_ids, cache)
        for _ in range(max_tokens):
            tok = sampler(last).token
            yield tok
            if tok in stops:
                return
            last = self.prefill([tok], cache)

    def make_cache(self) -> list:
        return self.model.make_cache()

    def prefill(self, token_ids: Sequence[int], cache) -> np.ndarray:
        """Append ``token_ids`` to ``cache`` (in chunks of PREFILL_CHUNK); float32 logits [vocab] of the last one.

        The step that every generation loop is built from (see moepack.runtime.generation).
        """
        ids = list(token_ids)
        for s in range(0, len(ids), PREFILL_CHUNK):
            logits = self._forward(mx.array([ids[s : s + PREFILL_CHUNK]], dtype=mx.int32), cache)
        return np.array(logits[0, -1].astype(mx.float32))

    def stats(self) -> dict:
        c = self.store.counters
        return {**c.as_dict(), "compute_s": self.compute_s, "tokens": self.tokens_processed,
                "slots": self.plan.n_slots, "slot_bytes": self.plan.slot_bytes, "expert_file_bytes": self.store.file_bytes,
                "io_threads": self.store.threads, "io_mode": self.store.io.mode}

    def close(self) -> None:
        self.store.close()


def load(path: str | Path, memory_budget: int | str | None = None, **kwargs) -> Engine:
    return Engine(path, memory_budget=memory_budget, **kwargs)
