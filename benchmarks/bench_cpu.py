"""Issue 15's CPU targets in one run (results ``-targets-{N}t``): every op against its baseline and base attention;
benchmarks/README.md."""

from __future__ import annotations

import contextlib
import copy
import functools
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks import bench_anchors, bench_momentum, bench_saliency
from benchmarks import bench_attention as attn
from benchmarks import bench_reweighting_epoch as epoch
from benchmarks import harness as h
from benchmarks.shapes import LABEL_WORDS, TEMPLATE, _review, cpu_target_cases, word_tokenizer
from fastattn_icl.testing import FWD_FACTOR, GRAD_FACTOR

OURS, BASELINE, BASE = "fastattn_icl", "baseline", "base"
ATTN_FWD, ATTN_BWD, EAGER_X, WITHIN_BASE, MOMENTUM_MAX, UPDATE_X, E2E_X = 1.0, 0.9, 2.0, 1.2, 1.15, 3.0, 1.0
FLOW_X, FLOW_MEM, FLOW_TS = 2.0, 0.5, (1024, 2048)
E2E_GATE_BETA_STD = 0.5


# ---- base attention with padding: ours, and SDPA the way a user calls it ----

@functools.lru_cache(maxsize=16)
def _masks(case, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep [B, T]`` (the last row's first ``pad`` keys masked) and SDPA's bool ``[B, 1, T, T]`` causal + padding
    mask, built once per case so that no mask is built in a timed call."""
    keep = torch.ones(case.B, case.Tk, dtype=torch.bool, device=device)
    keep[-1, : case.pad] = False
    causal = torch.ones(case.Tq, case.Tk, dtype=torch.bool, device=device).tril(case.Tk - case.Tq)
    return keep, (causal[None, None] & keep[:, None, None, :]).contiguous()


def _keep(case, q, which: int = 0) -> torch.Tensor:
    """The masks of ``q``'s batch rows: all of them, or the last one (the gate's slice, ``attn.check_views``)."""
    return _masks(case, str(q.device))[which][-q.shape[0]:]


def padded_ours(case, q, k, v):
    import fastattn_icl

    return fastattn_icl.attention(q, k, v, causal=True, key_padding_mask=_keep(case, q), backend="auto")


def padded_sdpa(case, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_keep(case, q, 1), enable_gqa=True)


def padded_oracle(case, q, k, v):
    return attn.reference_attention(q, k, v, causal=True, key_padding_mask=_keep(case, q))


ATTENTION = h.Benchmark(name="padded-attention", op="", providers=[
    h.Provider(OURS, padded_ours, attn.describe_ours(what=", key_padding_mask")),
    h.Provider(BASELINE, padded_sdpa, lambda device: (
        "torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=<bool [B, 1, T, T] causal & padding, "
        "built once>, enable_gqa=True), torch's default CPU dispatch"))],
    cases=lambda *a: [], inputs=lambda case, group: attn.make_inputs(case, group.device),
    **h.tensor_op(oracle=padded_oracle, views=attn.check_views))


# ---- end to end on the real model ----

@dataclass
class E2EInputs:
    """The model, one left-padded batch, its re-weighting trainer with an Adam on ``beta``."""

    model: torch.nn.Module
    rw: object
    batch: dict
    examples: list
    optimizer: torch.optim.Optimizer


def _load(case) -> tuple[torch.nn.Module, object]:
    if case.model == "smollm2":
        from fastattn_icl.lab import load_model

        lm = load_model("smollm2", attn_implementation="sdpa")
        return lm.model, lm.tokenizer
    if case.model != "tiny-llama":
        raise ValueError(f"unknown e2e model {case.model!r}")
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def _setup(group, cases) -> None:
    if cases[0].op != "e2e":
        return
    from fastattn_icl.lab import ModelNotFound

    try:
        group.model, group.tokenizer = _load(cases[0].inner)
    except ModelNotFound as exc:
        group.model, group.missing = None, f"the real model is not installed: {exc}"
        return
    group.model.to(group.device).eval().requires_grad_(False)


def _e2e_inputs(case, group) -> E2EInputs | None:
    from fastattn_icl.methods import AnchorReweighting, PromptBuilder, collate

    if group.model is None:
        return None
    rng, c = random.Random(0), case
    demos = [(_review(rng, label), label) for _ in range(c.per_class) for label in range(2)]
    builder = PromptBuilder(group.tokenizer, TEMPLATE, LABEL_WORDS, demos)
    examples = [builder.example(_review(rng, b % 2), b % 2) for b in range(c.B)]
    rw = AnchorReweighting(group.model, 2, builder.label_token_ids, pad_token_id=0)
    return E2EInputs(group.model, rw, collate(examples, 0), examples, torch.optim.Adam([rw.beta], lr=0.01))


@contextlib.contextmanager
def _implementation(model, name: str):
    saved = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def _model_kwargs(inp: E2EInputs) -> dict:
    return {k: inp.batch[k].to(inp.rw.beta.device) for k in ("attention_mask", "position_ids")} | {
        "use_cache": False, "logits_to_keep": 1}


def prefill(inp: E2EInputs, model=None) -> torch.Tensor:
    """Last-position logits ``[B, V]`` of one forward (no autograd)."""
    model = model or inp.model
    with torch.no_grad():
        return model(input_ids=inp.batch["input_ids"].to(inp.rw.beta.device), **_model_kwargs(inp)).logits[:, -1]


def beta_step(inp: E2EInputs) -> None:
    """One anchor re-weighting training step: forward through the seam with ``beta``, CE, backward, Adam."""
    loss = inp.rw.loss(inp.examples)
    inp.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    inp.optimizer.step()


def embeds_step(inp: E2EInputs, model=None) -> torch.Tensor:
    """The same step's forward, loss and backward without ``beta`` (which SDPA cannot apply): the gradient of a
    leaf copy of the input embeddings, so the backward runs through every layer as ``dbeta``'s does."""
    model = model or inp.model
    ids = inp.batch["input_ids"].to(inp.rw.beta.device)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, **_model_kwargs(inp)).logits[:, -1, inp.rw.label_token_ids].double()
    F.cross_entropy(logits, inp.batch["labels"].to(ids.device)).backward()
    return embeds.grad


def _e2e_gate(case, inp: E2EInputs, group, providers, mode) -> dict:
    """Prefill: last-position logits; step: ``dbeta`` (ours) or the embeddings' gradient (SDPA); each vs eager
    attention on a float64 copy of the model, the float32 eager run the same-dtype reference."""
    from fastattn_icl.methods import AnchorReweighting

    model64 = copy.deepcopy(inp.model).double()
    inp64 = E2EInputs(model64, AnchorReweighting(model64, 2, inp.rw.label_token_ids, pad_token_id=0), inp.batch,
                      inp.examples, inp.optimizer)
    inp64.rw.beta = torch.nn.Parameter(inp64.rw.beta.detach().double())
    impl = {OURS: "fastattn_icl", BASELINE: "sdpa"}
    checks, scope = {}, f"{mode}: the whole batch vs eager attention on a float64 copy of the model"
    if mode == "fwd":
        with _implementation(model64, "eager"):
            ref = prefill(inp64)
        with _implementation(inp.model, "eager"):
            same = prefill(inp)
        for p in providers:
            with _implementation(inp.model, impl[p.name]):
                err, fail = h.compare("logits", prefill(inp), same, ref, FWD_FACTOR)
            checks[p.name] = h.make_check({"logits": err}, [fail], scope)
        return checks
    beta = E2E_GATE_BETA_STD * torch.randn(inp.rw.beta.shape, generator=torch.Generator().manual_seed(7))
    for p in providers:
        if p.name == OURS:
            got = epoch.dbeta(inp.rw, inp.examples, beta, epoch.OURS)
            same = epoch.dbeta(inp.rw, inp.examples, beta, epoch.EAGER)
            ref = epoch.dbeta(inp64.rw, inp.examples, beta.double(), epoch.EAGER)
            name = "dbeta"
        else:
            with _implementation(inp.model, "sdpa"):
                got = embeds_step(inp)
            with _implementation(inp.model, "eager"):
                same = embeds_step(inp)
            with _implementation(model64, "eager"):
                ref = embeds_step(inp64)
            name = "dembeds"
        err, fail = h.compare(name, got, same, ref, GRAD_FACTOR)
        checks[p.name] = h.make_check({name: err}, [fail], scope + (" (dbeta: seed-style eager with beta)"
                                                                     if p.name == OURS else ""))
    return checks


def _e2e_timed(case, inp: E2EInputs, group, p, mode) -> h.Timed:
    if mode == "fwd":
        return h.Timed(lambda: prefill(inp), context=_implementation(inp.model, {OURS: "fastattn_icl"}.get(p.name,
                                                                                                           "sdpa")))
    if p.name == OURS:
        return h.Timed(lambda: beta_step(inp))
    return h.Timed(lambda: embeds_step(inp), context=_implementation(inp.model, "sdpa"))


E2E = h.Benchmark(name="e2e", op="", providers=[
    h.Provider(OURS, None, lambda device: (
        "prefill: the model on attn_implementation='fastattn_icl'; step: AnchorReweighting's training step (loss "
        "through the seam with beta [L, H, C] applied to the final row, backward to beta, Adam lr 0.01)")),
    h.Provider(BASELINE, None, lambda device: (
        "the model on attn_implementation='sdpa': prefill the same forward; step the same forward, loss and "
        "backward with the gradient taken to a leaf copy of the input embeddings (SDPA cannot apply beta; the "
        "backward runs through every layer as dbeta's does), no optimizer"))],
    cases=lambda *a: [], inputs=_e2e_inputs, gate=_e2e_gate, timed=_e2e_timed)


# ---- one declaration over every op ----

@dataclass(frozen=True)
class Op:
    """How a CPU-targets op runs: its declaration's hooks, our provider names -> its providers, our modes -> its."""

    bench: h.Benchmark
    providers: dict
    modes: dict
    skip: dict


_ANCH, _ISO, _SAL = bench_anchors.ANCHORS.providers, bench_anchors.ISOLATION.providers, bench_saliency.BENCH.providers
_MOM, _DT = bench_momentum.MOMENTUM.providers, bench_momentum.DEEP_THINKING.providers
NO_BASE = "no feature to switch off"
OPS = {
    "attention": Op(ATTENTION, dict(zip((OURS, BASELINE), ATTENTION.providers)), {"fwd": "fwd", "fwd+bwd": "fwd+bwd"},
                    {BASE: f"{NO_BASE} (the op is base attention)"}),
    "anchors": Op(bench_anchors.ANCHORS, {OURS: _ANCH[0], BASELINE: _ANCH[2], BASE: _ANCH[1]},
                  {"fwd": "fwd", "fwd+bwd": "fwd+bwd"}, {}),
    "isolation": Op(bench_anchors.ISOLATION, {OURS: _ISO[0], BASELINE: _ISO[2], BASE: _ISO[1]},
                    {"fwd": "fwd", "fwd+bwd": "fwd+bwd"}, {}),
    "saliency": Op(bench_saliency.BENCH, {OURS: _SAL[0], BASELINE: _SAL[1]}, {"fwd+bwd": "flow"},
                   {BASE: f"{NO_BASE} (the flow scores of the stack are the measured call)"}),
    "momentum": Op(bench_momentum.MOMENTUM, {OURS: _MOM[0], BASE: _MOM[1]}, {"fwd": "fwd", "fwd+bwd": "fwd+bwd"},
                   {BASELINE: "the issue's momentum target is against base attention (eager: --bench momentum)"}),
    "deep-thinking": Op(bench_momentum.DEEP_THINKING, {OURS: _DT[0], BASELINE: _DT[1]}, {"fwd": "update"},
                        {BASE: f"{NO_BASE} (an in-place state update, no attention)"}),
    "e2e": Op(E2E, dict(zip((OURS, BASELINE), E2E.providers)), {"fwd": "fwd", "fwd+bwd": "fwd+bwd"},
              {BASE: f"{NO_BASE} (the model with beta is the fastattn_icl row)"}),
}


def _inputs(case, group):
    return OPS[case.op].bench.inputs(case.inner, group)


def _gate(case, inputs, group, providers, mode) -> dict:
    op = OPS[case.op]
    inner = {op.providers[p.name].name: p.name for p in providers}
    checks = op.bench.gate(case.inner, inputs, group, [op.providers[p.name] for p in providers], op.modes[mode])
    return {inner[name]: check for name, check in checks.items() if name in inner}


def _timed(case, inputs, group, p, mode) -> h.Timed:
    op = OPS[case.op]
    return op.bench.timed(case.inner, inputs, group, op.providers[p.name], op.modes[mode])


def _skip(name: str):
    def skip(case, group) -> str | None:
        if case.op == "e2e" and getattr(group, "model", True) is None:
            return group.missing
        reason = OPS[case.op].skip.get(name)
        return f"{case.op}: {reason}" if reason else None

    return skip


def _describe(name: str):
    def describe(device) -> str:
        return "; ".join(f"**{op}**: {o.providers[name].describe(device)}" + (" (mode fwd+bwd: flow scores)" if op ==
                                                                               "saliency" else "")
                         for op, o in OPS.items() if name in o.providers)

    return describe


# ---- the CPU targets ----

def _label(r) -> str:
    return r["params"]["inner"]["name"] if r["params"]["op"] == "deep-thinking" else f"T{r['params']['T']}"


def _pairs(rows, op, mode, other, keep=lambda r: True) -> list:
    return [(_label(o), o, h.find(rows, o["case"], other, mode)) for o in rows
            if (o["provider"], o["mode"], o["params"]["op"]) == (OURS, mode, op) and keep(o)]


def _x(o, b, r, t) -> str:
    return t if r is None else f"{r:.2f}x ({o['median_ms']:.4g} vs {b['median_ms']:.4g} ms)"


def _of_base(o, b, r, t) -> str:
    return t if r is None else f"{1 / r:.2f}x base ({o['median_ms']:.4g} vs {b['median_ms']:.4g} ms)"


def _flow_memory(rows) -> list[dict]:
    ours = sorted((r for r in rows if r["params"]["op"] == "saliency" and r["provider"] == OURS
                   and r["status"] == h.STATUS_OK and r["peak_mem_bytes"]), key=lambda r: r["params"]["T"])
    parts, verdicts = [], []
    for o in (r for r in ours if r["params"]["T"] in FLOW_TS):
        b = h.find(rows, o["case"], BASELINE, o["mode"])
        if b is None or not b["peak_mem_bytes"] or b["status"] not in h.TIMED:
            verdicts.append(None)
            parts.append(f"T{o['params']['T']}: n/a (baseline {b['status'] if b else 'not run'})")
            continue
        ratio = o["peak_mem_bytes"] / b["peak_mem_bytes"]
        verdicts.append(ratio <= FLOW_MEM)
        parts.append(f"T{o['params']['T']}: {ratio:.2f}x ({o['peak_mem_bytes'] / 2**20:.1f} vs "
                     f"{b['peak_mem_bytes'] / 2**20:.1f} MiB)")
    out = [{"target": f"saliency: peak memory <= {FLOW_MEM:g}x the eager probe's at T = 1024 and 2048",
            "result": h.verdict(verdicts), "detail": ", ".join(parts) or "not measured"}]
    ts, mem = [r["params"]["T"] for r in ours], [r["peak_mem_bytes"] for r in ours]
    exponent = h.fit_exponent(ts, mem)
    if exponent is None:
        return [*out, {"target": "saliency: peak memory linear in T", "result": "N/A",
                       "detail": "fewer than two peaks"}]
    mt = sum(ts) / len(ts)
    slope = sum((t - mt) * m for t, m in zip(ts, mem)) / sum((t - mt) ** 2 for t in ts)
    peaks = ", ".join(f"T{t}: {m / 2**20:.1f} MiB" for t, m in zip(ts, mem))
    return [*out, {"target": f"saliency: peak memory linear in T (fitted exponent <= "
                             f"{bench_saliency.MEMORY_EXPONENT_MAX:g}; slope stated)",
                   "result": "PASS" if exponent <= bench_saliency.MEMORY_EXPONENT_MAX else "FAIL",
                   "detail": f"exponent {exponent:.2f}, slope {slope / 1024:.1f} KiB per token ({peaks})"}]


def cpu_targets(rows: list[dict]) -> list[dict]:
    """Issue 15's CPU targets; every part's ratio in the detail."""
    t = h.ratio_target
    out = [t(f"attention fwd >= {ATTN_FWD:g}x SDPA (causal, GQA, padding)", _pairs(rows, "attention", "fwd", BASELINE),
             lambda r: r >= ATTN_FWD, _x),
           t(f"attention fwd+bwd >= {ATTN_BWD:g}x SDPA", _pairs(rows, "attention", "fwd+bwd", BASELINE),
             lambda r: r >= ATTN_BWD, _x)]
    for variant in ("anchors-last", "anchors-from", "isolation"):
        op = "isolation" if variant == "isolation" else "anchors"

        def keep(r, v=variant):
            return r["params"]["inner"].get("variant") == v

        for mode in ("fwd", "fwd+bwd"):
            out += [t(f"{variant} {mode}: >= {EAGER_X:g}x the eager reference", _pairs(rows, op, mode, BASELINE, keep),
                      lambda r: r >= EAGER_X, _x),
                    t(f"{variant} {mode}: within {WITHIN_BASE:g}x of base attention",
                      _pairs(rows, op, mode, BASE, keep), lambda r: 1 / r <= WITHIN_BASE, _of_base)]
    out.append(t(f"saliency (all layers): >= {FLOW_X:g}x the eager probe at T = 1024 and 2048",
                 _pairs(rows, "saliency", "fwd+bwd", BASELINE, lambda r: r["params"]["T"] in FLOW_TS),
                 lambda r: r >= FLOW_X, _x))
    out += _flow_memory(rows)
    out += [t(f"momentum {mode}: <= {MOMENTUM_MAX:g}x base attention", _pairs(rows, "momentum", mode, BASE),
              lambda r: 1 / r <= MOMENTUM_MAX, _of_base) for mode in ("fwd", "fwd+bwd")]
    out.append(t(f"Deep-Thinking update >= {UPDATE_X:g}x the per-tensor loop", _pairs(rows, "deep-thinking", "fwd",
                                                                                      BASELINE),
                 lambda r: r >= UPDATE_X, _x))
    out += [t(f"e2e {what}: fastattn_icl no slower than sdpa", _pairs(rows, "e2e", mode, BASELINE),
              lambda r: r >= E2E_X, _x) for mode, what in (("fwd", "prefill"), ("fwd+bwd", "beta training step"))]
    return out


BENCH = h.Benchmark(
    name="cpu-targets", suffix="-targets", modes=("fwd", "fwd+bwd"), cases=cpu_target_cases, per_thread_count=True,
    op="issue 15's CPU targets: base attention, anchors, isolation, saliency, momentum, Deep-Thinking, end to end",
    group=lambda case: case.op if case.op in ("saliency", "e2e") else case.name, setup=_setup,
    modes_of=lambda case: tuple(OPS[case.op].modes), inputs=_inputs, gate=_gate, timed=_timed,
    providers=[h.Provider(name, None, _describe(name), skip=_skip(name)) for name in (OURS, BASELINE, BASE)],
    gate_text="each op's own gate (benchmarks/README.md): tensor ops' output and dq, dk, dv (dbeta) vs the float64 "
    "oracle, large shapes on one slice; saliency's scores vs the float64 probe; Deep-Thinking's step vs the loop; "
    "e2e logits / dbeta / the embeddings' gradient vs eager attention on a float64 copy of the model "
    f"(fastattn_icl.testing: {FWD_FACTOR:g}x / {GRAD_FACTOR:g}x the same-dtype reference's error + eps)",
    call="per op: fwd = forward without autograd (saliency: none; Deep-Thinking: the update; e2e: prefill), "
    "fwd+bwd = forward + backward (saliency: the flow scores of every layer; e2e: one training step)",
    flop_model="attention-like ops: 4·B·H·T²·d / 2 per causal forward, fwd+bwd 3.5x; the others none",
    cpu_targets=cpu_targets,
)
