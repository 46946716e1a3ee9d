"""Train a small character-level decoder on Re-Tuning's addition task in one of the paper's three formats.

    python scripts/train_retuning.py --format retuning --out models/retuning/retuning
    python scripts/train_retuning.py --format baseline --out /tmp/b --minutes 2

The data are :func:`fastattn_icl.methods.retuning.tasks.generate_pairs` pairs (``{"input", "output"}``), drawn
fresh in chunks of problems (operand lengths uniform in ``--lengths``, default 1-8 digits) for as long as training
runs. A training sequence is ``input + output + EOS`` without BOS (the way the Re-Tuning driver and plain generation
prompt the model); the loss covers the output and EOS tokens only. Each chunk's sequences are sorted by length and
cut into batches of at most ``--batch-tokens`` padded tokens, and the batches are shuffled, so a batch holds
sequences of nearly equal length and padding wastes little CPU time.

The model is a Llama decoder (rotary positions, so no position embedding is tied to the trained lengths) with the
char-level tokenizer of :mod:`fastattn_icl.methods.retuning.tokenizer`. AdamW with linear warmup and cosine decay
to ``--min-lr-ratio`` of the peak; the decay runs over the planned length of the run, which is ``--max-steps`` or,
without it, the wall-clock budget ``--minutes`` (the schedule then follows elapsed time, so a run ends at the end of
its decay whatever speed the machine gives it). The output folder gets ``model.safetensors``, ``config.json``,
``generation_config.json``, the tokenizer files and ``train_log.json`` (steps, tokens, loss curve, wall time,
parameter count, torch threads).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from fastattn_icl.methods.retuning.tasks import FORMATS, generate_pairs
from fastattn_icl.methods.retuning.tokenizer import char_tokenizer

IGNORE_INDEX = -100
TASK = "addition"


def encode_pair(tokenizer, pair: dict[str, str]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one pair: ids of ``input + output + EOS`` (no BOS), labels ``-100`` on the input
    and the ids themselves on the output and the EOS, so the loss covers exactly the output and EOS tokens."""
    prompt = tokenizer(pair["input"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(pair["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def length_batches(sequences: list[tuple[list[int], list[int]]], batch_tokens: int, rng: random.Random) -> list:
    """Batches of sequences of nearly equal length: sorted by length, cut so that rows x longest <= batch_tokens
    (a single longer sequence gets a batch of its own), in shuffled order."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    batches, current = [], []
    for i in order:
        longest = len(sequences[i][0])  # sorted: the newest sequence is the longest in the batch
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(sequences[i])
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]`` (labels ``-100`` on padding)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_stream(tokenizer, args, rng: random.Random):
    """Endless training batches: chunks of ``--chunk-problems`` fresh problems, each chunk with its own seed."""
    chunk = 0
    while True:
        pairs = generate_pairs(TASK, args.format, args.chunk_problems, lengths=tuple(args.lengths),
                               seed=args.seed * 1_000_003 + chunk)
        sequences = [encode_pair(tokenizer, p) for p in pairs]
        for batch in length_batches(sequences, args.batch_tokens, rng):
            yield collate(batch, tokenizer.pad_token_id)
        chunk += 1


def build_model(tokenizer, args) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.d_model,
        intermediate_size=args.ffn or 4 * args.d_model,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def learning_rate(args, step: int, progress: float) -> float:
    """Linear warmup over ``--warmup`` steps, then cosine decay from the peak to ``min_lr_ratio`` x peak as
    ``progress`` (the fraction of the planned run done) goes from 0 to 1."""
    warm = min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def train(args) -> dict:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = char_tokenizer()
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    budget_s = args.minutes * 60.0
    model.train()
    stream = batch_stream(tokenizer, args, random.Random(args.seed))

    losses, tokens_total, tokens_loss, ema = [], 0, 0, None
    start = time.perf_counter()
    bar = tqdm(total=args.max_steps, desc=f"train {args.format}", unit="step", file=sys.stderr, mininterval=2.0)
    step, stop_reason = 0, "max_steps"
    while True:
        elapsed = time.perf_counter() - start
        progress = step / args.max_steps if args.max_steps else elapsed / budget_s
        if args.max_steps and step >= args.max_steps:
            break
        if elapsed >= budget_s:
            stop_reason = "minutes"
            break
        lr = learning_rate(args, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(stream)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss became {value} at step {step}; lower --lr")
        losses.append(value)
        tokens_total += int(batch["attention_mask"].sum())
        tokens_loss += int((batch["labels"] != IGNORE_INDEX).sum())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}", refresh=False)
    bar.close()
    wall = time.perf_counter() - start

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    tail = losses[-min(len(losses), 100):]
    every = max(1, len(losses) // 50)
    log = {
        "task": TASK,
        "format": args.format,
        "args": vars(args),
        "parameters": n_params,
        "steps": step,
        "stop_reason": stop_reason,
        "wall_seconds": round(wall, 1),
        "steps_per_second": round(step / wall, 3) if wall > 0 else None,
        "tokens_seen": tokens_total,
        "loss_tokens_seen": tokens_loss,
        "final_loss_mean_last_100_steps": sum(tail) / len(tail) if tail else None,
        "first_loss": losses[0] if losses else None,
        "min_loss": min(losses) if losses else None,
        "loss_curve": [
            {"step": i + 1, "mean_loss": sum(losses[i : i + every]) / len(losses[i : i + every])}
            for i in range(0, len(losses), every)
        ],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.platform(),
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS, help="training data format")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--minutes", type=float, default=17.0,
                   help="wall-clock budget of the training loop (default 17: with start-up and saving the run\n"
                        "stays under 20 minutes)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (and plan the decay on it)")
    p.add_argument("--lengths", type=int, nargs=2, default=(1, 8), metavar=("LO", "HI"),
                   help="operand lengths in digits, inclusive (default 1 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=None, help="MLP width (default 4 x d-model)")
    p.add_argument("--max-positions", type=int, default=2048, help="max_position_embeddings of the config")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--batch-tokens", type=int, default=3072, help="most padded tokens in one batch")
    p.add_argument("--chunk-problems", type=int, default=2000, help="problems drawn at a time")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on this shared 2-core machine 2 threads ran several\n"
                        "times slower than 1)")
    args = p.parse_args(argv)
    positive = {"--minutes": args.minutes, "--d-model": args.d_model, "--layers": args.layers, "--heads": args.heads,
                "--max-positions": args.max_positions, "--lr": args.lr, "--clip": args.clip,
                "--batch-tokens": args.batch_tokens, "--chunk-problems": args.chunk_problems,
                "--threads": args.threads}
    if args.max_steps is not None:
        positive["--max-steps"] = args.max_steps
    if args.ffn is not None:
        positive["--ffn"] = args.ffn
    for name, value in positive.items():
        if not value > 0:
            p.error(f"{name} must be > 0, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        p.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.d_model % args.heads:
        p.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    lo, hi = args.lengths
    if not 1 <= lo <= hi:
        p.error(f"--lengths must satisfy 1 <= LO <= HI, got {lo} {hi}")
    args.lengths = [lo, hi]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = train(args)
    print(json.dumps({k: log[k] for k in ("format", "parameters", "steps", "stop_reason", "wall_seconds",
                                          "final_loss_mean_last_100_steps")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
