"""One rank of a pipeline under test: tests/test_distributed.py starts this as several local processes (ring backend
over loopback, via ``distributed.spawn_local``).

    python pipeline_rank.py SCENARIOS OUT PACK [PACK_OF_RANK_1 ...]

Rank 0 runs the comma-separated SCENARIOS on its PipelineEngine and writes what it saw to ``OUT/result.json`` and
``OUT/*.npy``; the other ranks serve their layers. Where a scenario needs the test to act (break a file, kill a
rank), rank 0 writes ``OUT/<step>.ready`` and waits for ``OUT/<step>.go``. Every rank runs at its share's minimum
memory budget, so experts really stream from disk on every host.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from moepack.formats.reader import PackReader
from moepack.runtime import distributed
from moepack.runtime.generation import Generation, PromptCache

PROMPT = [3, 17, 42, 99, 7, 128, 5, 61, 200, 11, 36, 250]
SECOND_TURN = PROMPT[:8] + [1, 2, 3]  # shares 8 tokens with the first turn: its cache is trimmed, then reused
STALL_TIMEOUT = 2.0


def conversation(engine) -> list[dict]:
    """Two turns as the server runs them (Generation + PromptCache): the second trims and reuses the first's cache."""
    prompts, turns = PromptCache(2), []
    for prompt in (PROMPT, SECOND_TURN):
        cache, reused = prompts.take(prompt, engine.make_cache)
        g = Generation(engine, prompt, 4, cache=cache, reused=reused)
        turns.append({"tokens": [s.token for s in g], "reused": reused})
        g.settle()
        prompts.put(g.tokens, g.cache)
    return turns


def step(out: Path, name: str) -> None:
    (out / f"{name}.ready").touch()
    deadline = time.monotonic() + 60
    while not (out / f"{name}.go").exists():
        if time.monotonic() > deadline:
            sys.exit(f"the test never released step {name!r}")
        time.sleep(0.02)


def attempt(fn) -> dict:
    t0 = time.perf_counter()
    try:
        fn()
        return {"error": None, "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        return {"error": type(e).__name__, "message": str(e), "seconds": time.perf_counter() - t0}


def parity(engine, out: Path, res: dict) -> None:
    np.save(out / "logits.npy", engine.logits(PROMPT))
    res["greedy"] = list(engine.generate(PROMPT, 8))
    res["conversation"] = conversation(engine)
    s = engine.stats()
    res["stats"] = {k: s[k] for k in ("ranks", "tokens", "hits", "misses")} | {"per_rank": s["per_rank"]}


def faults(engine, out: Path, res: dict) -> None:
    step(out, "break")  # the test hides the last layer's expert files: the last rank cannot read them
    res["broken"] = attempt(lambda: engine.logits(PROMPT)) | {"healthy": engine.healthy}
    step(out, "mend")  # ...and puts them back
    np.save(out / "mended.npy", engine.logits(PROMPT))
    res["mended_healthy"] = engine.healthy
    step(out, "kill")  # the test kills the last rank
    res["killed"] = attempt(lambda: list(engine.generate(PROMPT, 4))) | {"healthy": engine.healthy}
    res["after"] = attempt(lambda: engine.logits(PROMPT))


def stall(engine, out: Path, res: dict) -> None:
    step(out, "stall")  # the test freezes the last rank (SIGSTOP): alive, connected, silent
    res["stalled"] = attempt(lambda: engine.logits(PROMPT)) | {"healthy": engine.healthy}


SCENARIOS = {"parity": parity, "faults": faults, "stall": stall}


def main() -> None:
    scenarios, out, packs = sys.argv[1].split(","), Path(sys.argv[2]), sys.argv[3:]
    rank, size = int(os.environ["MLX_RANK"]), len(json.load(open(os.environ["MLX_HOSTFILE"])))
    pack = packs[rank % len(packs)]
    budget = distributed.split_pack(PackReader(pack), size).shares[rank].minimum if Path(pack).is_dir() else None
    timeout = STALL_TIMEOUT if "stall" in scenarios else 60.0
    res: dict = {}
    try:
        engine = distributed.start(pack, memory_budget=budget, timeout=timeout, heat=False)
    except distributed.PipelineError as e:
        (out / f"error.{rank}.txt").write_text(str(e))
        sys.exit(3)
    if engine is None:  # ranks > 0 served until rank 0 closed the pipeline
        return
    try:
        res["plan"] = {"dense_bytes": engine.plan.dense_bytes, "n_slots": engine.plan.n_slots}
        for name in scenarios:
            SCENARIOS[name](engine, out, res)
    finally:
        (out / "result.json").write_text(json.dumps(res))
        engine.close()


if __name__ == "__main__":
    main()
