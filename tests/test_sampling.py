"""Sampling (penalties, truncations, logprobs) and request-level generation (prefix cache, stop strings,
interruption) in moepack.runtime: exact numbers on hand-made logits, and the tiny pack for the KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from moepack.runtime.generation import Generation, PromptCache, TextStream, held_back
from moepack.runtime.sampling import Sampler, SamplingParams, log_softmax


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    s = Sampler(SamplingParams(repetition_penalty=2.0), prompt=[0, 1])
    z = s.penalize(np.array([2.0, -2.0, 1.0, 0.5]))
    np.testing.assert_allclose(z, [1.0, -4.0, 1.0, 0.5])
    s.counts[3] += 1  # generated tokens count too
    np.testing.assert_allclose(s.penalize(np.array([2.0, -2.0, 1.0, 0.5])), [1.0, -4.0, 1.0, 0.25])


def test_presence_and_frequency_penalties_see_only_the_output():
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[1])
    s.counts.update([0, 0, 2])
    z = s.penalize(np.array([3.0, 3.0, 3.0, 3.0]))
    np.testing.assert_allclose(z, [3.0 - 0.5 - 0.5, 3.0, 3.0 - 0.5 - 0.25, 3.0])


def test_greedy_follows_the_penalized_logits():
    logits = np.array([5.0, 4.9, 0.0])
    s = Sampler(SamplingParams(frequency_penalty=1.0))
    assert [s(logits).token for _ in range(3)] == [0, 1, 0]  # 5-1 < 4.9, then 4.9-1 < 4
    assert [Sampler(SamplingParams())(logits).token for _ in range(3)] == [0, 0, 0]


def test_min_p_keeps_tokens_near_the_best():
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.2))
    q = s.probs(np.log(np.array([0.5, 0.3, 0.15, 0.05])))
    np.testing.assert_allclose(q, np.array([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_top_k_and_top_p():
    z = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    np.testing.assert_allclose(Sampler(SamplingParams(temperature=1.0, top_k=2)).probs(z), [4 / 7, 3 / 7, 0, 0])
    np.testing.assert_allclose(Sampler(SamplingParams(temperature=1.0, top_p=0.65)).probs(z), [4 / 7, 3 / 7, 0, 0])


def test_same_draws_for_a_seed():
    logits = np.random.default_rng(0).standard_normal(50)
    again = Sampler(SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7))
    s2 = Sampler(SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7))
    assert [again(logits).token for _ in range(20)] == [s2(logits).token for _ in range(20)]


def test_logprobs_are_the_models_own():
    logits = np.array([1.0, 3.0, 2.0, -1.0])
    out = Sampler(SamplingParams(logprobs=2, repetition_penalty=5.0), prompt=[1])(logits)
    lp = log_softmax(logits)
    assert out.token == 2 and out.logprob == pytest.approx(lp[2])  # chosen after the penalty...
    assert [t for t, _ in out.top] == [1, 2] and out.top[0][1] == pytest.approx(lp[1])  # ...logprobs before it
    assert Sampler(SamplingParams())(logits).logprob is None


def test_text_stream_holds_back_and_cuts_stop_strings():
    assert held_back("abc<to", ["<tool>"]) == 3 and held_back("abc", ["<tool>"]) == 0

    class Chars:  # a tokenizer whose tokens are characters
        eos_token_ids = set()

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    ts = TextStream(Chars(), stop=["END", "xyz"])
    out = [ts.push(ord(c)) for c in "ab EN"]
    assert "".join(out) == "ab " and ts.pending == "EN"
    assert ts.push(ord("D")) == "" and ts.stopped and ts.text == "ab "
    ts = TextStream(Chars(), stop=["END"])
    assert "".join(ts.push(ord(c)) for c in "ab EN") + ts.flush() == "ab EN"  # not a stop after all


def run(gen: Generation) -> list[int]:
    return [s.token for s in gen]


def test_prefix_cache_reuse_matches_a_fresh_run(ref):
    engine, tok = ref
    a = tok.encode("Once upon a time there was a small laptop")
    b = a + tok.encode(" that wanted to run a model")
    cache = PromptCache(2)
    first = Generation(engine, a, 6, SamplingParams(), (), *cache.take(a, engine.make_cache))
    out_a = run(first)
    cache.put(first.tokens, first.cache)
    assert len(first.tokens) == len(a) + 5 and all(c.offset == len(first.tokens) for c in first.cache)
    c, reused = cache.take(b, engine.make_cache)
    assert reused == len(a)  # the generated tokens differ from b's continuation: only the prompt is shared
    second = Generation(engine, b, 6, SamplingParams(), (), c, reused)
    assert run(second) == run(Generation(engine, b, 6))
    assert out_a == run(Generation(engine, a, 6))
    cache.put(second.tokens, second.cache)
    c, reused = cache.take(b, engine.make_cache)
    assert reused == len(b) - 1  # a whole cached prompt: the last token is fed again for its logits


def test_interrupted_generation_leaves_a_usable_cache(ref):
    engine, tok = ref
    prompt = tok.encode("The quick brown fox jumps")

    class Flaky:  # the engine, but the 4th forward pass is interrupted after it has written the KV cache
        def __init__(self):
            self.calls = 0

        def make_cache(self):
            return engine.make_cache()

        def forward(self, ids, cache, logits="last"):
            self.calls += 1
            out = engine.forward(ids, cache, logits)
            if self.calls == 4:
                raise KeyboardInterrupt
            return out

    gen = Generation(Flaky(), prompt, 10)
    with pytest.raises(KeyboardInterrupt):
        run(gen)
    assert gen.cache[0].offset == len(gen.tokens) + 1  # ahead of what is known good
    gen.settle()
    assert all(c.offset == len(gen.tokens) for c in gen.cache) and len(gen.tokens) == len(prompt) + 2
    cache = PromptCache(1)
    cache.put(gen.tokens, gen.cache)
    c, reused = cache.take(gen.tokens, engine.make_cache)
    resumed = run(Generation(engine, gen.tokens, 5, SamplingParams(), (), c, reused))
    assert resumed == run(Generation(engine, gen.tokens, 5))


def test_stop_tokens_and_length(ref):
    engine, tok = ref
    prompt = tok.encode("Hello")
    free = run(Generation(engine, prompt, 6))
    gen = Generation(engine, prompt, 6, stop_tokens=[free[2]])
    assert run(gen) == free[: free.index(free[2]) + 1] and gen.finish_reason == "stop"
    gen = Generation(engine, prompt, 4)
    assert len(run(gen)) == 4 and gen.finish_reason == "length"
