"""The ``moepack`` command line: a thin layer over the library (convert, inspect, verify, generate, serve, chat, demo)."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from moepack.errors import MoepackError
from moepack.runtime.policy import DEFAULT_POLICY, POLICIES
from moepack.units import human_bytes, suggest_bytes


class _Group(click.Group):
    """Print moepack's own errors as one line and exit 1; tracebacks only with --debug."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MoepackError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="moepack")
@click.pass_context
def main(ctx, verbose: bool, debug: bool) -> None:
    """Run Mixture-of-Experts models larger than RAM: convert once, then generate, chat or serve."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="dtype of everything left unquantized (and of quantization scales).")
@click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4", show_default=True,
              help="Bits per weight of routed experts.")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--dense-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="8", show_default=True,
              help="Bits per weight of dense matrices (attention, shared experts, embeddings, lm_head).")
@click.option("--dense-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--no-quantize", is_flag=True, help="Keep every float tensor unquantized at --dtype.")
@click.option("--requantize", is_flag=True,
              help="Decode tensors the source ships quantized (INT4, MXFP4) and apply the recipe, instead of carrying "
                   "them losslessly.")
@click.option("--alignment", type=int, default=16384, show_default=True, help="Expert segment/file alignment in bytes.")
@click.option("--resident-embeddings", is_flag=True,
              help="Keep the input embedding with the dense weights instead of streaming its rows from a table "
                   "(writes a version 1 pack, which older moepack releases read).")
@click.option("--workers", type=int, help="Parallel worker processes (default: by job size and CPU count).")
@click.option("--force", is_flag=True, help="Convert again into an OUT that holds a pack or a different partial run.")
@click.option("--stream/--no-stream", default=None,
              help="For a hub repo id: download one shard at a time into OUT and delete each once converted, so the "
                   "disk holds the pack and a few shards (default: only when the disk cannot hold both in full).")
@click.option("--window", type=click.IntRange(1), default=2, show_default=True,
              help="With --stream: shards downloaded ahead of the converter.")
def convert(src, out, revision, dtype, q_bits, q_group_size, dense_bits, dense_group_size, no_quantize, requantize,
            alignment, resident_embeddings, workers, force, stream, window) -> None:
    """Convert a Hugging Face checkpoint (directory or hub repo id) SRC into a pack at OUT.

    Re-running the same command after an interruption resumes where it stopped.
    """
    from moepack.convert.pipeline import convert as run
    from moepack.convert.recipe import Recipe

    recipe = Recipe(dtype=dtype, quantize=not no_quantize, expert_bits=int(q_bits), expert_group_size=int(q_group_size),
                    dense_bits=int(dense_bits), dense_group_size=int(dense_group_size), alignment=alignment,
                    requantize=requantize, stream_tables=not resident_embeddings)
    t0 = time.perf_counter()
    try:
        path = run(src, out, recipe, revision=revision, workers=workers, force=force, stream=stream, window=window,
                   say=lambda msg: click.echo(msg, err=True))
    except KeyboardInterrupt:
        click.echo("\ninterrupted; re-run the same command to resume", err=True)
        sys.exit(130)
    click.echo(f"wrote {path} in {time.perf_counter() - t0:.1f}s")


@main.command()
@click.argument("pack", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--memory-budget", help="Show how this budget is split (default: 60% of available memory).")
def inspect(pack, as_json, memory_budget) -> None:
    """Show a pack's architecture, sizes, per-token read cost, recipe, and how a memory budget is split between
    expert slots and the table row cache."""
    from moepack.formats.reader import PackReader, summary
    from moepack.runtime import memory

    reader = PackReader(pack)
    s = summary(reader)
    need = memory.memory_need(reader, memory.compute_dtype_for(reader))
    budget = max(memory.parse_budget(memory_budget) or memory.default_budget(), need.minimum)
    slots, rows = need.split(budget)
    s["memory"] = {"minimum": need.minimum, "resident_dense": need.dense_bytes, "budget": budget,
                   "expert_slots": slots, "slot_bytes": need.slot_bytes, "expert_pool_bytes": slots * need.slot_bytes,
                   "table_cache_rows": rows, "table_cache_bytes": rows * need.row_bytes}
    if as_json:
        click.echo(json.dumps(s, indent=2, allow_nan=False))  # strict JSON: a pack's numbers are finite
        return
    a, b, p = s["architecture"], s["bytes"], s["parameters"]
    click.echo(f"{s['path']}  ({s['format']})")
    click.echo(f"  architecture   {a['family']} ({a['model_type']}), {a['num_layers']} layers, "
               f"{len(a['moe_layers'])} MoE layers x {a['num_experts']} experts, top-{a['top_k']}")
    click.echo(f"  parameters     {p['total']:,} total, {p['dense']:,} dense, {p['active_per_token']:,} active per token")
    click.echo(f"  size           {human_bytes(b['total'])} in {s['files']} files; dense {human_bytes(b['dense'])}, "
               f"experts {human_bytes(b['experts'])}" + (f", tables {human_bytes(b['tables'])}" if s["tables"] else ""))
    click.echo(f"  per expert     {human_bytes(b['per_expert'])} (one file each, aligned to {human_bytes(s['alignment'])})")
    click.echo(f"  per token      {human_bytes(b['per_token_uncached'])} read when no expert is cached"
               + (f", {human_bytes(b['table_per_token_uncached'])} from tables when no row is" if s["tables"] else ""))
    for name, t in s["tables"].items():
        click.echo(f"  table          {name} {t['shape'][0]:,} x {t['shape'][1]:,} {t['encoding']}, streamed: "
                   f"{human_bytes(t['bytes'])}, {t['row_bytes']:,} bytes a row, a missing row costs a read of "
                   f"{human_bytes(t['read_bytes'])} (its pages)")
    mem = s["memory"]
    rows = (f" and a table cache of {mem['table_cache_rows']:,} rows ({human_bytes(mem['table_cache_bytes'])})"
            if s["tables"] else "")
    click.echo(f"  memory         at least {human_bytes(mem['minimum'])} (dense {human_bytes(mem['resident_dense'])} "
               f"resident); a budget of {human_bytes(mem['budget'])} holds {mem['expert_slots']} expert slots "
               f"({human_bytes(mem['expert_pool_bytes'])}){rows}")
    r = s["recipe"]
    q = (f"experts {r['expert_bits']}-bit g{r['expert_group_size']}, dense {r['dense_bits']}-bit g{r['dense_group_size']}"
         if r["quantize"] else "unquantized")
    click.echo(f"  recipe         {q}, dtype {r['dtype']}")
    click.echo("  encodings      " + "; ".join(f"{k}: {v}" for k, v in s["encodings"].items()))
    click.echo(f"  source         {s['provenance'].get('source')} @ {s['provenance'].get('revision')}, "
               f"{s['provenance'].get('converter')}")


@main.command()
@click.argument("pack", type=click.Path(exists=True, file_okay=False))
def verify(pack) -> None:
    """Re-hash every file of PACK against its manifest; exit 0 only when all hold."""
    from tqdm import tqdm

    from moepack.formats.reader import PackReader

    reader = PackReader(pack)
    total = sum(f["length"] for f in reader.manifest.files.values())
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verifying", file=sys.stderr) as bar:
        report = reader.verify(progress=bar.update)
    if report.ok:
        click.echo(f"ok: {report.checked} files verified")
        return
    for p in report.problems:
        click.echo(f"BAD {p}", err=True)
    click.echo(f"{len(report.problems)} problem(s) in {pack}", err=True)
    sys.exit(2)


def _budget_option(f):
    return click.option("--memory-budget", help="Memory for weights (dense + expert slots): 8GB, 512MB, 12e9 (bytes) "
                        "or 60% (of available memory, within any container limit). Default: 60%.")(f)


def _verify_option(f):
    return click.option("--verify", is_flag=True, help="Check each file's blake3 against the manifest the first time "
                        "it is read; a corrupt expert fails only the request that needs it.")(f)


def _cache_options(f):
    """Expert-cache choices shared by generate, chat and serve (bench has its own)."""
    f = click.option("--prefetch/--no-prefetch", default=False, show_default=True,
                     help="Guess the next layer's experts during decode and read them early.")(f)
    return click.option("--policy", type=click.Choice(sorted(POLICIES)), default=DEFAULT_POLICY, show_default=True,
                        help="Which cached expert gives up its slot.")(f)


def _engine_options(verify: bool, policy: str, prefetch: bool) -> dict:
    """The engine options of generate, chat and serve: one set, for a local engine and every pipeline rank alike."""
    return {"verify": verify, "policy": policy, "prefetch": prefetch}


def _hosts_options(f):
    f = click.option("--rank-timeout", type=float, default=300.0, show_default=True,
                     help="With --hosts: seconds to wait for the other hosts in one step before giving up.")(f)
    return click.option("--hosts", help="Split the layers over several machines: mlx.launch's hostfile (JSON), or a "
                        "number of local processes. --memory-budget then applies to each host's share.")(f)


def _pipeline(pack, hosts, memory_budget, rank_timeout, **engine_kwargs):
    """With --hosts, relaunch this very command once per host and exit with its status. In a launched rank, join
    the pipeline: rank 0 gets its engine; the other ranks serve their layers until rank 0 is done, then exit.
    None when not distributed."""
    from moepack.runtime import distributed

    if not distributed.in_pipeline():
        if hosts and distributed.read_hosts(hosts)[0] > 1:  # one host: just run here
            sys.exit(distributed.launch(hosts, sys.argv[1:]))
        return None
    engine = distributed.start(pack, memory_budget, rank_timeout, **engine_kwargs)
    if engine is None:
        sys.exit(0)
    atexit.register(distributed.exit_hard_if_broken, engine)
    return engine


@main.command()
@click.argument("model")
@click.option("--hosts", help="Number of hosts, or mlx.launch's hostfile (JSON): plan a pack's split over hosts.")
@click.option("--memory-budget", "--memory-per-host", "budget",
              help="Each host's budget for weights, as --memory-budget on each rank (e.g. 72GB): shows how many "
                   "expert slots each host gets.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when MODEL is a repo id.")
@click.option("--out", "target", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where the pack would go: its free space is compared and its read speed measured.")
@click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4", show_default=True)
@click.option("--dense-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="8", show_default=True)
@click.option("--no-quantize", is_flag=True, help="Plan for every float tensor kept unquantized.")
@click.option("--window", type=click.IntRange(1), default=2, show_default=True, help="convert --stream's window.")
@click.option("--disk-gbps", type=float, help="Use this read speed (GB/s) instead of measuring the disk under --out.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(model, hosts, budget, revision, target, q_bits, dense_bits, no_quantize, window, disk_gbps, as_json) -> None:
    """Before converting or downloading: MODEL's pack size, memory, disk (with and without `convert --stream`) and a
    speed bound. MODEL is a hub repo id (only config, index and safetensors headers are fetched), a checkpoint
    directory or a pack.

    With --hosts: how a pack's layers split over several hosts (`generate|serve --hosts`) and what each host needs,
    from its manifest.json and config.json alone. The split balances each host's dense bytes plus the expert bytes
    a token reads on it.
    """
    if not hosts:
        from moepack.convert.plan import describe_plan, plan_model
        from moepack.convert.recipe import Recipe

        recipe = Recipe(quantize=not no_quantize, expert_bits=int(q_bits), dense_bits=int(dense_bits))
        p = plan_model(model, recipe, revision, Path(target), window, disk_gbps * 1e9 if disk_gbps else None)
        click.echo(json.dumps(p, indent=2) if as_json else describe_plan(p))
        return
    from moepack.formats.reader import PackReader
    from moepack.runtime.distributed import read_hosts, split_pack
    from moepack.runtime.distributed.split import describe, split_rows
    from moepack.units import parse_bytes

    pack = model
    n, names, _ = read_hosts(hosts)
    reader = PackReader(pack)
    p = split_pack(reader, n)
    rows = split_rows(p, names, parse_bytes(budget))
    if as_json:
        click.echo(json.dumps({"pack": str(reader.root), "hosts": n, "stages": rows}, indent=2))
        return
    click.echo(describe(reader, p, rows, parse_bytes(budget)))


@main.command()
@click.argument("pack", type=click.Path(exists=True, file_okay=False))
@click.option("-p", "--prompt", required=True, help="Prompt text ('-' reads standard input).")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--seed", type=int)
@_budget_option
@click.option("--chat", is_flag=True, help="Wrap the prompt in the pack's chat template as a user message.")
@click.option("--system", help="System message (needs --chat).")
@click.option("--stats", is_flag=True, help="End with throughput, memory and I/O figures.")
@_verify_option
@_cache_options
@_hosts_options
def generate(pack, prompt, max_tokens, temp, top_p, top_k, seed, memory_budget, chat, system, stats, verify, policy,
             prefetch, hosts,
             rank_timeout) -> None:
    """Generate text from PACK, streaming it to standard output.

    Generation stops at --max-tokens, an end-of-text token or the model's context, which it says on standard error.
    --system is a chat message, so it needs --chat. Ctrl-C stops quietly (exit status 130).
    """
    import moepack
    from moepack.errors import UsageError
    from moepack.runtime.generation import context_length, fit_to_context
    from moepack.runtime.sampling import check_options
    from moepack.runtime.tokenizer import Tokenizer

    check_options(temperature=temp, top_p=top_p, top_k=top_k, max_tokens=max_tokens)
    if system is not None and not chat:
        raise UsageError("--system is a chat message: add --chat (the prompt is then the user's message)")
    options = _engine_options(verify, policy, prefetch)
    engine = _pipeline(pack, hosts, memory_budget, rank_timeout, **options)  # before stdin: rank 0 reads it
    try:
        if prompt == "-":
            prompt = _read_stdin()
        if not prompt:
            raise UsageError("the prompt is empty; give some text with -p (or -p - to read standard input)")
        tok = Tokenizer(pack, verify=verify)  # validates the pack first (a checkpoint here is told to convert)
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = tok.encode_chat(messages)
        else:
            ids = tok.encode(prompt)
        engine = engine or moepack.load(pack, memory_budget=memory_budget, **options)
        context = context_length(engine.config)
        n = fit_to_context(len(ids), max_tokens, context)
        if _generate(engine, tok, ids, n, temp, top_p, top_k, seed, stats) == n and n < max_tokens:
            click.echo(f"[stopped at the model's context limit of {context} tokens]", err=True)
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(130)  # quiet: Ctrl-C is how a user stops a generation
    finally:
        if engine is not None:
            engine.close()  # with --hosts, this stops the other ranks


def _read_stdin() -> str:
    """Standard input as UTF-8 text; anything else is one line that says so."""
    from moepack.errors import UsageError

    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"standard input is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                         "convert it, e.g. with iconv -t UTF-8") from None


def _generate(engine, tok, ids, max_tokens, temp, top_p, top_k, seed, stats) -> int:
    """Stream up to ``max_tokens`` tokens; returns how many were generated, or -1 when an end-of-text token ended
    the text."""
    from moepack.runtime.tokenizer import StreamDecoder

    out = StreamDecoder(tok)
    t0 = time.perf_counter()
    first = None
    n, eos = 0, False
    for t in engine.generate(ids, max_tokens, temperature=temp, top_p=top_p, top_k=top_k, seed=seed,
                             stop_tokens=tok.eos_token_ids):
        if first is None:
            first = time.perf_counter()
        n += 1
        if t in tok.eos_token_ids:
            eos = True
            break
        click.echo(out.push(t), nl=False)
    click.echo(out.flush())
    if stats:
        _print_stats(engine, len(ids), n, t0, first)
    return -1 if eos else n


def _print_stats(engine, n_prompt: int, n_gen: int, t0: float, first: float | None) -> None:
    from moepack.runtime.memory import peak_rss

    end = time.perf_counter()
    s = engine.stats()
    prompt_s = (first or end) - t0
    gen_s = end - (first or end)
    tokens = max(s["tokens"], 1)
    table, cache = "", ""
    if s.get("table_cache_bytes"):  # the pack streams tables (SPEC 3.6): their share of reads and of the budget
        hits = f", row hit rate {s['table_hit_rate']:.1%}" if "table_hit_rate" in s else ""  # one process's
        table = f" + {human_bytes(s['table_bytes_read'] / tokens)}/token from tables{hits}"
        cache = (f" ({human_bytes(s['slots'] * s['slot_bytes'])}), table cache {s['table_cache_rows']} rows "
                 f"({human_bytes(s['table_cache_bytes'])})")
    click.echo(
        f"prompt: {n_prompt} tokens, {n_prompt / prompt_s if prompt_s else 0:.1f} tok/s | "
        f"generation: {n_gen} tokens, {(n_gen - 1) / gen_s if gen_s and n_gen > 1 else 0:.2f} tok/s | "
        f"peak memory {human_bytes(peak_rss())} | read {human_bytes(s['bytes_read'] / tokens)}/token{table} | "
        f"hit rate {s['hit_rate']:.1%} | I/O wait {s['io_wait_s']:.2f}s, compute {s['compute_s']:.2f}s ({s['io_mode']}) | "
        f"budget: {s.get('slots', '?')} expert slots{cache}",
        err=True,
    )


@main.command()
@click.argument("pack", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default accepts local connections only.")
@click.option("--port", type=int, default=8080, show_default=True)
@_budget_option
@click.option("--api-key", envvar="MOEPACK_API_KEY", help="Require 'Authorization: Bearer KEY' on every route "
              "but /health (also read from MOEPACK_API_KEY).")
@click.option("--model-id", "--served-model-name", "model_id", multiple=True,
              help="The model name replies report (default: the pack directory's name); repeat it to list aliases in "
                   "/v1/models. Requests may name any model: one is served.")
@click.option("--ctx-size", type=int, help="Context length in tokens (default: the model's).")
@click.option("--parallel", type=int, default=1, show_default=True,
              help="Requests decoded together, each step reading the experts they share once; the rest wait "
              "in the queue.")
@_verify_option
@_cache_options
@_hosts_options
def serve(pack, host, port, memory_budget, api_key, model_id, ctx_size, parallel, verify, policy, prefetch, hosts,
          rank_timeout) -> None:
    """Serve PACK over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    With --hosts, rank 0 (the first host) serves HTTP once every host has loaded its layers.
    """
    from moepack.serve.app import serve as run

    empty_env = api_key is None and os.environ.get("MOEPACK_API_KEY", "unset").strip() == ""
    if empty_env or (api_key is not None and not api_key.strip()):  # an unset shell variable in --api-key "$KEY"
        raise click.UsageError("the API key is empty (--api-key or MOEPACK_API_KEY): give a key, or set neither to "
                               "serve without authentication")
    options = _engine_options(verify, policy, prefetch)
    engine = _pipeline(pack, hosts, memory_budget, rank_timeout, **options)
    click.echo(f"loading {pack} (GET /health answers 503 until it is ready)", err=True)
    try:
        run(pack, host=host, port=port, memory_budget=memory_budget, api_key=api_key, model_id=model_id,
            context_length=ctx_size, parallel=parallel,
            log_level="info" if logging.getLogger().isEnabledFor(logging.INFO) else "warning",
            announce=lambda msg: click.echo(msg, err=True), engine=engine,
            load_kwargs=options)
    except KeyboardInterrupt:  # uvicorn has shut down cleanly, then re-raised the Ctrl-C: exit as a shell expects
        sys.exit(130)


@main.command()
@click.argument("pack", type=click.Path(exists=True, file_okay=False))
@click.option("--system", help="System message.")
@click.option("--temp", type=float, default=0.7, show_default=True, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int)
@click.option("--max-tokens", type=int, default=1024, show_default=True, help="Longest reply, in tokens.")
@_budget_option
@_verify_option
@_cache_options
def chat(pack, system, temp, top_p, seed, max_tokens, memory_budget, verify, policy, prefetch) -> None:
    """Chat with PACK in the terminal; /help lists the commands."""
    import moepack
    from moepack.runtime.sampling import SamplingParams
    from moepack.runtime.tokenizer import Tokenizer
    from moepack.serve.chat import ChatSession, repl

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    tok = Tokenizer(pack, verify=verify)
    if not tok.chat_template:
        raise click.ClickException("this pack has no chat template; use `moepack generate` with a plain prompt")
    click.echo(f"loading {pack} ...", err=True)
    engine = moepack.load(pack, memory_budget=memory_budget, verify=verify, policy=policy, prefetch=prefetch)
    session = ChatSession(engine, tok, system, SamplingParams(temperature=temp, top_p=top_p, seed=seed), max_tokens)
    try:
        repl(session)
    finally:
        engine.close()


@main.command()
@click.argument("pack", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt-tokens", type=int, default=64, show_default=True)
@click.option("--gen-tokens", type=int, default=32, show_default=True)
@_budget_option
@click.option("--policy", type=click.Choice(sorted(POLICIES)), default=DEFAULT_POLICY, show_default=True)
@click.option("--prefetch/--no-prefetch", default=False, show_default=True, help="Read guessed next-layer experts early.")
@click.option("--io-threads", type=int, default=8, show_default=True)
@click.option("--io-only", is_flag=True, help="Judge the read path only: replay a short decode's expert fetches.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of latency per token and hit rate.")
@click.option("--prompt-only", is_flag=True, help="Only the long-prompt runs (prefill, then 32 decode tokens).")
def bench(pack, prompt_tokens, gen_tokens, memory_budget, policy, prefetch, io_threads, io_only, as_json, plot,
          prompt_only) -> None:
    """Measure PACK: a prompt of --prompt-tokens (prefill tok/s, time to first token, bytes read against the distinct
    experts it touched, peak memory, the decode hit rate after it), then decode cold and warm (tok/s, ms/token split,
    bytes per token, hit rate) beside the device's own bandwidth."""
    from moepack.runtime.bench import bench as run
    from moepack.runtime.bench import describe
    from moepack.runtime.bench import plot as draw

    r = run(pack, prompt_tokens, gen_tokens, memory_budget, policy, prefetch, io_threads, io_only_mode=io_only,
            prompt_only=prompt_only)
    if plot and "per_token" in r:
        draw(r, plot)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(describe(r))


@main.command()
@click.argument("pack", type=click.Path(exists=True, file_okay=False))
@click.option("--prompts", type=click.File("r"), required=True, help="Text file, one prompt per line.")
@click.option("--max-tokens", type=int, default=32, show_default=True, help="Tokens generated per prompt.")
@_budget_option
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write the profile (default: the user cache).")
@click.option("--into-pack", is_flag=True, help="Write heat.json into the pack itself (it must be writable).")
def profile(pack, prompts, max_tokens, memory_budget, out, into_pack) -> None:
    """Record which experts a workload uses, so later runs warm-start from it (`--heat` elsewhere)."""
    import moepack
    from moepack.runtime import heat
    from moepack.runtime.tokenizer import Tokenizer

    tok = Tokenizer(pack)
    engine = moepack.load(pack, memory_budget=memory_budget)
    lines = [line.strip() for line in prompts if line.strip()]
    for i, text in enumerate(lines, 1):
        ids = tok.encode_chat([{"role": "user", "content": text}]) if tok.chat_template else tok.encode(text)
        for _ in engine.generate(ids, max_tokens, stop_tokens=tok.eos_token_ids):
            pass
        click.echo(f"{i}/{len(lines)} prompts", err=True)
    path = heat.save(engine.reader, engine.store.heat, Path(out) if out else None, into_pack=into_pack)
    click.echo(f"wrote the heat of {len(engine.store.heat)} experts to {path}")


@main.command("eval")
@click.argument("pack", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 text to score ('-' is not accepted: perplexity needs the whole text).")
@click.option("--context", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per window (each scored token sees at most context-1 before it).")
@click.option("--stride", type=click.IntRange(min=1), help="Tokens between window starts (default: context/2).")
@click.option("--max-text-tokens", type=click.IntRange(min=2), help="Score only the first N tokens of the text.")
@_budget_option
@_cache_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_(pack, text_file, context, stride, max_text_tokens, memory_budget, policy, prefetch, as_json) -> None:
    """Perplexity of PACK over a text file, in sliding windows (transformers' perplexity-guide windowing)."""
    import moepack
    from moepack.runtime.evaluate import perplexity
    from moepack.runtime.tokenizer import Tokenizer

    if stride is not None and stride > context:
        raise click.BadParameter(f"--stride {stride} is larger than --context {context}", param_hint="--stride")
    ids = Tokenizer(pack).encode(Path(text_file).read_text(encoding="utf-8", errors="strict"))
    ids = ids[:max_text_tokens] if max_text_tokens else ids
    if len(ids) < 2:
        raise click.ClickException(f"{text_file} has fewer than 2 tokens: nothing to score")
    with moepack.load(pack, memory_budget=memory_budget, **_engine_options(False, policy, prefetch)) as engine:
        r = perplexity(engine, ids, context=context, stride=stride)
    if as_json:
        click.echo(json.dumps(r.as_dict()))
        return
    from moepack.units import human_bytes

    click.echo(f"perplexity {r.perplexity:.4f} over {r.scored_tokens} tokens (context {r.context}, stride {r.stride}, "
               f"{r.windows} windows)")
    click.echo(f"{r.tokens_per_s:.1f} tok/s through the model, {human_bytes(r.bytes_read)} of experts read "
               f"({human_bytes(r.bytes_per_token)}/token)")


@main.command()
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Where to put the demo pack (default: ~/.cache/moepack/demo).")
@click.option("--max-tokens", type=int, default=60, show_default=True)
def demo(workdir, max_tokens) -> None:
    """Convert the small MoE shipped with moepack, verify it and generate from it with experts streamed from disk.

    No network needed. The model (5M parameters, 16 experts, top-2) was trained on Vim's help files: it continues
    text in their style; it is a toy, not an assistant.
    """
    from moepack.convert.pipeline import convert as run
    from moepack.demo import DEMO_MODEL, DEMO_PROMPT, NEXT_STEPS, demo_generate, minimum_budget

    root = Path(workdir or Path.home() / ".cache" / "moepack" / "demo")
    pack = root / "pack"
    click.echo(f"1/4 the demo model: a Qwen3-MoE trained on Vim's help files ({DEMO_MODEL})")
    click.echo(f"2/4 converting it to {pack}")
    run(str(DEMO_MODEL), pack, force=True, progress=False)
    ctx = click.get_current_context()
    click.echo("3/4 inspecting and verifying")
    ctx.invoke(inspect, pack=str(pack), as_json=False)
    from moepack.formats.reader import PackReader

    rep = PackReader(pack).verify()
    click.echo(f"  verify         {'ok' if rep.ok else rep.problems}")
    budget = minimum_budget(pack)  # the smallest budget: experts really stream from disk
    click.echo(f"4/4 generating with a memory budget of {human_bytes(budget)} (--memory-budget {suggest_bytes(budget)}: "
               "the dense weights + one layer's experts, so experts stream from disk):")
    demo_generate(pack, budget, DEMO_PROMPT, max_tokens, lambda text, nl: click.echo(text, nl=nl))
    click.echo(NEXT_STEPS)


if __name__ == "__main__":
    main()
