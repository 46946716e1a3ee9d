"""One anchor re-weighting training epoch end to end (SPEC.md §2, the paper's training setting).

What is timed: ``AnchorReweighting.fit(examples, epochs=1, batch_size=B, shuffle=False, progress=False)``
on a frozen random-weight GPT2 model: for every batch, collate (left padding), forward through the
model with the controller state, cross-entropy over the label-word logits at the final position,
backward to ``beta [L, H, C]``, one Adam step (lr 0.01), ``loss.item()``. ``beta`` is reset to zero
(the paper's start) at the start of each timed epoch (one tiny ``zero_``, inside the timed call).

Providers (the same ``fit`` code path; only the attention function differs):

* ``fastattn_icl``: the model runs ``attn_implementation="fastattn_icl"`` (the seam, fused kernel:
  Triton on CUDA, its torch CPU path on CPU).
* ``eager``: :func:`seed_style_attention`, how lancopku/label-words-are-anchors re-weights GPT2's
  patched ``_attn``: materialise ``P = softmax(S)`` ``[B, H, T, T]``, build a ``[B, H, T, T]`` matrix of
  ones with ``exp(beta[l, h, c])`` at (final row, label-word column), multiply, ``O = P̂ V``. For the
  duration of the provider it is registered under the seam's name (``"fastattn_icl"``) with
  transformers' ``AttentionInterface``, so ``fit`` runs unchanged (the seed code patches too).

Model: GPT2-XL-shaped (48 layers, 25 heads of dimension 64, d_model 1600, 1024 positions) with a small
vocabulary (512 instead of 50257: the embedding and LM head are 0.8M instead of 80M parameters, the
transformer stack is GPT2-XL's 1.47B), random weights (``torch.manual_seed(0)``), bf16 on CUDA (``beta``
float32, as ``AnchorReweighting`` makes it). On CPU: 2 layers, the 25 heads at head dimension 16
(d_model 400), fp32, so ``make bench`` grows by well under a minute (the eager provider's materialised
``P [B, 25, T, T]`` per layer is GPT2-XL's; at d_model 1600 the CPU set took ~6 minutes on one thread).

Prompts (SST-2 geometry, SPEC.md "Reference figures"): template ``"Review: {x}\\nSentiment: {y}\\n"``
with reviews of 20-24 words, a word-level tokenizer (one token per word / punctuation), so one
demonstration is ~27 tokens and the query ~25: ``sst2-1demo`` (1 demonstration per class, T ≈ 80) and
``sst2-4demo`` (4 per class, T ≈ 240); C = 2. Training sets: the paper's 4 examples per class at batch 1
(8 Adam steps), and a batch-16 variant on 8 examples per class (one full batch of 16: one step).

Correctness gate (before any timing): one training step's ``dbeta`` (loss of the case's first batch, at
a common random ``beta ~ N(0, 0.5²)``; batches larger than 4 are cut to their first 4 examples for the
check) of each provider against the seed-style implementation on a float64 copy of the model, by the
rule of :mod:`fastattn_icl.testing`: error <= 3x the error of the seed-style implementation in the
benchmark dtype, + 1e-5 · max(1, max|dbeta|). A provider that fails is timed but marked ``incorrect``
and its speed-up is refused.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.harness import (
    STATUS_ERROR,
    STATUS_INCORRECT,
    STATUS_OK,
    STATUS_OOM,
    TimingConfig,
    _first_line,
    add_speedups,
    bench,
    case_entries,
    environment,
    free_memory,
    is_oom,
    markdown_with_gate,
    memory_note,
    peak_memory_bytes,
    row_emitter,
)
from benchmarks.harness import _row as harness_row
from benchmarks.harness import write_results as harness_write_results
from fastattn_icl.testing import GRAD_FACTOR, check_close, max_error, tolerance

OURS = "fastattn_icl"
EAGER = "eager"
PROVIDERS = (OURS, EAGER)
MODE = "epoch"
GATE_BETA_STD = 0.5
GATE_MAX_BATCH = 4

TEMPLATE = "Review: {x}\nSentiment: {y}\n"
LABEL_WORDS = ["negative", "positive"]
_POSITIVE = ["great", "lovely", "superb", "fun", "charming", "moving", "brilliant", "warm", "funny", "smart"]
_NEGATIVE = ["awful", "dull", "boring", "bad", "clumsy", "tedious", "weak", "bland", "flat", "messy"]
_NEUTRAL = (
    "the film movie was plot and acting story a very quite really it is of this that with its to in as but "
    "director cast script scenes ending characters performance music"
).split()
REVIEW_WORDS = (20, 24)  # SST-2 averages about 20 words per sentence (SPEC.md), so ~27 tokens per demonstration

# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class EpochCase:
    """One epoch setting: model shape, prompt geometry, training set and batch size."""

    name: str
    group: str
    layers: int
    heads: int
    d_model: int
    vocab: int
    demos_per_class: int
    train_per_class: int
    batch_size: int
    dtype: str = "bf16"
    classes: int = 2
    note: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    @property
    def num_examples(self) -> int:
        return self.train_per_class * self.classes

    @property
    def steps(self) -> int:
        return -(-self.num_examples // self.batch_size)

    @property
    def label(self) -> str:
        lengths = prompt_lengths(self)
        return (
            f"L{self.layers} H{self.heads} d_model {self.d_model} vocab {self.vocab} {self.dtype}, "
            f"{self.demos_per_class} demo/class, T {min(lengths)}-{max(lengths)}, "
            f"{self.num_examples} examples, batch {self.batch_size} ({self.steps} step{'s' if self.steps > 1 else ''})"
        )

    def flops(self, mode: str) -> None:
        return None

    def params(self) -> dict:
        lengths = prompt_lengths(self)
        return {**asdict(self), "T_min": min(lengths), "T_max": max(lengths), "steps": self.steps}


def _case(prefix: str, layers: int, d_model: int, dtype: str, demos: int, batch: int, note: str) -> EpochCase:
    """GPT2-XL's 25 heads, vocab 512; 4 examples per class at batch 1, one full batch of 16 otherwise."""
    per_class = 4 if batch == 1 else batch // 2
    name = f"{prefix}-sst2-{demos}demo-b{batch}"
    return EpochCase(
        name,
        prefix,
        layers,
        heads=25,
        d_model=d_model,
        vocab=512,
        demos_per_class=demos,
        train_per_class=per_class,
        batch_size=batch,
        dtype=dtype,
        note=note,
    )


def epoch_set(name: str, *, cuda: bool) -> list[EpochCase]:
    """``gpu``: GPT2-XL-shaped (48 layers, 25 heads, d_model 1600), bf16; ``cpu``: 2 layers, 25 heads of
    dimension 16 (d_model 400), fp32: the materialised ``P [B, 25, T, T]`` of the eager provider is GPT2-XL's
    per layer, the dense layers are 16x cheaper (at d_model 1600 the CPU set took ~6 minutes on one
    thread, the budget is one); ``tiny``: the smoke test's.
    ``default`` / ``all`` is ``gpu`` on CUDA and ``cpu`` otherwise; other set names have no epoch cases."""
    if name in ("default", "all"):
        name = "gpu" if cuda else "cpu"
    gpu_note = "GPT2-XL-shaped, vocab 512 instead of 50257"
    cpu_note = "GPT2-XL's 25 heads at head dim 16 (d_model 400), 2 layers, vocab 512"
    if name == "gpu":
        return [_case("gpt2-xl", 48, 1600, "bf16", d, b, gpu_note) for d in (1, 4) for b in (1, 16)]
    if name == "cpu":
        return [_case("gpt2-xl-cpu", 2, 400, "fp32", d, b, cpu_note) for d in (1, 4) for b in (1, 16)]
    if name == "tiny":
        return [
            EpochCase("tiny-b1", "tiny", 1, 4, 64, 128, 1, 1, 1, "fp32"),
            EpochCase("tiny-b2", "tiny", 1, 4, 64, 128, 1, 1, 2, "fp32"),
        ]
    return []


# ---------------------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def word_tokenizer():
    """A word-level ``tokenizers.Tokenizer`` over the task's words (one token per word or punctuation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(_POSITIVE + _NEGATIVE + _NEUTRAL + LABEL_WORDS + ["Review", "Sentiment", ":"]))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def _review(rng: random.Random, label: int) -> str:
    n = rng.randint(*REVIEW_WORDS)
    sentiment = rng.sample(_POSITIVE if label else _NEGATIVE, 3)
    words = [rng.choice(_NEUTRAL) for _ in range(n - 3)] + sentiment
    rng.shuffle(words)
    return " ".join(words)


@functools.lru_cache(maxsize=32)
def _examples(demos_per_class: int, train_per_class: int, classes: int = 2) -> tuple:
    """``(builder, examples)``: demonstrations interleaved by class, training examples alternating."""
    from fastattn_icl.methods import PromptBuilder

    rng = random.Random(1000 * demos_per_class + train_per_class)
    demos = [(_review(rng, c), c) for _ in range(demos_per_class) for c in range(classes)]
    builder = PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS[:classes], demos)
    train = [builder.example(_review(rng, c), c) for _ in range(train_per_class) for c in range(classes)]
    return builder, tuple(train)


def prompt_lengths(case: EpochCase) -> list[int]:
    _, examples = _examples(case.demos_per_class, case.train_per_class, case.classes)
    return [len(e.input_ids) for e in examples]


# ---------------------------------------------------------------------------------------------- seed-style attention


def seed_style_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with the controller's anchor re-weighting, as the seed code does it.

    ``query [B, H, T, D]``, ``key``/``value [B, Hkv, T, D]``, ``attention_mask``: the seam's mask (``None``
    or bool ``[B, T]`` key padding, True = keep). Full passes only (no cache), the paper's setting (final
    query row re-weighted). Returns ``(out [B, T, H, D], None)``.
    """
    from fastattn_icl.integrations.controller import find_controller

    B, H, Tq, D = query.shape
    Tk = key.shape[2]
    if Tq != Tk:
        raise NotImplementedError("seed_style_attention: full passes only (no KV cache)")
    if key.shape[1] != H:
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        value = value.repeat_interleave(H // value.shape[1], dim=1)
    scale = D**-0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale  # [B, H, T, T]
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :Tk].bool()
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)  # [B, H, T, T], materialised
    controller = find_controller(module)
    state = controller.layer_state(module.layer_idx) if controller is not None else {}
    anchors = state.get("anchors")
    if anchors is not None:
        if anchors.reweight_from is not None:
            raise NotImplementedError("seed_style_attention: only the paper's final-row re-weighting")
        beta = state["beta"][module.layer_idx]  # [H, C]
        positions, classes = anchors.positions, anchors.classes
        if positions.shape[0] == 1:
            positions, classes = positions.expand(B, -1), classes.expand(B, -1)
        valid = (positions >= 0) & (positions < Tk)  # [B, A]
        log_w = beta.to(probs.dtype)[:, classes].permute(1, 0, 2) * valid[:, None, :]  # [B, H, A]
        index = positions.clamp(min=0)[:, None, :].expand(-1, H, -1)
        final_row = torch.zeros(B, H, Tk, dtype=probs.dtype, device=probs.device).scatter_add(2, index, log_w).exp()
        ones = torch.ones(B, H, Tq - 1, Tk, dtype=probs.dtype, device=probs.device)
        weights = torch.cat([ones, final_row[:, :, None, :]], dim=2)  # [B, H, T, T], materialised
        probs = probs * weights
    out = torch.matmul(probs.to(value.dtype), value)  # [B, H, T, D]
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def seed_style_installed():
    """Register :func:`seed_style_attention` under the seam's name for the block, then restore the seam."""
    from transformers import AttentionInterface

    from fastattn_icl.integrations import ATTN_IMPLEMENTATION

    saved = AttentionInterface._global_mapping[ATTN_IMPLEMENTATION]
    AttentionInterface.register(ATTN_IMPLEMENTATION, seed_style_attention)
    try:
        yield
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, saved)


def _provider_context(provider: str):
    return seed_style_installed() if provider == EAGER else contextlib.nullcontext()


def describe(provider: str, device: torch.device) -> str:
    if provider == OURS:
        kernel = "the fused Triton kernel" if device.type == "cuda" else "its CPU path, backend 'torch' (no CUDA)"
        return f"AnchorReweighting.fit through attn_implementation='fastattn_icl' (the seam: {kernel})"
    return (
        "AnchorReweighting.fit with benchmarks.bench_reweighting_epoch.seed_style_attention under the seam's "
        "name (seed-style: materialised P [B, H, T, T] times a materialised weight matrix, then P̂ V)"
    )


# ---------------------------------------------------------------------------------------------- model


def build_model(case: EpochCase, device: torch.device, dtype: torch.dtype):
    """Random-weight GPT2 of the case's shape on ``device`` in ``dtype`` (same weights for every dtype),
    frozen, eval mode, ``attn_implementation="fastattn_icl"``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=case.vocab,
        n_positions=1024,
        n_embd=case.d_model,
        n_layer=case.layers,
        n_head=case.heads,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    model = model.to(dtype).eval().requires_grad_(False)
    model.set_attn_implementation("fastattn_icl")
    return model


def _reweighting(model, case: EpochCase):
    from fastattn_icl.methods import AnchorReweighting

    builder, _ = _examples(case.demos_per_class, case.train_per_class, case.classes)
    return AnchorReweighting(model, builder.num_classes, builder.label_token_ids, pad_token_id=0)


# ---------------------------------------------------------------------------------------------- gate


def _dbeta(rw, examples, beta: torch.Tensor, provider: str) -> torch.Tensor:
    """``dbeta`` of one training step's loss (mean CE over the label-word logits, in float64)."""
    from fastattn_icl.methods import collate

    batch = collate(examples, rw.pad_token_id)
    device = rw.beta.device
    with torch.no_grad():
        rw.beta.copy_(beta.to(rw.beta.dtype))
    rw.beta.grad = None
    with _provider_context(provider), rw.applied(batch["anchor_positions"], batch["anchor_classes"]):
        logits = rw.model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            position_ids=batch["position_ids"].to(device),
            use_cache=False,
            logits_to_keep=1,
        ).logits
    logits = logits[:, -1, rw.label_token_ids].double()
    torch.nn.functional.cross_entropy(logits, batch["labels"].to(device)).backward()
    grad = rw.beta.grad.detach().clone()
    rw.beta.grad = None
    with torch.no_grad():
        rw.beta.zero_()
    return grad


def gate(case: EpochCase, rw, rw64) -> dict[str, dict]:
    """``{provider: check}`` in the harness's check format (``dbeta`` error and tolerance)."""
    _, examples = _examples(case.demos_per_class, case.train_per_class, case.classes)
    first = list(examples[: min(case.batch_size, GATE_MAX_BATCH)])
    gen = torch.Generator().manual_seed(7)
    beta = (GATE_BETA_STD * torch.randn(rw.beta.shape, generator=gen)).to(torch.bfloat16).double()
    ref64 = _dbeta(rw64, first, beta, EAGER)
    same = _dbeta(rw, first, beta, EAGER)
    scope = f"dbeta of one step on the first {len(first)} example(s) of the first batch, random beta"
    checks = {}
    for provider in PROVIDERS:
        got = same if provider == EAGER else _dbeta(rw, first, beta, provider)
        try:
            err, tol = check_close("dbeta", got, same, ref64, factor=GRAD_FACTOR)
            status, message = STATUS_OK, None
        except AssertionError as exc:
            err, tol = max_error(got, ref64), tolerance(same, ref64, factor=GRAD_FACTOR)
            status, message = STATUS_INCORRECT, str(exc)
        checks[provider] = {
            "status": status,
            "scope": scope,
            "errors": {"dbeta": {"error": err, "tolerance": tol}},
            "message": message,
            "dbeta_max_abs": float(ref64.abs().max()),
        }
    return checks


# ---------------------------------------------------------------------------------------------- running


def _row(case: EpochCase, provider: str, status: str, **kw) -> dict:
    """The harness's row, in the single ``epoch`` mode, with the per-example time this bench adds."""
    return harness_row(case, provider, MODE, status, **{"ms_per_example": None, **kw})


def _progress_line(row: dict) -> str:
    head = f"{row['case']:<30} {row['provider']:<13} {row['status']:<9}"
    if row["median_ms"] is None:
        return f"{head} {row['message'] or ''}"
    mem = "" if row["peak_mem_bytes"] is None else f"  peak {row['peak_mem_bytes'] / 2**20:.1f} MiB"
    check = row["check"]["errors"]["dbeta"] if row["check"] else None
    gate_text = f"  dbeta err {check['error']:.2e} / tol {check['tolerance']:.2e}" if check else ""
    return (
        f"{head} {row['median_ms']:.4g} ms [{row['p20_ms']:.4g}, {row['p80_ms']:.4g}]"
        f" ({row['ms_per_example']:.3g} ms/example){mem}{gate_text}"
    )


def time_epoch(case: EpochCase, rw, provider: str, device: torch.device, timing: TimingConfig) -> dict:
    """Timing statistics and peak memory of one epoch of ``fit``."""
    _, examples = _examples(case.demos_per_class, case.train_per_class, case.classes)
    examples = list(examples)

    def epoch():
        with torch.no_grad():
            rw.beta.zero_()
        rw.fit(examples, epochs=1, batch_size=case.batch_size, shuffle=False, progress=False)

    with _provider_context(provider):
        stats = bench(epoch, device, timing)
        mem = peak_memory_bytes(epoch, device)
    return {**stats, "peak_mem_bytes": mem}


def epoch_timing(rep_ms: float | None = None) -> TimingConfig:
    """Timing for calls of 0.1-10 s: no warm-up beyond the harness's untimed call(s); CUDA: ``rep_ms``
    (default 3000) of epochs, at least one; CPU: exactly 2 timed epochs (after the harness's 2 untimed
    ones) unless ``rep_ms`` asks for more, so ``make bench`` grows by well under a minute."""
    cuda_rep = 3000.0 if rep_ms is None else rep_ms
    cpu_rep = 0.0 if rep_ms is None else rep_ms
    return TimingConfig(cuda_warmup_ms=0.0, cuda_rep_ms=cuda_rep, cpu_warmup_ms=0.0, cpu_rep_ms=cpu_rep, cpu_min_reps=2)


def run_epoch_bench(
    cases, device: torch.device, *, timing: TimingConfig | None = None, progress=print, set_name: str = ""
) -> dict:
    """Gate and time both providers on every case; returns the harness's results dict."""
    timing = timing or epoch_timing()
    t_start = time.perf_counter()
    rows, skipped = [], []
    total = len(cases) * len(PROVIDERS)

    emit = row_emitter(rows, total, progress, _progress_line)

    cached = {}
    for case in cases:
        model = rw = rw64 = None
        try:
            key = (case.layers, case.heads, case.d_model, case.vocab, case.dtype)
            if key not in cached:
                cached.clear()
                free_memory(device)
                cached[key] = build_model(case, device, case.torch_dtype)
            model = cached[key]
            rw = _reweighting(model, case)
            model64 = build_model(case, device, torch.float64)
            model64.load_state_dict(model.state_dict())  # the benchmark dtype's (rounded) weights, upcast
            rw64 = _reweighting(model64, case)
            rw64.beta = torch.nn.Parameter(rw64.beta.detach().double())
            checks = gate(case, rw, rw64)
            del rw64, model64
            free_memory(device)
        except Exception as exc:
            status = STATUS_OOM if is_oom(exc) else STATUS_ERROR
            for p in PROVIDERS:
                emit(_row(case, p, status, message=f"gate: {_first_line(exc)}"))
            cached.clear()
            free_memory(device)
            continue
        for provider in PROVIDERS:
            check = checks[provider]
            try:
                stats = time_epoch(case, rw, provider, device, timing)
            except Exception as exc:
                emit(
                    _row(
                        case,
                        provider,
                        STATUS_OOM if is_oom(exc) else STATUS_ERROR,
                        check=check,
                        message=_first_line(exc),
                    )
                )
                free_memory(device)
                continue
            emit(
                _row(
                    case,
                    provider,
                    check["status"],
                    **stats,
                    check=check,
                    message=check["message"],
                    ms_per_example=stats["median_ms"] / case.num_examples,
                )
            )
            free_memory(device)
    cached.clear()
    free_memory(device)
    add_speedups(rows, list(PROVIDERS))
    if device.type != "cuda":
        skipped += [
            "Triton kernel not run: no CUDA; `fastattn_icl` rows are the seam's CPU path (backend 'torch')",
            "peak memory not measured: no CUDA (reported as null)",
            "CPU model: 2 layers, GPT2-XL's 25 heads at head dim 16 (d_model 400), fp32; CPU times are a smoke "
            "signal, not the GPU result",
        ]
    return {
        "op": "anchor re-weighting: one training epoch (AnchorReweighting.fit, forward + backward + Adam)",
        "set": set_name,
        "modes": [MODE],
        "header": environment(device),
        "timing": timing.describe(device) + "; one call = one epoch (beta reset to 0 first)",
        "memory": memory_note(
            device, "the frozen model's weights are allocated before and not counted", call="one epoch"
        ),
        "flop_model": "none (end-to-end epoch; TFLOP/s not reported)",
        "gate": (
            "one step's dbeta vs the seed-style implementation on a float64 copy of the model: error <= "
            f"{GRAD_FACTOR:g}x the seed-style implementation's own error in the benchmark dtype + 1e-5 * "
            "max(1, max|dbeta|); random beta ~ N(0, 0.5^2); first <= 4 examples of the first batch"
        ),
        "providers": [{"name": p, "description": describe(p, device)} for p in PROVIDERS],
        "cases": case_entries(cases),
        "skipped": skipped,
        "rows": rows,
        "targets": [],
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }


def write_results(results: dict, out_dir=None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<device-slug>-epoch.json`` and ``.md``; return both paths."""
    return harness_write_results(results, out_dir, suffix="-epoch", markdown=markdown_with_gate(results))
