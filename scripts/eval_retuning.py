"""Evaluate the Re-Tuning, scratchpad and baseline addition models by operand length: the paper's length figure.

    python scripts/eval_retuning.py --models models/retuning --out docs/retuning

For every operand length in ``--lengths`` (default 1-20) ``--per-length`` problems (default 20) are drawn with
``random.Random(seed)``: both operands have exactly that many digits (a leading digit 1-9; 0-9 for one digit), and
every format gets the same problems. Each model is scored by exact match of its final answer
(:func:`~fastattn_icl.methods.retuning.tasks.final_answer_of` against
:func:`~fastattn_icl.methods.retuning.tasks.ground_truth`):

- ``retuning``: :func:`~fastattn_icl.methods.retuning.driver.retune_generate` (greedy, batched, recursive);
- ``scratchpad`` and ``baseline``: greedy ``model.generate`` on left-padded batches.

Generation budgets are generous and the same rule for every length: the length of the correct output plus
``--slack`` tokens (for Re-Tuning, per context and with depth and call limits of the length plus 2), so a model is
never cut short of a right answer. Writes ``eval_results.json`` (accuracies, failure counts, a few outputs per
length), ``eval_results.md`` (the table) and ``accuracy_vs_length.png`` (accuracy by length, one line per format,
the trained lengths shaded) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastattn_icl.methods.retuning.driver import retune_generate
from fastattn_icl.methods.retuning.tasks import (
    FORMATS,
    final_answer_of,
    get_task,
    ground_truth,
    problem_pairs,
    top_prompt,
)

TASK = "addition"


def eval_problems(lengths: list[int], per_length: int, seed: int) -> dict[int, list[tuple[str, str]]]:
    """``per_length`` problems ``(a, b)`` per length, both operands of exactly that many digits."""
    rng = random.Random(seed)
    problems = {}
    for n in lengths:
        lo = 10 ** (n - 1) if n > 1 else 0
        problems[n] = [(str(rng.randint(lo, 10**n - 1)), str(rng.randint(lo, 10**n - 1))) for _ in range(per_length)]
    return problems


def output_budget(fmt: str, problem: tuple[str, str], slack: int) -> int:
    """Tokens (characters) the top-level context writes when right, plus EOS and ``slack``: for Re-Tuning its call
    and its answer together (the driver's ``max_new_tokens`` counts all segments of one context), the longest
    context of the tree."""
    prompt = top_prompt(TASK, fmt, problem)
    written = sum(len(pair["output"]) for pair in problem_pairs(TASK, fmt, problem) if pair["input"].startswith(prompt))
    return written + 1 + slack


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Prompt plus greedy continuation (special tokens dropped) of each prompt, batched with left padding."""
    tokenizer.padding_side = "left"
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer(chunk, add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1] :]
        texts += [p + tokenizer.decode(row, skip_special_tokens=True) for p, row in zip(chunk, new)]
    return texts


def evaluate_format(fmt: str, model_dir: Path, problems: dict[int, list], args) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    per_length = {}
    for n, probs in problems.items():
        prompts = [top_prompt(TASK, fmt, p) for p in probs]
        budget = max(output_budget(fmt, p, args.slack) for p in probs)
        start = time.perf_counter()
        if fmt == "retuning":
            results = retune_generate(model, tokenizer, prompts, task=get_task(TASK), max_depth=n + 2, max_calls=n + 2,
                                      max_new_tokens=budget, batch_size=args.batch_size, progress=False)
            rows = [{"prompt": r.prompt, "answer": r.answer, "expected": r.expected, "correct": bool(r.correct),
                     "failure": r.failure, "calls": r.calls, "text": r.tree.text} for r in results]
        else:
            texts = greedy_generate(model, tokenizer, prompts, budget, args.batch_size)
            rows = []
            for prompt, text in zip(prompts, texts):
                answer, expected = final_answer_of(TASK, fmt, text), ground_truth(TASK, prompt)
                rows.append({"prompt": prompt, "answer": answer, "expected": expected, "correct": answer == expected,
                             "failure": None if answer is not None else "no parsable answer",
                             "text": text})
        correct = sum(r["correct"] for r in rows)
        per_length[n] = {
            "accuracy": correct / len(rows),
            "correct": correct,
            "n": len(rows),
            "failures": sum(r["failure"] is not None for r in rows),
            "seconds": round(time.perf_counter() - start, 2),
            "examples": rows[: args.examples],
        }
        print(f"{fmt:10s} length {n:2d}: {correct}/{len(rows)}  ({per_length[n]['seconds']} s)", file=sys.stderr)
    return per_length


def trained_range(models: Path, formats: list[str]) -> list[int] | None:
    spans = set()
    for fmt in formats:
        log = models / fmt / "train_log.json"
        if log.exists():
            spans.add(tuple(json.loads(log.read_text())["args"]["lengths"]))
    return list(spans.pop()) if len(spans) == 1 else None


def write_table(results: dict, lengths: list[int], span: list[int] | None) -> str:
    formats = list(results["accuracy"])
    lines = [
        f"Exact-match accuracy on {TASK} by operand length ({results['per_length']} problems per length, seed "
        f"{results['seed']}; both operands of that many digits)."
        + (f" Trained on lengths {span[0]}-{span[1]}." if span else ""),
        "",
        "| length | " + " | ".join(formats) + " |",
        "|---:|" + "---:|" * len(formats),
    ]
    for n in lengths:
        mark = "" if span is None or span[0] <= n <= span[1] else " *"
        cells = [f"{results['accuracy'][f][str(n)]:.2f}" for f in formats]
        lines.append(f"| {n}{mark} | " + " | ".join(cells) + " |")
    if span:
        lines += ["", "\\* outside the trained lengths."]
    return "\n".join(lines) + "\n"


def plot(results: dict, lengths: list[int], span: list[int] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if span:
        ax.axvspan(span[0] - 0.5, span[1] + 0.5, color="0.9", label=f"trained lengths ({span[0]}-{span[1]})")
    markers = {"retuning": "o", "scratchpad": "s", "baseline": "^"}
    for fmt, acc in results["accuracy"].items():
        ax.plot(lengths, [acc[str(n)] for n in lengths], marker=markers.get(fmt, "."), label=fmt)
    ax.set_xlabel("operand length (digits)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_xticks(lengths)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"Addition by operand length ({results['per_length']} problems per length)")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="models/retuning", help="folder with one model folder per format")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--out", default="docs/retuning", help="folder for the JSON, markdown and PNG")
    p.add_argument("--lengths", type=int, nargs=2, default=(1, 20), metavar=("LO", "HI"))
    p.add_argument("--per-length", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--slack", type=int, default=16, help="extra tokens over the correct output's length")
    p.add_argument("--examples", type=int, default=3, help="outputs kept per length in the JSON")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    lo, hi = args.lengths
    if not 1 <= lo <= hi:
        p.error(f"--lengths must satisfy 1 <= LO <= HI, got {lo} {hi}")
    for name in ("per_length", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("slack", "examples"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    missing = [f for f in args.formats if not (Path(args.models) / f / "config.json").exists()]
    if missing:
        p.error(f"no trained model for {missing} under {args.models} (expected <models>/<format>/config.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models, out = Path(args.models), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = list(range(args.lengths[0], args.lengths[1] + 1))
    problems = eval_problems(lengths, args.per_length, args.seed)
    span = trained_range(models, args.formats)
    results = {"task": TASK, "seed": args.seed, "per_length": args.per_length, "trained_lengths": span,
               "accuracy": {}, "by_format": {}}
    for fmt in args.formats:
        per_length = evaluate_format(fmt, models / fmt, problems, args)
        results["by_format"][fmt] = {str(n): v for n, v in per_length.items()}
        results["accuracy"][fmt] = {str(n): v["accuracy"] for n, v in per_length.items()}
    (out / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = write_table(results, lengths, span)
    (out / "eval_results.md").write_text(table)
    plot(results, lengths, span, out / "accuracy_vs_length.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
