"""Train the demo model that ``moepack demo`` ships: a small Qwen3-MoE on Vim's documentation, on two CPU cores.

Why: every quality and caching figure measured on random weights has random routing. A model with learned routing,
small enough to live in the repository, lets ``moepack demo`` print readable text and gives ``moepack eval`` and the
cache-policy benchmarks something honest to measure.

Data: the help files of Debian's ``vim-runtime`` package (``/usr/share/vim/vim90/doc/*.txt``, under the Vim
license; see ``:help license``). Every 10th file, in sorted order, is held out for evaluation (``--held-out DIR``
writes them as one text file for ``moepack eval``). Tabs and runs of spaces are collapsed; nothing else changes.

Reproducible: the tokenizer (byte-level BPE, 4096 ids), the initial weights, the batch order and the number of steps
are fixed by ``--seed`` and ``--steps``; the run is deterministic on one machine (floating-point summation order can
differ between CPUs, so weights may differ in the last bits elsewhere). About 20-25 minutes on two cores.

    python tools/train_demo.py moepack/demo_model --held-out /tmp/vim-heldout.txt
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from pathlib import Path

log = logging.getLogger("train_demo")

VIM_DOCS = Path("/usr/share/vim/vim90/doc")
EOS = "<|endoftext|>"


def model_config(vocab_size: int) -> dict:
    """Qwen3-MoE, hub spelling: 16 experts, top-2, tied embeddings; about 4.9M parameters (9.7 MB in bf16). Expert
    widths are multiples of 64 so every recipe quantizes every expert matrix (group size 64)."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "intermediate_size": 512,
        "moe_intermediate_size": 64,
        "num_experts": 16,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": 0.01,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }


def read_docs(root: Path) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): every 10th help file in sorted order is held out."""
    files = sorted(p for p in root.glob("*.txt"))
    if not files:
        raise SystemExit(f"no help files in {root}: install Debian's vim-runtime package (apt install vim-runtime)")
    train, held = [], []
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        text = re.sub(r"[ \t]+", " ", text)
        text = re.sub(r" *\n", "\n", text)
        (held if i % 10 == 9 else train).append(text)
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="checkpoint folder to write (safetensors, bf16)")
    ap.add_argument("--docs", type=Path, default=VIM_DOCS)
    ap.add_argument("--held-out", type=Path, help="also write the held-out files here, as one text file")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train, held = read_docs(args.docs)
    if args.held_out:
        args.held_out.write_text("\n".join(held), encoding="utf-8")
    tok = train_tokenizer(train, 4096)
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for text in train:
        ids.extend(tok.encode(text).ids + [eos])
    data = torch.tensor(ids, dtype=torch.long)
    log.info("%d training files, %d tokens; %d held out", len(train), len(data), len(held))

    cfg = model_config(tok.get_vocab_size())
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    model.config.output_router_logits = True  # the load-balancing loss keeps every expert in use
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%.2fM parameters", n_params / 1e6)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup))))

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.monotonic()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([data[s:s + args.seq] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.monotonic() - t0
            log.info("step %d/%d loss %.3f (lm %.3f) %.0f s, %.0f tok/s", step, args.steps, out.loss.item(),
                     (out.loss - cfg["router_aux_loss_coef"] * out.aux_loss).item(), el,
                     (step + 1) * args.batch * args.seq / el)

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(args.out)
    cfg_path = args.out / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["torch_dtype"] = "bfloat16"
    cfg_path.write_text(json.dumps(saved, indent=2) + "\n")
    (args.out / "TRAINING.md").write_text(
        f"Trained by tools/train_demo.py (--steps {args.steps} --batch {args.batch} --seq {args.seq} "
        f"--lr {args.lr} --seed {args.seed}) on {len(train)} of Vim's help files ({len(data)} tokens, Vim license); "
        f"{len(held)} files held out. {n_params / 1e6:.2f}M parameters, {time.monotonic() - t0:.0f} s.\n"
        "A toy for demonstrations and measurements, not an assistant: it continues text in the style of Vim's help.\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
