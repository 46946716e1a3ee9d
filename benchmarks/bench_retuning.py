"""Re-Tuning inference speed: the batched driver with KV reuse vs the authors' re-prefill loop; benchmarks/README.md."""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import harness as h
from benchmarks.shapes import retuning_cases

OURS, BASELINE = "fastattn_icl", "baseline"
MODEL_ENV = "FASTATTN_ICL_RETUNING_MODEL"  # run.py --retuning-model sets it
DEFAULT_MODEL = Path("models") / "retuning" / "retuning"
TRAIN_COMMAND = f"python scripts/train_retuning.py --format retuning --out {DEFAULT_MODEL.as_posix()}"
SLACK = 16  # tokens a context may write past the correct output (scripts/eval_retuning.py's default rule)
TARGET_DIGITS, TARGET_BATCH, TARGET_RATIO = 16, 32, 3.0  # issue 16
# scripted models: (layers, d_model, heads, kv heads, MLP width); "scripted" is scripts/train_retuning.py's default
SCRIPTED = {"scripted": (4, 128, 4, 4, 512), "tiny-scripted": (1, 32, 4, 2, 64)}
_CONTEXT_ENDS = re.compile(r"\nSolution: |\nAnswer: ")


def model_dir() -> Path:
    """``$FASTATTN_ICL_RETUNING_MODEL``, else ``models/retuning/retuning`` in the repository."""
    return Path(os.environ.get(MODEL_ENV) or h.REPO_ROOT / DEFAULT_MODEL)


@dataclass
class Problems:
    """One case's top-level prompts and the budgets both loops get."""

    prompts: list[str]
    budgets: dict


def problems(case) -> Problems:
    """The first ``B`` problems of ``random.Random(digits)``; budgets: depth and calls ``digits + 2``, tokens per
    context the longest correct context output + EOS + ``SLACK`` (so a right answer is never cut short)."""
    from fastattn_icl.methods.retuning import problem_pairs, sample_problem, top_prompt

    rng = random.Random(case.digits)
    items = [sample_problem(case.task, case.digits, rng) for _ in range(case.B)]
    prompts = [top_prompt(case.task, "retuning", p) for p in items]
    written = max(sum(len(pair["output"]) for pair in problem_pairs(case.task, "retuning", p)
                      if pair["input"].startswith(prompt)) for p, prompt in zip(items, prompts))
    return Problems(prompts, dict(max_depth=case.digits + 2, max_calls=case.digits + 2,
                                  max_new_tokens=written + 1 + SLACK))


class DataScripted(torch.nn.Module):
    """A random-weight model that writes a task's Re-Tuning training data: the inner model's logits, with the next
    character of the pair whose input is the longest prefix of the context raised above the maximum (``#`` off the
    data, EOS at the end of an output). The context is read from one extra cache layer holding the token ids, so the
    script sees what the driver fed (padding, row selection and KV reuse included), as tests/methods/retuning's
    ``Scripted`` does."""

    def __init__(self, inner: torch.nn.Module, tokenizer, pairs: list[dict[str, str]]):
        super().__init__()
        self.inner, self.tokenizer, self.config = inner, tokenizer, inner.config
        self.outputs = {pair["input"]: pair["output"] for pair in pairs}

    def next_char(self, text: str) -> str | None:
        # a pair's input ends a prompt or an answer line's head: the longest one that starts the text
        ends = [m.end() for m in _CONTEXT_ENDS.finditer(text)]
        start = next((text[:end] for end in reversed(ends) if text[:end] in self.outputs), None)
        target = None if start is None else start + self.outputs[start]
        if target is None or not target.startswith(text):
            return "#"
        return target[len(text)] if len(text) < len(target) else None

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, cache=None, logits_to_keep=0):
        from fastattn_icl.integrations.cache_keyword import cache_kwargs, output_cache

        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=logits_to_keep, **cache_kwargs(cache, self.inner))
        ids = input_ids[:, None, :, None].to(out.logits.dtype)  # [B, 1, T, 1]
        history, _ = output_cache(out).update(ids, ids, self.inner.config.num_hidden_layers)
        logits = out.logits.clone()
        for row in range(len(input_ids)):
            context = history[row, 0, :, 0][attention_mask[row].bool()].long().tolist()
            char = self.next_char(self.tokenizer.decode(context, skip_special_tokens=True))
            token = self.tokenizer.eos_token_id if char is None else self.tokenizer.convert_tokens_to_ids(char)
            logits[row, -1, token] = logits[row, -1].max() + 1.0
        out.logits = logits
        return out


def scripted_model(cases, device: torch.device):
    """A random Llama of ``SCRIPTED[model]``'s shape (seed 0, through the seam, the trained model's char tokenizer)
    steered to the training data of every case's problems."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import fastattn_icl  # noqa: F401  (registers the seam)
    from fastattn_icl.methods.retuning import char_tokenizer, problem_pairs, sample_problem

    tokenizer = char_tokenizer()
    layers, width, heads, kv_heads, mlp = SCRIPTED[cases[0].model]
    config = LlamaConfig(hidden_size=width, intermediate_size=mlp, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=len(tokenizer),
                         max_position_embeddings=2048, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    inner = AutoModelForCausalLM.from_config(config, attn_implementation="fastattn_icl", dtype=torch.float32)
    pairs = []
    for case in cases:
        rng = random.Random(case.digits)
        for _ in range(case.B):
            pairs += problem_pairs(case.task, "retuning", sample_problem(case.task, case.digits, rng))
    return DataScripted(inner.to(device).eval(), tokenizer, pairs), tokenizer


def setup(group, cases) -> None:
    """Load the trained model through the seam (``fastattn_icl.lab.load_model``), or build a scripted one; without
    the checkpoint the trained model's rows are skipped with the command that trains it."""
    group.model = group.tokenizer = group.missing = None
    if cases[0].model in SCRIPTED:
        group.model, group.tokenizer = scripted_model(cases, group.device)
        return
    from fastattn_icl.lab import ModelNotFound, load_model

    path = model_dir()
    try:
        loaded = load_model(path, device=group.device, attn_implementation="fastattn_icl")
    except ModelNotFound as exc:
        group.missing = (f"no trained Re-Tuning model ({exc}). Train it with `{TRAIN_COMMAND}` (the defaults: a "
                         f"~1M-parameter char-level Llama on 1-8 digit addition, 17 minutes on a CPU core), or give "
                         f"its folder with --retuning-model PATH (${MODEL_ENV})")
        return
    group.model, group.tokenizer = loaded.model, loaded.tokenizer
    group.extra["trained_model"] = {"source": loaded.source,
                                    "parameters": sum(p.numel() for p in loaded.model.parameters()),
                                    "attn_implementation": loaded.model.config._attn_implementation}


def solve(name: str, group, inp: Problems) -> list:
    """One provider on every problem of the case: ``fastattn_icl`` batches all ``B`` of them."""
    from fastattn_icl.methods.retuning import reprefill_generate, retune_generate

    fn = retune_generate if name == OURS else reprefill_generate
    return fn(group.model, group.tokenizer, inp.prompts, task="addition", batch_size=len(inp.prompts),
              progress=False, **inp.budgets)


def _node_key(node) -> tuple:
    return node.prompt, node.depth, node.text, node.answer, node.generated_tokens, len(node.children)


def _differences(got: list, ref: list) -> tuple[int, int, str | None]:
    """``(problems whose answer or failure differ, call-tree nodes that differ, the first difference)``."""
    answers = nodes = 0
    first = None
    for i, (g, r) in enumerate(zip(got, ref)):
        if (g.answer, g.failure) != (r.answer, r.failure):
            answers += 1
            first = first or f"problem {i}: answer {g.answer!r} ({g.failure}) vs {r.answer!r} ({r.failure})"
        gn, rn = g.tree.nodes(), r.tree.nodes()
        bad = [j for j, (a, b) in enumerate(zip(gn, rn)) if _node_key(a) != _node_key(b)]
        nodes += len(bad) + abs(len(gn) - len(rn))
        if bad or len(gn) != len(rn):
            j = bad[0] if bad else min(len(gn), len(rn))
            first = first or (f"problem {i} node {j}: {gn[j].text[-40:]!r} vs {rn[j].text[-40:]!r}" if bad
                              else f"problem {i}: {len(gn)} contexts vs {len(rn)}")
    return answers, nodes, first


def _counts(results: list) -> dict:
    n = len(results)
    return {"problems": n, "prefilled_tokens": sum(r.prefilled_tokens for r in results),
            "generated_tokens": sum(r.generated_tokens for r in results),
            "prefilled_per_problem": sum(r.prefilled_tokens for r in results) / n,
            "generated_per_problem": sum(r.generated_tokens for r in results) / n,
            "calls_per_problem": sum(r.calls for r in results) / n,
            "correct": sum(r.correct for r in results), "failed": sum(r.failure is not None for r in results)}


def gate(case, inp: Problems, group, providers, mode) -> dict:
    """Both loops once on the case's problems: ours must give the re-prefill loop's answers, failures and call trees
    (every context's prompt, text, answer and generated tokens); the token counts ride along in the checks."""
    results = {p.name: solve(p.name, group, inp) for p in providers}
    ref, checks = results.get(BASELINE), {}
    for p in providers:
        counts = _counts(results[p.name])
        if p.name == BASELINE:
            checks[p.name] = h.make_check({}, [], "the reference (the authors' loop)", **counts)
        elif ref is None:
            checks[p.name] = (h.STATUS_UNCHECKED, "no correctness gate: the baseline is not run")
        else:
            answers, nodes, first = _differences(results[p.name], ref)
            checks[p.name] = h.make_check(
                {"answers": {"error": answers, "tolerance": 0}, "texts": {"error": nodes, "tolerance": 0}},
                [first and f"differs from the re-prefill loop: {first}"],
                f"every problem's answer and failure, and every context's prompt, text, answer and generated tokens, "
                f"equal to {BASELINE}'s", **counts)
    return checks


def _count(row: dict | None, key: str) -> float | None:
    check = (row or {}).get("check") or {}
    return check.get(key)


def _pair(by: dict, key: str, ratio: bool) -> str:
    ours, base = _count(by.get(OURS), key), _count(by.get(BASELINE), key)
    if ours is None or base is None:
        return "—"
    text = f"{ours:.1f} / {base:.1f}"
    return f"{text} ({base / ours:.2f}x fewer)" if ratio and ours else text


def _correct(by: dict) -> str:
    row = by.get(OURS) or by.get(BASELINE)
    right = _count(row, "correct")
    return "—" if right is None else f"{right}/{_count(row, 'problems')} ({_count(row, 'failed')} failed)"


def cpu_targets(rows: list[dict]) -> list[dict]:
    """Issue 16 at batch 32, 16 digits, per model: >= 3x fewer prefilled tokens and >= 3x less time per problem."""
    return [t for model in dict.fromkeys(r["params"]["model"] for r in rows) or ("trained",)
            for t in _model_targets(rows, model)]


def _model_targets(rows: list[dict], model: str) -> list[dict]:
    def at(provider):
        return next((r for r in rows if r["provider"] == provider and (r["params"]["model"], r["params"]["digits"],
                                                                        r["params"]["B"]) == (model, TARGET_DIGITS,
                                                                                              TARGET_BATCH)), None)

    ours, base = at(OURS), at(BASELINE)
    where = f"{model} model, batch {TARGET_BATCH}, {TARGET_DIGITS} digits"
    if ours is None:
        return [{"target": f"{where}: >= {TARGET_RATIO:g}x {what}", "result": "N/A", "detail": "no such case"}
                for what in ("fewer prefilled tokens per problem", "less time per problem")]
    a, b = _count(ours, "prefilled_per_problem"), _count(base, "prefilled_per_problem")
    if ours["status"] not in (h.STATUS_OK, h.STATUS_SKIPPED):
        ok, detail = False, f"n/a ({OURS} {ours['status']})"
    elif a is None or b is None:
        ok, detail = None, f"n/a ({OURS} {ours['status']}, {BASELINE} {base['status'] if base else 'not run'})"
    else:
        ok, detail = b / a >= TARGET_RATIO, f"{b / a:.2f}x ({a:.1f} vs {b:.1f} tokens per problem)"
    prefill = {"target": f"{where}: >= {TARGET_RATIO:g}x fewer prefilled tokens per problem than {BASELINE}",
               "result": h.verdict([ok]), "detail": detail}
    speed = h.ratio_target(f"{where}: >= {TARGET_RATIO:g}x less time per problem than {BASELINE}",
                           [(ours["case"], ours, base)], lambda r: r >= TARGET_RATIO,
                           lambda o, b, r, t: t if r is None else (f"{r:.2f}x ({o['ms_per_problem']:.4g} vs "
                                                                   f"{b['ms_per_problem']:.4g} ms per problem)"))
    return [prefill, speed]


def _skip(case, group) -> str | None:
    return group.missing


BENCH = h.Benchmark(
    name="retuning", suffix="-retuning", modes=("solve",), cases=retuning_cases, group=lambda c: c.model,
    op="Re-Tuning inference (addition): batched recursion with KV reuse vs the authors' re-prefill loop",
    setup=setup, inputs=lambda case, group: problems(case), gate=gate,
    timed=lambda case, inp, group, p, mode: h.Timed(lambda: solve(p.name, group, inp)),
    timing=h.TimingConfig(cpu_warmup_ms=0.0, cpu_rep_ms=1000.0, cpu_min_reps=1, cpu_max_reps=5),
    metric=lambda case, ms: {"ms_per_problem": None if ms is None else ms / case.B},
    measure_memory=lambda case, device: device.type == "cuda" or case.B == 1 or case.model == "tiny-scripted",
    providers=[
        h.Provider(OURS, None, lambda device: (
            "retune_generate(batch_size=B): every parent's KV cache kept while its child runs, only the return "
            "prefilled onto it, ready contexts of one depth batched (left-padded); the model on "
            f"attn_implementation='fastattn_icl', as fastattn_icl.lab.load_model loads it: {h.kernel_text(device)}"),
            skip=_skip),
        h.Provider(BASELINE, None, lambda device: (
            "reprefill_generate: the authors' loop, one problem at a time, the whole parent text prefilled again "
            "after every return; the same model, on the same attention (the seam), so the rows differ by the "
            "driver alone"), skip=_skip)],
    gate_text=f"per case, before timing: both loops on its problems; {OURS} must give {BASELINE}'s answers and "
    "failures and the same call trees (every context's prompt, text, answer and generated-token count), exactly",
    call="one call = the case's B problems (ms/problem = median / B); greedy, budgets per problem: depth and calls "
    f"digits + 2, tokens per context the longest correct output + EOS + {SLACK}",
    memory="the model is loaded before; on CPU only B = 1 and tiny rows are measured (the profiler's extra call is "
    "several times the call itself, minutes at B = 32)",
    flop_model="none (a recursive greedy decoding loop; tokens per problem reported instead)",
    cpu_path="the model's attention is the seam's CPU path (backend 'torch')",
    cpu_note="CPU run at one torch thread: the time target is about the loop (fewer forwards, batched), not kernels",
    columns=[("prefilled tokens/problem, ours / baseline", lambda by: _pair(by, "prefilled_per_problem", True)),
             ("generated tokens/problem", lambda by: _pair(by, "generated_per_problem", False)),
             ("calls/problem", lambda by: _pair(by, "calls_per_problem", False)),
             ("correct", _correct)],
    cpu_targets=cpu_targets,
)
