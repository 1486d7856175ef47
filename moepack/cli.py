"""The ``moepack`` command line: a thin layer over the library (convert, inspect, verify, generate, demo)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from moepack.errors import MoepackError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


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
@click.option("--no-quantize", is_flag=True, help="Keep every tensor unquantized at --dtype.")
@click.option("--alignment", type=int, default=16384, show_default=True, help="Expert segment/file alignment in bytes.")
@click.option("--workers", type=int, help="Parallel worker processes (default: by job size and CPU count).")
@click.option("--force", is_flag=True, help="Convert again into an OUT that holds a pack or a different partial run.")
def convert(src, out, revision, dtype, q_bits, q_group_size, dense_bits, dense_group_size, no_quantize, alignment,
            workers, force) -> None:
    """Convert a Hugging Face checkpoint (directory or hub repo id) SRC into a pack at OUT.

    Re-running the same command after an interruption resumes where it stopped.
    """
    from moepack.convert.pipeline import convert as run
    from moepack.convert.recipe import Recipe

    recipe = Recipe(dtype=dtype, quantize=not no_quantize, expert_bits=int(q_bits), expert_group_size=int(q_group_size),
                    dense_bits=int(dense_bits), dense_group_size=int(dense_group_size), alignment=alignment)
    t0 = time.perf_counter()
    path = run(src, out, recipe, revision=revision, workers=workers, force=force)
    click.echo(f"wrote {path} in {time.perf_counter() - t0:.1f}s")


@main.command()
@click.argument("pack", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(pack, as_json) -> None:
    """Show a pack's architecture, sizes, per-token read cost and recipe."""
    from moepack.formats.reader import PackReader, summary

    s = summary(PackReader(pack))
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    a, b, p = s["architecture"], s["bytes"], s["parameters"]
    click.echo(f"{s['path']}  ({s['format']})")
    click.echo(f"  architecture   {a['family']} ({a['model_type']}), {a['num_layers']} layers, "
               f"{len(a['moe_layers'])} MoE layers x {a['num_experts']} experts, top-{a['top_k']}")
    click.echo(f"  parameters     {p['total']:,} total, {p['dense']:,} dense, {p['active_per_token']:,} active per token")
    click.echo(f"  size           {_human(b['total'])} in {s['files']} files; dense {_human(b['dense'])}, "
               f"experts {_human(b['experts'])}")
    click.echo(f"  per expert     {_human(b['per_expert'])} (one file each, aligned to {_human(s['alignment'])})")
    click.echo(f"  per token      {_human(b['per_token_uncached'])} read when no expert is cached")
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
    return click.option("--memory-budget", help="Bytes for weights (dense + expert slots), e.g. 8GB. "
                        "Default: 60% of available memory.")(f)


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
@click.option("--system", help="System message (with --chat).")
@click.option("--stats", is_flag=True, help="End with throughput, memory and I/O figures.")
def generate(pack, prompt, max_tokens, temp, top_p, top_k, seed, memory_budget, chat, system, stats) -> None:
    """Generate text from PACK, streaming it to standard output."""
    import moepack
    from moepack.runtime.tokenizer import StreamDecoder, Tokenizer

    if prompt == "-":
        prompt = sys.stdin.read()
    tok = Tokenizer(pack)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages)
    else:
        ids = tok.encode(prompt)
    engine = moepack.load(pack, memory_budget=memory_budget)
    out = StreamDecoder(tok)
    t0 = time.perf_counter()
    first = None
    n = 0
    for t in engine.generate(ids, max_tokens, temperature=temp, top_p=top_p, top_k=top_k, seed=seed,
                             stop_tokens=tok.eos_token_ids):
        if first is None:
            first = time.perf_counter()
        n += 1
        if t in tok.eos_token_ids:
            break
        click.echo(out.push(t), nl=False)
    click.echo(out.flush())
    if stats:
        _print_stats(engine, len(ids), n, t0, first)


def _print_stats(engine, n_prompt: int, n_gen: int, t0: float, first: float | None) -> None:
    from moepack.runtime.memory import peak_rss

    end = time.perf_counter()
    s = engine.stats()
    prompt_s = (first or end) - t0
    gen_s = end - (first or end)
    tokens = max(s["tokens"], 1)
    click.echo(
        f"prompt: {n_prompt} tokens, {n_prompt / prompt_s if prompt_s else 0:.1f} tok/s | "
        f"generation: {n_gen} tokens, {(n_gen - 1) / gen_s if gen_s and n_gen > 1 else 0:.2f} tok/s | "
        f"peak memory {_human(peak_rss())} | read {_human(s['bytes_read'] / tokens)}/token | "
        f"hit rate {s['hit_rate']:.1%} | I/O wait {s['io_wait_s']:.2f}s, compute {s['compute_s']:.2f}s ({s['io_mode']})",
        err=True,
    )


@main.command()
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Where to put the demo checkpoint and pack (default: ~/.cache/moepack/demo).")
@click.option("--max-tokens", type=int, default=24, show_default=True)
def demo(workdir, max_tokens) -> None:
    """Build a tiny Qwen3-MoE checkpoint with RANDOM weights, convert it, verify it and generate from it.

    No network needed. The weights are random, so the generated text is gibberish: the demo shows the path
    (convert -> inspect -> verify -> stream experts from disk), not a useful model.
    """
    from moepack.convert.pipeline import convert as run
    from moepack.demo import write_checkpoint

    root = Path(workdir or Path.home() / ".cache" / "moepack" / "demo")
    ckpt, pack = root / "checkpoint", root / "pack"
    click.echo(f"1/4 writing a small Qwen3-MoE checkpoint with random weights to {ckpt}")
    write_checkpoint(ckpt)
    click.echo(f"2/4 converting it to {pack}")
    run(str(ckpt), pack, force=True, progress=False)
    ctx = click.get_current_context()
    click.echo("3/4 inspecting and verifying")
    ctx.invoke(inspect, pack=str(pack), as_json=False)
    from moepack.formats.reader import PackReader

    rep = PackReader(pack).verify()
    click.echo(f"  verify         {'ok' if rep.ok else rep.problems}")
    budget = None
    import moepack

    probe = moepack.load(pack)
    budget = probe.plan.minimum  # the smallest budget: experts really stream from disk
    probe.close()
    click.echo(f"4/4 generating with a memory budget of {budget} bytes (dense + one layer's experts); "
               "random weights, so expect gibberish:")
    ctx.invoke(generate, pack=str(pack), prompt="Hello! Tell me about experts.", max_tokens=max_tokens, temp=0.8,
               top_p=0.95, top_k=0, seed=0, memory_budget=str(budget), chat=True, system=None, stats=True)


if __name__ == "__main__":
    main()
