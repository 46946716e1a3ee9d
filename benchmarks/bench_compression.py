"""Anchor compression end to end (SPEC.md §5, "Label Words are Anchors", Hidden_anchor): time per test input of
serving a batch over the compressed demonstrations vs running the full demonstrations with every test input,
and peak memory.

What one timed call does (``B`` test inputs; "per test input" = call time / ``B``), always in
``torch.inference_mode()`` on a ``model.eval()`` model with frozen random weights:

* ``full-eager`` (the paper's baseline, its code runs eager attention) and ``full-sdpa``: one forward of ``B``
  full prompts, the demonstrations followed by the test input (``T_demo + S`` tokens each, no padding),
  ``use_cache=False, logits_to_keep=1``, with the model's attention implementation switched to ``eager`` /
  ``sdpa`` (``model.set_attn_implementation``, outside the timed call). Transformers' GPT-J has no ``sdpa``
  attention: ``full-sdpa`` is skipped on it, with that reason.
* ``compressed`` (ours): ``comp.forward(model, test_ids [B, S], share_prefix=True, logits_to_keep=1)``, one
  shared copy of the compressed prefix read in place by the fused kernel through the ``"fastattn_icl"`` seam.
  The model is switched to the seam once, outside the timed call (``fastattn_icl.integrations.enabled``, as
  a server would load it; for GPT-J that is the ``patch_gptj`` patch), so ``comp.forward``'s own ``routed``
  finds it already there and switches nothing per call.
* ``compressed-expanded-sdpa`` / ``compressed-expanded-eager``: ``comp.forward(..., share_prefix=False)`` on the
  model with ``sdpa`` / ``eager`` attention: the naive Hugging Face way, a ``DynamicCache`` holding ``B``
  copies of the prefix (``expand``-ed views, concatenated with the test tokens' keys in every layer). They
  show what sharing the prefix buys; GPT-J has only the ``eager`` one.

``comp = CompressedDemonstrations.from_ids(model, demo_ids [T_demo], keep [M], method="hidden_anchor")`` is
built once per (model, dataset, demonstrations) outside the timed calls; building it (the demonstrations'
one forward with the seam, plus the ``gather_kv`` of every layer's kept positions) is timed separately as
``compress``, reported once per geometry with the prefix's size and the number of test inputs after which
it has paid for itself against ``full-eager`` at ``B = 1`` (``compress / (full-eager - compressed)`` per
input), since it amortises over every test input served with it.

Geometry (:mod:`benchmarks.shapes`): for dataset ``d`` with ``C`` classes and ``n`` demonstrations per class,
``n·C`` demonstrations of ``prompt_tokens(d, 1) - prompt_tokens(d, 0)`` tokens each (``T_demo`` in all) and a
test input of ``S = prompt_tokens(d, 0)`` tokens; random token ids (seeded by the model, dataset and ``n``).
Kept positions: the ``DEMO_TEMPLATE_TOKENS = 7`` template tokens of every demonstration, so ``M = 7·n·C``: by
the template of :mod:`benchmarks.shapes`, ``"<Input prefix>: <text>\\n<Answer prefix>: <label>\\n"``, a
demonstration's first ``TEMPLATE_HEAD = 2`` tokens (prefix, colon) and its last 5 (newline, prefix, colon,
label, newline), the same rule as ``benchmarks/bench_gather.py``; position 0 (where a tokenizer's BOS would
be) is the first demonstration's first token, so it is kept. Test tokens continue at ``T_demo`` (the last
kept position + 1, the default ``position_offset``).

Correctness gate (per model, dataset and ``n``, before any timing; on the first ``GATE_ROWS = 4`` test inputs,
last-position logits ``[4, V]``). The compressed and the full prompt are different computations by design
(the compression's fidelity is the business of ``evaluate_compression``, not of a benchmark), so each family
has its own reference, the eager implementation: ``compressed-expanded-eager`` for ``compressed`` and
``compressed-expanded-sdpa``, ``full-eager`` for ``full-sdpa`` (and for itself). The rule is the harness's
(:mod:`fastattn_icl.testing`) against a higher-precision copy of the model, ``REFERENCE_DTYPE``: float64 for
the float32 models of the CPU and tiny sets, float32 for the fp16 models of the GPU set (same weights, the
benchmark dtype's values upcast; the copy builds its own compressed cache; GPT-J's eager attention computes
``q kᵀ`` in float32 even in a float64 model): a provider's error against the copy's reference <= 2x the
error of the same-dtype eager reference + 1e-5 · max(1, max|logit|). The copy lives only while the gates of
its model run (a float32 GPT-J is 24 GiB next to the 12 GiB fp16 one), not during the timings.

Why not a relative tolerance on the half-precision logits alone: with random weights attention is nearly
uniform and the prefix moves the last-position logits little. On these models zeroing the values of one
kept position moves them by 0.5-2% of max|logit|, zeroing the whole prefix by 2-17%, and GPT-J's position
offset by well under 1%, so a rule like 2e-2 · max|logit| would pass such bugs; the float32 copy's rule, at
fp16's noise (about 5e-4 · max|logit| on the tiny models), does not. Only when the copy cannot be built
(out of memory) does the gate fall back to that relative rule against the same-dtype eager reference
(``REL_TOL``: 2e-2 for fp16), which the results then say.

A provider that fails the gate is timed but marked ``incorrect``, and no speed-up involving it is given.

Models (random weights, ``torch.manual_seed(0)``, built directly on the device from a config, no download;
one model at a time, freed before the next):

* GPU (``default``/``all`` on a GPU): fp16 GPT2-XL-shaped (48 layers, d_model 1600, 25 heads, 1024 positions,
  vocab 50257) and GPT-J-shaped (28 layers, d_model 4096, 16 heads, rotary_dim 64, 2048 positions, vocab
  50400); SST-2, TREC, AGNews and EmoC at 1 and 4 demonstrations per class; ``B`` in 1, 16, 64 (``--batch``
  replaces the three).
* CPU (``default``/``all`` without a GPU, ``cpu``): fp32, a small GPT-2 (4 layers, d_model 256, 4 heads) and a
  small GPT-J (4 layers, d_model 256, 4 heads, rotary_dim 16), vocabulary 1024 (so that the LM head is a
  GPT2-XL-like share of the parameters, 8%: at 50k it would be 80% of them); SST-2 and AGNews at 1 and 4
  demonstrations per class; ``B`` in 1, 8. About a minute on one thread; a smoke signal, not the GPU result.
* ``tiny``: the smoke test's (2 layers, d_model 64, vocab 512, SST-2 1/class, ``B`` 1 and 2, both families).

Targets (CUDA only; without CUDA they are listed as not evaluated, with the CPU figures for information):
at ``B = 1`` and 1 demonstration per class (the paper's setting), ``compressed`` vs ``full-eager`` at least
the paper's per-dataset speed-up (:data:`PAPER_SPEEDUPS`); at ``B = 64`` on the AGNews geometry (1 and 4
demonstrations per class), ``compressed`` throughput at least ``3x`` that of ``full-eager`` and, separately,
of ``full-sdpa`` (GPT2-XL only: GPT-J has no ``sdpa``).
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.harness import (
    STATUS_ERROR,
    STATUS_INCORRECT,
    STATUS_OK,
    STATUS_OOM,
    STATUS_SKIPPED,
    TimingConfig,
    _first_line,
    _row,
    add_speedups,
    bench,
    case_entries,
    environment,
    format_progress,
    free_memory,
    is_oom,
    markdown_with_gate,
    memory_note,
    peak_memory_bytes,
    row_emitter,
    speedup,
    targets_not_evaluated,
)
from benchmarks.harness import write_results as harness_write_results
from benchmarks.shapes import (
    DATASETS,
    DTYPES,
    DemonstrationGeometry,
    _feature_set,
    prompt_tokens,
)
from fastattn_icl.testing import FWD_FACTOR, check_close, max_error, tolerance

OURS = "compressed"
FULL_EAGER = "full-eager"
FULL_SDPA = "full-sdpa"
EXPANDED_SDPA = "compressed-expanded-sdpa"
EXPANDED_EAGER = "compressed-expanded-eager"
PROVIDERS = (OURS, FULL_EAGER, FULL_SDPA, EXPANDED_SDPA, EXPANDED_EAGER)
FULL = (FULL_EAGER, FULL_SDPA)
SEAM = "fastattn_icl"
# the attention implementation each provider runs the model with
IMPLEMENTATION = {OURS: SEAM, FULL_EAGER: "eager", FULL_SDPA: "sdpa", EXPANDED_SDPA: "sdpa", EXPANDED_EAGER: "eager"}
# the gate's reference of each provider: the eager implementation of the same computation
REFERENCE = {OURS: EXPANDED_EAGER, EXPANDED_SDPA: EXPANDED_EAGER, EXPANDED_EAGER: EXPANDED_EAGER}
REFERENCE |= {FULL_EAGER: FULL_EAGER, FULL_SDPA: FULL_EAGER}
MODE = "serve"

GATE_ROWS = 4
# the gate's reference copy of the model: float64 for float32 models, float32 for half-precision ones
REFERENCE_DTYPE = {"fp32": torch.float64, "fp16": torch.float32, "bf16": torch.float32}
UNTIMED = {"ms_per_input": None, "inputs_per_s": None}  # the per-input fields of a row that was not timed
REL_TOL = {"fp16": 2e-2, "bf16": 5e-2, "fp32": 1e-4}  # fallback only (module docstring)

# The paper's end-to-end speed-ups of Hidden_anchor over full ICL at batch 1, one demonstration per class (Wang
# et al., "Label Words are Anchors: An Information Flow Perspective for Understanding In-Context Learning",
# EMNLP 2023, arXiv:2305.14160, the acceleration-ratio table of §3.2); SPEC.md §5 gives their range,
# 1.1-2.9x per dataset, about 1.8x on average. Keyed by model family (GPT2-XL: "gpt2", GPT-J: "gptj").
PAPER_SPEEDUPS = {
    "gpt2": {"sst2": 1.1, "trec": 1.5, "agnews": 2.5, "emoc": 1.4},
    "gptj": {"sst2": 1.5, "trec": 2.2, "agnews": 2.9, "emoc": 1.9},
}
PAPER_PER_CLASS = 1
PAPER_BATCH = 1
THROUGHPUT_RATIO = 3.0
THROUGHPUT_BATCH = 64
THROUGHPUT_DATASET = "agnews"

GPU_DATASETS = ("sst2", "trec", "agnews", "emoc")
CPU_DATASETS = ("sst2", "agnews")
PER_CLASS = (1, 4)
GPU_BATCHES = (1, 16, 64)
CPU_BATCHES = (1, 8)
CPU_VOCAB = 1024


# ---------------------------------------------------------------------------------------------- models and cases


@dataclass(frozen=True)
class ModelSpec:
    """A random-weight decoder of one family (``"gpt2"`` or ``"gptj"``) and shape."""

    key: str
    family: str
    name: str
    layers: int
    d_model: int
    heads: int
    vocab: int
    positions: int
    rotary_dim: int | None = None
    dtype: str = "fp16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        rotary = f" rotary {self.rotary_dim}" if self.rotary_dim else ""
        return f"L{self.layers} d_model {self.d_model} H{self.heads}{rotary} vocab {self.vocab} {self.dtype}"

    def config(self):
        from transformers import GPT2Config, GPTJConfig

        common = dict(vocab_size=self.vocab, bos_token_id=self.vocab - 1, eos_token_id=self.vocab - 1)
        common |= dict(n_positions=self.positions, n_embd=self.d_model, n_layer=self.layers, n_head=self.heads)
        common |= dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        if self.family == "gpt2":
            return GPT2Config(**common)
        if self.family == "gptj":
            return GPTJConfig(rotary_dim=self.rotary_dim, **common)
        raise ValueError(f"unknown model family {self.family!r}")


MODEL_SPECS = {
    "gpt2-xl": ModelSpec("gpt2-xl", "gpt2", "GPT2-XL-shaped", 48, 1600, 25, 50257, 1024),
    "gpt-j": ModelSpec("gpt-j", "gptj", "GPT-J-shaped", 28, 4096, 16, 50400, 2048, rotary_dim=64),
    # vocab 1024: the LM head is 8% of the parameters, as in GPT2-XL (5%) and GPT-J (3.5%); at the real vocabularies
    # it would be 80% of them and dominate compress, which computes logits at every demonstration position
    "gpt2-cpu": ModelSpec("gpt2-cpu", "gpt2", "small GPT-2", 4, 256, 4, CPU_VOCAB, 1024, dtype="fp32"),
    "gptj-cpu": ModelSpec("gptj-cpu", "gptj", "small GPT-J", 4, 256, 4, CPU_VOCAB, 2048, rotary_dim=16, dtype="fp32"),
    "gpt2-tiny": ModelSpec("gpt2-tiny", "gpt2", "tiny GPT-2", 2, 64, 4, 512, 1024, dtype="fp32"),
    "gptj-tiny": ModelSpec("gptj-tiny", "gptj", "tiny GPT-J", 2, 64, 4, 512, 1024, rotary_dim=8, dtype="fp32"),
}


@dataclass(frozen=True)
class ServeCase(DemonstrationGeometry):
    """Serve ``B`` test inputs of ``dataset`` after ``per_class`` demonstrations per class on ``model``."""

    name: str
    group: str
    model: ModelSpec
    dataset: str
    per_class: int
    B: int
    note: str = ""

    @property
    def geometry(self) -> tuple[str, str, int]:
        """What the compressed cache and the gate depend on: (model, dataset, demonstrations per class)."""
        return self.model.key, self.dataset, self.per_class


    @property
    def S(self) -> int:
        """Tokens of one test input (text + query template)."""
        return prompt_tokens(self.dataset, 0)

    @property
    def label(self) -> str:
        return (
            f"{self.model.name} {self.model.label}, {self.demonstrations} {DATASETS[self.dataset].name} demos "
            f"({self.per_class}/class), B{self.B}, T_demo {self.T_demo} + S {self.S}, M {self.M}"
        )

    def flops(self, mode: str) -> None:
        return None

    def params(self) -> dict:
        return {
            **asdict(self),
            "model_key": self.model.key,
            "family": self.model.family,
            "demonstrations": self.demonstrations,
            "T_demo": self.T_demo,
            "S": self.S,
            "T_full": self.T_demo + self.S,
            "M": self.M,
        }


def serve_case(model: str, dataset: str, per_class: int, B: int, *, group: str | None = None) -> ServeCase:
    spec = MODEL_SPECS[model]
    note = f"{spec.name} ({spec.label}), {DATASETS[dataset].name}"
    return ServeCase(f"{model}-{dataset}-{per_class}pc-b{B}", group or model, spec, dataset, per_class, B, note)


def _cases(models, datasets, per_class, batches) -> list[ServeCase]:
    return [serve_case(m, ds, n, B) for m in models for ds in datasets for n in per_class for B in batches]


def compression_gpu_set(*, batch: int | None = None) -> list[ServeCase]:
    """fp16 GPT2-XL- and GPT-J-shaped models, every dataset at 1 and 4 demonstrations per class, B 1, 16, 64."""
    return _cases(("gpt2-xl", "gpt-j"), GPU_DATASETS, PER_CLASS, (batch,) if batch else GPU_BATCHES)


def compression_cpu_set(*, batch: int | None = None) -> list[ServeCase]:
    """fp32 small GPT-2 and GPT-J (4 layers, d_model 256), SST-2 and AGNews at 1 and 4 per class, B 1 and 8."""
    return _cases(("gpt2-cpu", "gptj-cpu"), CPU_DATASETS, PER_CLASS, (batch,) if batch else CPU_BATCHES)


def compression_tiny_set() -> list[ServeCase]:
    """The smoke test's: tiny GPT-2 and GPT-J (2 layers, d_model 64), SST-2 1/class, B 1 and 2."""
    return _cases(("gpt2-tiny", "gptj-tiny"), ("sst2",), (1,), (1, 2))


def compression_set(name: str, *, cuda: bool, batch: int | None = None) -> list[ServeCase]:
    """Cases of shape set ``name`` (the names of ``benchmarks.run --set``): ``default`` and ``all`` are the GPU
    set on a GPU and the CPU set otherwise, ``cpu`` the CPU set, ``tiny`` the smoke test's; the other sets have
    no compression cases (``[]``)."""
    return _feature_set(
        name, "compression", compression_gpu_set, compression_cpu_set, compression_tiny_set, cuda, batch
    )


# ---------------------------------------------------------------------------------------------- model and inputs


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype | None = None):
    """The random-weight model of ``spec`` built directly on ``device`` (``torch.manual_seed(0)``), eval mode,
    frozen, eager attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            spec.config(), dtype=dtype or spec.torch_dtype, attn_implementation="eager"
        )
    return model.eval().requires_grad_(False)


def has_sdpa(model) -> bool:
    return bool(getattr(type(model), "_supports_sdpa", False))


def skip_reason(provider: str, model) -> str | None:
    if IMPLEMENTATION[provider] == "sdpa" and not has_sdpa(model):
        return (
            f"transformers' {type(model).__name__} has no sdpa attention (it does not route attention through "
            "AttentionInterface; eager only)"
        )
    return None


@contextlib.contextmanager
def provider_context(model, provider: str):
    """Run the block with the model on ``provider``'s attention implementation; restore it after."""
    impl = IMPLEMENTATION[provider]
    if impl == SEAM:
        from fastattn_icl.integrations import enabled

        with enabled(model):
            yield
        return
    previous = model.config._attn_implementation
    if previous == impl:
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass
class GeometryInputs:
    """Token ids of one (model, dataset, n): ``demo_ids [T_demo]``, ``test_ids [rows, S]``, ``keep [M]``."""

    demo_ids: torch.Tensor
    test_ids: torch.Tensor
    keep: torch.Tensor

    def full_ids(self, B: int) -> torch.Tensor:
        """``[B, T_demo + S]``: the demonstrations followed by each of the first ``B`` test inputs."""
        return torch.cat([self.demo_ids.expand(B, -1), self.test_ids[:B]], dim=1)


def make_inputs(case: ServeCase, rows: int, device: torch.device) -> GeometryInputs:
    """Random token ids (seeded by the geometry) on ``device``; ``rows`` test inputs."""
    gen = torch.Generator().manual_seed(zlib.crc32("-".join(map(str, case.geometry)).encode()))
    vocab = case.model.vocab
    demo = torch.randint(0, vocab, (case.T_demo,), generator=gen)
    test = torch.randint(0, vocab, (rows, case.S), generator=gen)
    keep = torch.tensor(case.positions(), dtype=torch.long)
    return GeometryInputs(demo.to(device), test.to(device), keep)


def compress(model, inp: GeometryInputs):
    from fastattn_icl.methods.compression import CompressedDemonstrations

    return CompressedDemonstrations.from_ids(model, inp.demo_ids, inp.keep, method="hidden_anchor")


def serve_fn(provider: str, model, comp, inp: GeometryInputs, B: int) -> Callable[[], torch.Tensor]:
    """The timed call of ``provider`` on the first ``B`` test inputs: returns logits ``[B, 1, V]``."""
    if provider in FULL:
        ids = inp.full_ids(B)

        def full():
            with torch.inference_mode():
                return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        return full
    test_ids, share = inp.test_ids[:B], provider == OURS

    def compressed():
        with torch.inference_mode():
            return comp.forward(model, test_ids, share_prefix=share, logits_to_keep=1)

    return compressed


# ---------------------------------------------------------------------------------------------- gate


def _last_logits(provider: str, model, comp, inp: GeometryInputs, rows: int) -> torch.Tensor:
    with provider_context(model, provider):
        return serve_fn(provider, model, comp, inp, rows)()[:, -1].detach().float().cpu().clone()


def build_reference(model, spec: ModelSpec, device: torch.device):
    """The gate's reference copy of ``model``: the same weights (the benchmark dtype's, upcast) in
    ``REFERENCE_DTYPE[spec.dtype]``."""
    ref = build_model(spec, device, REFERENCE_DTYPE[spec.dtype])
    ref.load_state_dict(model.state_dict())
    return ref


def gate(case: ServeCase, model, comp, inp: GeometryInputs, providers, *, ref_model=None) -> dict:
    """``{provider: check}`` in the harness's check format, or ``{provider: (status, message)}`` when a
    provider (or its reference) raised. ``ref_model``: the higher-precision copy (:func:`build_reference`);
    without it (it could not be built), the relative fallback rule ``REL_TOL``."""
    rows = min(GATE_ROWS, inp.test_ids.shape[0])
    needed = [p for p in providers if not skip_reason(p, model)]
    logits, failed = {}, {}
    for p in dict.fromkeys([REFERENCE[p] for p in needed] + needed):
        try:
            logits[p] = _last_logits(p, model, comp, inp, rows)
        except Exception as exc:
            failed[p] = (STATUS_OOM if is_oom(exc) else STATUS_ERROR, f"gate: {_first_line(exc)}")
        _release(model.device)
    high = {}
    if ref_model is not None:
        try:
            comp_high = compress(ref_model, inp)
            for ref in dict.fromkeys(REFERENCE[p] for p in needed):
                high[ref] = _last_logits(ref, ref_model, comp_high, inp, rows).double()
            del comp_high
        except Exception as exc:
            failed["reference copy"] = (STATUS_OOM if is_oom(exc) else STATUS_ERROR, f"gate: {_first_line(exc)}")
        _release(model.device)
    dtype = case.model.dtype
    checks = {}
    for p in needed:
        ref = REFERENCE[p]
        broken = failed.get(p) or failed.get(ref) or failed.get("reference copy")
        if broken:
            checks[p] = broken if p in failed else (broken[0], f"{broken[1]} (the gate's reference)")
            continue
        got, same = logits[p], logits[ref]
        head = f"last-position logits of the first {rows} test inputs"
        if ref_model is not None:
            high_name = str(ref_model.dtype).removeprefix("torch.")
            scope = (
                f"{head} vs a {high_name} copy of the model ({ref} there, same weights upcast): error <= "
                f"{FWD_FACTOR:g}x {ref}'s own {dtype} error + 1e-5 * max(1, max|logit|)"
            )
            try:
                err, tol = check_close("logits", got, same, high[ref], factor=FWD_FACTOR)
                status, message = STATUS_OK, None
            except AssertionError as exc:
                err, tol = max_error(got, high[ref]), tolerance(same, high[ref], factor=FWD_FACTOR)
                status, message = STATUS_INCORRECT, str(exc)
        else:
            rel = REL_TOL[dtype]
            err, tol = max_error(got, same), rel * float(same.abs().max())
            scope = (
                f"{head} vs {ref} in {dtype} (fallback: no higher-precision copy of the model): max abs error "
                f"<= {rel:g} * max|logit|" + (f"; {p} is the reference, not checked itself" if p == ref else "")
            )
            ok = err <= tol
            status = STATUS_OK if ok else STATUS_INCORRECT
            message = None if ok else f"logits: max error {err:.3e} > tolerance {tol:.3e} ({rel:g} * max|logit|)"
        checks[p] = {
            "status": status,
            "scope": scope,
            "errors": {"logits": {"error": err, "tolerance": tol}},
            "message": message,
            "logits_max_abs": float(same.abs().max()),
        }
    return checks


# ---------------------------------------------------------------------------------------------- targets


def _rate(x: float) -> str:
    """Test inputs per second: 4 significant digits, whole numbers from 1000 on (no exponent)."""
    return f"{x:.4g}" if x < 1000 else f"{x:.0f}"


def _find(rows: list[dict], provider: str, **params) -> dict | None:
    for r in rows:
        if r["provider"] == provider and all(r["params"].get(k) == v for k, v in params.items()):
            return r
    return None


def _verdict(results: list[bool | None]) -> str:
    if not results:
        return "N/A"
    if False in results:
        return "FAIL"
    return "N/A" if None in results else "PASS"


def targets(rows: list[dict], *, evaluated: bool = True) -> list[dict]:
    """The paper's per-dataset speed-ups at ``B = 1`` and the ``3x`` throughput at ``B = 64`` on AGNews (module
    docstring): PASS / FAIL / N/A; with ``evaluated=False`` (no CUDA) ``not evaluated``, the measured figures
    in the detail for information only."""
    out = []
    models = dict.fromkeys((r["params"]["model_key"], r["params"]["family"]) for r in rows)
    for key, family in models:
        datasets = dict.fromkeys(r["params"]["dataset"] for r in rows if r["params"]["model_key"] == key)
        for ds in datasets:
            paper = PAPER_SPEEDUPS.get(family, {}).get(ds)
            if paper is None:
                continue
            where = dict(model_key=key, dataset=ds, per_class=PAPER_PER_CLASS, B=PAPER_BATCH)
            ours, base = _find(rows, OURS, **where), _find(rows, FULL_EAGER, **where)
            name = (
                f"{key} {DATASETS[ds].name}, B {PAPER_BATCH}, {PAPER_PER_CLASS} demo/class: {OURS} vs {FULL_EAGER} "
                f">= {paper:g}x (the paper's)"
            )
            if ours is None:
                out.append({"target": name, "result": "N/A", "detail": "no such row in this run"})
                continue
            ratio, text = speedup(ours, base)
            if ratio is None:
                result = "N/A" if ours["status"] in (STATUS_OK, STATUS_SKIPPED) else "FAIL"
                detail = f"not compared: {text}"
            else:
                result = "PASS" if ratio >= paper else "FAIL"
                detail = (
                    f"{ratio:.2f}x ({OURS} {ours['median_ms']:.4g} ms vs {FULL_EAGER} {base['median_ms']:.4g} ms; "
                    f"T_demo {ours['params']['T_demo']} + S {ours['params']['S']}, M {ours['params']['M']}); "
                    f"paper {paper:g}x"
                )
            out.append({"target": name, "result": result, "detail": detail})
        mine = [r for r in rows if r["params"]["model_key"] == key and r["params"]["dataset"] == THROUGHPUT_DATASET]
        if not mine:
            continue
        batches = {r["params"]["B"] for r in mine}
        B = THROUGHPUT_BATCH if THROUGHPUT_BATCH in batches else max(batches)
        at = "" if B == THROUGHPUT_BATCH else f" (this set's largest; the target is at B {THROUGHPUT_BATCH})"
        per_class = sorted({r["params"]["per_class"] for r in mine})
        for base_name in FULL:
            verdicts, parts = [], []
            for n in per_class:
                where = dict(model_key=key, dataset=THROUGHPUT_DATASET, per_class=n, B=B)
                ours, base = _find(rows, OURS, **where), _find(rows, base_name, **where)
                ratio, text = speedup(ours, base) if ours is not None else (None, "n/a (no row)")
                if ratio is None:
                    bad = ours is not None and ours["status"] not in (STATUS_OK, STATUS_SKIPPED)
                    verdicts.append(False if bad else None)
                    parts.append(f"{n}/class: {text}")
                else:
                    verdicts.append(ratio >= THROUGHPUT_RATIO)
                    parts.append(
                        f"{n}/class: {ratio:.2f}x ({_rate(B / ours['median_ms'] * 1e3)} vs "
                        f"{_rate(B / base['median_ms'] * 1e3)} inputs/s)"
                    )
            out.append(
                {
                    "target": f"{key} {DATASETS[THROUGHPUT_DATASET].name}, B {THROUGHPUT_BATCH}: {OURS} throughput "
                    f">= {THROUGHPUT_RATIO:g}x {base_name} ({', '.join(map(str, per_class))} demo/class)",
                    "result": _verdict(verdicts),
                    "detail": f"at B {B}{at}: " + "; ".join(parts),
                }
            )
    return out if evaluated else targets_not_evaluated(out)


# ---------------------------------------------------------------------------------------------- running


def compression_timing(rep_ms: float | None = None) -> TimingConfig:
    """CUDA: the harness's defaults (25 ms warm-up, 100 ms of calls); CPU: no warm-up beyond the harness's two
    untimed calls, ``rep_ms`` (default 100) of timed calls, at least 2, so ``make bench`` stays short."""
    timing = TimingConfig(cpu_warmup_ms=0.0, cpu_rep_ms=100.0, cpu_min_reps=2, cpu_max_reps=20)
    if rep_ms is not None:
        timing.cuda_rep_ms = timing.cpu_rep_ms = rep_ms
    return timing


def describe(provider: str, device: torch.device) -> str:
    kernel = "the fused Triton kernel" if device.type == "cuda" else "its CPU path, backend 'torch' (no CUDA)"
    if provider == OURS:
        return (
            "comp.forward(model, test_ids, share_prefix=True, logits_to_keep=1): one shared prefix copy read in "
            f"place through the 'fastattn_icl' seam ({kernel}); the model is switched to the seam (GPT-J: "
            "patch_gptj) once, outside the timed call"
        )
    if provider in FULL:
        return (
            f"model(full_ids [B, T_demo + S], use_cache=False, logits_to_keep=1) with "
            f"attn_implementation='{IMPLEMENTATION[provider]}': the demonstrations run again with every test input"
            + (" (the paper's code)" if provider == FULL_EAGER else "")
        )
    return (
        "comp.forward(model, test_ids, share_prefix=False, logits_to_keep=1) with "
        f"attn_implementation='{IMPLEMENTATION[provider]}': a DynamicCache holding B copies of the prefix (the "
        "standard Hugging Face way)"
    )


def platform_notes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    return [
        "Triton kernel not run: no CUDA; the compressed rows are the seam's CPU path (backend 'torch')",
        "peak memory not measured: no CUDA (reported as null; torch's CPU allocator keeps no peak counter)",
        "targets not evaluated: no CUDA",
        f"CPU models: 4 layers, d_model 256, vocab {CPU_VOCAB}, fp32; CPU times are a smoke signal, not the GPU result",
    ]


def _progress_line(row: dict) -> str:
    return format_progress(row, columns=(("case", 28), ("provider", 26)),
                           rate=lambda r: f"{r['ms_per_input']:.4g} ms/input  {_rate(r['inputs_per_s'])} inputs/s")


def _release(device: torch.device) -> None:
    """The harness's ``free_memory`` between calls on CUDA; on CPU it is only ``gc.collect`` (~0.3 s a call,
    a hundred calls in the CPU set) and reference counting frees the tensors anyway: once per model there."""
    if device.type == "cuda":
        free_memory(device)


def _groups(cases) -> dict:
    """``{model key: {(dataset, n): [cases]}}`` in the order of ``cases``."""
    out: dict = {}
    for c in cases:
        out.setdefault(c.model.key, {}).setdefault((c.dataset, c.per_class), []).append(c)
    return out


def run_compression_bench(
    cases,
    device: torch.device,
    *,
    timing: TimingConfig | None = None,
    progress=print,
    set_name: str = "",
    provider_names=None,
) -> dict:
    """Build each model once, compress each geometry once (timed), gate, then time every provider at every
    ``B``; returns the harness's results dict (plus ``compress``: one entry per geometry)."""
    timing = timing or compression_timing()
    t_start = time.perf_counter()
    provs = [p for p in PROVIDERS if provider_names is None or p in provider_names]
    rows, skipped, compressions = [], [], []
    total = len(cases) * len(provs)

    emit = row_emitter(rows, total, progress, _progress_line)

    for key, geometries in _groups(cases).items():
        spec = next(iter(geometries.values()))[0].model
        model = ref_model = None
        try:
            model = build_model(spec, device)
        except Exception as exc:
            status, message = STATUS_OOM if is_oom(exc) else STATUS_ERROR, f"model: {_first_line(exc)}"
            model = None
            free_memory(device)
            for bcases in geometries.values():
                for case in bcases:
                    for p in provs:
                        emit(_row(case, p, MODE, status, message=message, **UNTIMED))
            continue
        try:
            ref_model = build_reference(model, spec, device)
        except Exception as exc:
            ref_model = None
            free_memory(device)
            skipped.append(
                f"gate on {key}: no {REFERENCE_DTYPE[spec.dtype]} copy of the model ({_first_line(exc)}); the "
                f"relative fallback rule ({REL_TOL[spec.dtype]:g} * max|logit|) applies, which is weak on "
                "random-weight models (module docstring)"
            )
        reasons = {p: skip_reason(p, model) for p in provs}
        skipped += [f"{p} on {key}: {r}" for p, r in reasons.items() if r]
        # first every geometry's compression (timed) and gate, with the reference copy; then, without it, the timings
        prepared = []
        for (dataset, n), bcases in geometries.items():
            first = bcases[0]
            entry = {
                "geometry": f"{key}-{dataset}-{n}pc",
                "model": key,
                "dataset": dataset,
                "per_class": n,
                "T_demo": first.T_demo,
                "M": first.M,
                "status": STATUS_OK,
                "median_ms": None,
                "p20_ms": None,
                "p80_ms": None,
                "prefix_bytes": None,
                "message": None,
            }
            compressions.append(entry)
            try:
                inp = make_inputs(first, max(GATE_ROWS, *(c.B for c in bcases)), device)

                def build(_model=model, _inp=inp):
                    with torch.inference_mode():
                        return compress(_model, _inp)

                with provider_context(model, OURS):
                    comp = build()
                    stats = bench(build, device, timing)
                _release(device)
                entry.update(stats, prefix_bytes=comp.keys.nbytes + comp.values.nbytes)
                checks = gate(first, model, comp, inp, provs, ref_model=ref_model)
            except Exception as exc:
                status, message = STATUS_OOM if is_oom(exc) else STATUS_ERROR, f"compress: {_first_line(exc)}"
                entry.update(status=status, message=message)
                prepared.append((bcases, None, None, {p: (status, message) for p in provs}))
                _release(device)
                continue
            prepared.append((bcases, comp, inp, checks))
        del ref_model
        free_memory(device)
        for bcases, comp, inp, checks in prepared:
            for case in bcases:
                for p in provs:
                    if reasons[p]:
                        emit(_row(case, p, MODE, STATUS_SKIPPED, message=reasons[p], **UNTIMED))
                        continue
                    check = checks[p]
                    if isinstance(check, tuple):
                        emit(_row(case, p, MODE, check[0], message=check[1], **UNTIMED))
                        continue
                    fn = serve_fn(p, model, comp, inp, case.B)
                    try:
                        with provider_context(model, p):
                            stats = bench(fn, device, timing)
                            mem = peak_memory_bytes(fn, device)
                    except Exception as exc:  # the traceback (and the tensors its frames hold) is dropped here
                        status = STATUS_OOM if is_oom(exc) else STATUS_ERROR
                        emit(_row(case, p, MODE, status, check=check, message=_first_line(exc), **UNTIMED))
                        _release(device)
                        continue
                    finally:
                        del fn
                    _release(device)
                    emit(
                        _row(
                            case,
                            p,
                            MODE,
                            check["status"],
                            **stats,
                            peak_mem_bytes=mem,
                            check=check,
                            message=check["message"],
                            ms_per_input=stats["median_ms"] / case.B,
                            inputs_per_s=case.B / (stats["median_ms"] * 1e-3),
                        )
                    )
        del model, prepared
        free_memory(device)
    add_speedups(rows, provs)
    _break_even(compressions, rows)
    return {
        "op": "anchor compression end to end: serve test inputs over the compressed demonstrations vs full prompts",
        "set": set_name,
        "modes": [MODE],
        "header": environment(device),
        "timing": timing.describe(device) + "; one call = one batch of B test inputs (ms per test input = median "
        "/ B); compress = CompressedDemonstrations.from_ids once (the demonstrations' forward + gather_kv)",
        "memory": memory_note(
            device,
            "the model's weights and the compressed prefix are allocated before and not counted (prefix size: the "
            "compress table)",
        ),
        "flop_model": "none (end-to-end model forwards; TFLOP/s not reported)",
        "gate": (
            "per model, dataset and demonstrations per class, last-position logits of the first "
            f"{GATE_ROWS} test inputs vs the eager implementation of the same computation ({EXPANDED_EAGER} for "
            f"the compressed providers, {FULL_EAGER} for the full ones) on a higher-precision copy of the model "
            "(float64 for float32 models, float32 for half-precision ones; same weights, upcast): error <= "
            f"{FWD_FACTOR:g}x the same-dtype eager reference's own error + 1e-5 * max(1, max|logit|). Fallback "
            "when the copy cannot be built (named under 'Skipped'): max abs error vs the same-dtype eager "
            "reference <= " + ", ".join(f"{v:g} ({k})" for k, v in REL_TOL.items()) + " * max|logit|"
        ),
        "providers": [{"name": p, "description": describe(p, device)} for p in provs],
        "cases": case_entries(cases),
        "compress": compressions,
        "skipped": platform_notes(device) + skipped,
        "rows": rows,
        "targets": targets(rows, evaluated=device.type == "cuda"),
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }


def _break_even(compressions: list[dict], rows: list[dict]) -> None:
    """``break_even_inputs``: test inputs after which compressing has paid for itself against ``full-eager``
    at ``B = 1`` (``compress / (full-eager - compressed)`` per input; ``None`` when not faster or not run)."""
    for e in compressions:
        where = dict(model_key=e["model"], dataset=e["dataset"], per_class=e["per_class"], B=1)
        ours, base = _find(rows, OURS, **where), _find(rows, FULL_EAGER, **where)
        ratio = speedup(ours, base)[0] if ours is not None else None
        saved = None if ratio is None else base["median_ms"] - ours["median_ms"]
        e["break_even_inputs"] = e["median_ms"] / saved if saved and saved > 0 and e["median_ms"] else None


# ---------------------------------------------------------------------------------------------- results


def _cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    if row["median_ms"] is None:
        return row["status"]
    flag = "" if row["status"] == STATUS_OK else f", {row['status']}"
    mem = "" if row["peak_mem_bytes"] is None else f", {row['peak_mem_bytes'] / 2**20:.0f} MiB"
    return f"{row['ms_per_input']:.4g} ({_rate(row['inputs_per_s'])}/s{mem}{flag})"


def side_by_side(results: dict) -> str:
    """Markdown: the compress table, then per case every provider's ms per test input, throughput and peak
    memory, and the speed-up of ``compressed`` vs each other provider."""
    rows = results["rows"]
    provs = [p["name"] for p in results["providers"]]
    vs = [p for p in provs if p != OURS] if OURS in provs else []
    lines = [
        "## Compression (once per geometry, amortised over every test input)",
        "",
        "| geometry | T_demo | M | compress ms (p20–p80) | prefix MiB | break-even vs full-eager at B 1 (inputs) |",
        "|---|---|---|---|---|---|",
    ]
    for e in results.get("compress", []):
        if e["median_ms"] is None:
            ms = f"{e['status']}: {e['message']}"
        else:
            ms = f"{e['median_ms']:.4g} ({e['p20_ms']:.4g}–{e['p80_ms']:.4g})"
        mib = "—" if e["prefix_bytes"] is None else f"{e['prefix_bytes'] / 2**20:.3g}"
        even = "—" if e.get("break_even_inputs") is None else f"{e['break_even_inputs']:.3g}"
        lines.append(f"| {e['geometry']} | {e['T_demo']} | {e['M']} | {ms} | {mib} | {even} |")
    lines += [
        "",
        "## Time per test input, throughput and peak memory",
        "",
        "ms per test input (test inputs per second"
        + (", peak MiB" if any(r["peak_mem_bytes"] is not None for r in rows) else "")
        + "); speed-up = the other provider's time / compressed's, same B",
        "",
        "| case | T_demo + S, M | " + " | ".join(provs) + "".join(f" | {OURS} vs {p}" for p in vs) + " |",
        "|---|---|" + "---|" * (len(provs) + len(vs)),
    ]
    for name in dict.fromkeys(r["case"] for r in rows):
        by = {r["provider"]: r for r in rows if r["case"] == name}
        params = next(iter(by.values()))["params"]
        cells = [_cell(by.get(p)) for p in provs]
        cells += [by[OURS]["speedup_text"].get(p, "n/a") if OURS in by else "n/a" for p in vs]
        lines.append(f"| {name} | {params['T_demo']} + {params['S']}, {params['M']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir=None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<device-slug>-compression.json`` and ``.md``; return both paths."""
    md = markdown_with_gate(results).replace("\n## Summary:", "\n" + side_by_side(results) + "\n## Summary:", 1)
    return harness_write_results(results, out_dir, suffix="-compression", markdown=md)
