"""Which cached expert gives up its slot: the eviction policies the expert store (store.py) can use."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Protocol

import numpy as np

Key = tuple[int, int]  # (layer, expert)


class EvictionPolicy(Protocol):
    """Chooses which resident expert gives up its slot. The performance work swaps implementations."""

    def touch(self, key: Key) -> None: ...
    def insert(self, key: Key, cold: bool = False) -> None: ...  # cold: the next victim (a prompt's one-off read)
    def remove(self, key: Key) -> None: ...
    def victim(self, pinned: set[Key]) -> Key: ...


class LRUPolicy:
    """Evict the least recently used expert."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order.move_to_end(key)

    def insert(self, key: Key, cold: bool = False) -> None:
        self._order[key] = None
        if cold:
            self._order.move_to_end(key, last=False)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, pinned: set[Key]) -> Key:
        for key in self._order:
            if key not in pinned:
                return key
        raise RuntimeError("every slot is pinned")


class LFUPolicy:
    """Evict the least frequently used expert, with ageing so old popularity fades.

    Counts halve every ``period`` accesses. The victim is the lowest count among ``sample`` random residents
    (the approximation Redis uses): O(1) per miss instead of a scan of every slot.
    """

    name = "lfu"

    def __init__(self, period: int = 4096, sample: int = 16, seed: int = 0) -> None:
        self.count: dict[Key, float] = {}
        self._keys: list[Key] = []
        self._index: dict[Key, int] = {}
        self.period, self.sample = period, sample
        self._n = 0
        self._rng = np.random.default_rng(seed)

    def _tick(self) -> None:
        self._n += 1
        if self._n % self.period == 0:
            for k in self.count:
                self.count[k] /= 2

    def touch(self, key: Key) -> None:
        self.count[key] = self.count.get(key, 0.0) + 1
        self._tick()

    def insert(self, key: Key, cold: bool = False) -> None:
        self._index[key] = len(self._keys)
        self._keys.append(key)
        if not cold:  # a cold key enters with the count it had (its history), not one more use
            self.touch(key)

    def remove(self, key: Key) -> None:
        i = self._index.pop(key, None)
        if i is None:
            return
        last = self._keys.pop()
        if last != key:
            self._keys[i] = last
            self._index[last] = i
        # the count stays: an expert that comes back keeps its history (ageing still applies)

    def victim(self, pinned: set[Key]) -> Key:
        n = len(self._keys)
        cand = [self._keys[i] for i in self._rng.integers(0, n, size=min(self.sample, n))]
        cand = [k for k in cand if k not in pinned] or [k for k in self._keys if k not in pinned]
        if not cand:
            raise RuntimeError("every slot is pinned")
        return min(cand, key=lambda k: self.count.get(k, 0.0))


class PinnedPolicy:
    """Never evict a fixed hot set (from a heat profile); everything else is handled by ``inner``."""

    def __init__(self, inner: EvictionPolicy, hot: set[Key]) -> None:
        self.inner, self.hot = inner, hot
        self.name = f"{getattr(inner, 'name', 'custom')}+pinned"

    def touch(self, key: Key) -> None:
        self.inner.touch(key)

    def insert(self, key: Key, cold: bool = False) -> None:
        self.inner.insert(key, cold)

    def remove(self, key: Key) -> None:
        self.inner.remove(key)

    def victim(self, pinned: set[Key]) -> Key:
        try:
            return self.inner.victim(pinned | self.hot)
        except RuntimeError:  # only hot experts left unpinned: give one up rather than fail
            return self.inner.victim(pinned)


# name -> a policy for a pool over ``experts`` routed experts (all MoE layers). LFU's counts halve every 2 x experts
# accesses: on the trained demo model this read fewer bytes per token than LRU and than LFU with a fixed period
# (64 to 16384 accesses) at every budget measured (tools/bench_policy.py, BENCHMARKS.md).
POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": lambda experts: LRUPolicy(),
    "lfu": lambda experts: LFUPolicy(period=max(1, 2 * experts)),
}
DEFAULT_POLICY = "lfu"  # chosen on learned routing: the trained demo model (BENCHMARKS.md)
