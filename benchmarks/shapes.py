"""Named attention shape sets for the benchmarks.

Four sets:

* ``acceptance``: the issue's targets, bf16, ``d = 128``, causal, ``T`` in 1k, 2k, 4k, 8k, 16k with
  ``B · T = 16k`` tokens (``B = 16384 // T``) and ``H = 16`` heads. ``H = 16`` at ``d = 128`` is
  model dim 2048, the setting of the FlashAttention benchmark that the published H100 figures in
  SPEC.md ("hd 128, 16k tokens") come from, so our TFLOP/s can be compared with them.
* ``papers``: the papers' models at the prompt lengths of 1, 2, 4, 8 and 16 demonstrations, bf16,
  batch 1 (the authors' code runs batch 1; ``--batch`` in ``benchmarks.run`` changes it):
  GPT2-XL (H 25, d 64), GPT-J (H 16, d 256), Llama-7B-like (H 32, d 128), GQA (H 32 / Hkv 8, d 128).
* ``cpu``: float32 shapes small enough for a 2-core CPU (``make bench`` without a GPU): the same
  head geometries at short prompts.
* ``tiny``: one tiny shape for the smoke test.

Prompt geometry (SPEC.md, "Reference figures for benchmarks"), the rule that turns a number of
demonstrations into tokens, :func:`prompt_tokens`::

    text_tokens = ceil(words_per_input · TOKENS_PER_WORD)            # TOKENS_PER_WORD = 1.3
    T(n) = n · (text_tokens + DEMO_TEMPLATE_TOKENS) + (text_tokens + QUERY_TEMPLATE_TOKENS)

A demonstration is ``"<Input prefix>: <text>\\n<Answer prefix>: <label>\\n"``: prefix word + colon
(2 tokens), the newline, answer prefix + colon (2), one label token and the trailing newline, so
``DEMO_TEMPLATE_TOKENS = 7``; the test input has no label and no trailing newline
(``QUERY_TEMPLATE_TOKENS = 5``). 1.3 tokens per word is the usual GPT-2 BPE rate on English text.
Average input lengths in words: SST-2 20, TREC 10, AGNews 40, EmoC 15. The ``papers`` set uses
AGNews, the longest inputs (the compression paper's largest speed-up), e.g. 16 demonstrations are
1001 tokens; SST-2 at one demonstration per class (n = 2) is 97 tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

TOKENS_PER_WORD = 1.3
DEMO_TEMPLATE_TOKENS = 7
QUERY_TEMPLATE_TOKENS = 5
TEMPLATE_HEAD = 2  # template tokens that open a demonstration ("<Input prefix>", ":"); the rest close it


class DemonstrationGeometry:
    """Properties of a benchmark case with fields ``dataset`` (a :data:`DATASETS` key) and ``per_class``
    (demonstrations per class): the demonstrations' count and lengths by the rule of :func:`prompt_tokens`, and the
    kept anchor positions of :func:`template_positions`."""

    dataset: str
    per_class: int

    @property
    def demonstrations(self) -> int:
        return DATASETS[self.dataset].classes * self.per_class

    @property
    def demo_tokens(self) -> int:
        """Tokens of one demonstration (text + template), by the rule of :func:`prompt_tokens`."""
        return prompt_tokens(self.dataset, 1) - prompt_tokens(self.dataset, 0)

    @property
    def T_demo(self) -> int:
        """Tokens of all the demonstrations."""
        return self.demonstrations * self.demo_tokens

    @property
    def M(self) -> int:
        """Kept positions: every demonstration's template tokens."""
        return self.demonstrations * DEMO_TEMPLATE_TOKENS

    def positions(self) -> list[int]:
        """The kept positions (:func:`template_positions`), in order; position 0 is among them."""
        return template_positions(self.demonstrations, self.demo_tokens)


def template_positions(demonstrations: int, demo_tokens: int) -> list[int]:
    """The anchor positions of ``demonstrations`` back-to-back demonstrations of ``demo_tokens`` tokens each: every
    demonstration's template tokens, its first ``TEMPLATE_HEAD`` and its last ``DEMO_TEMPLATE_TOKENS -
    TEMPLATE_HEAD`` (newline, answer prefix, colon, label, newline), in order; position 0 is among them."""
    tail = DEMO_TEMPLATE_TOKENS - TEMPLATE_HEAD
    out: list[int] = []
    for i in range(demonstrations):
        start, end = i * demo_tokens, (i + 1) * demo_tokens
        out += list(range(start, start + TEMPLATE_HEAD)) + list(range(end - tail, end))
    return out


@dataclass(frozen=True)
class Dataset:
    name: str
    words_per_input: int
    classes: int


DATASETS = {
    "sst2": Dataset("SST-2", 20, 2),
    "trec": Dataset("TREC", 10, 6),
    "agnews": Dataset("AGNews", 40, 4),
    "emoc": Dataset("EmoC", 15, 4),
}


@dataclass(frozen=True)
class Model:
    name: str
    heads: int
    kv_heads: int
    head_dim: int


MODELS = {
    "gpt2-xl": Model("GPT2-XL", 25, 25, 64),
    "gpt-j": Model("GPT-J", 16, 16, 256),
    "llama-7b": Model("Llama-7B-like", 32, 32, 128),
    "llama-gqa": Model("GQA 32/8", 32, 8, 128),
}

DEMONSTRATIONS = (1, 2, 4, 8, 16)
ACCEPTANCE_TOKENS = 16384
ACCEPTANCE_LENGTHS = (1024, 2048, 4096, 8192, 16384)


def prompt_tokens(dataset: str, demonstrations: int) -> int:
    """Tokens in a prompt of ``demonstrations`` labelled examples of ``dataset`` plus the test input."""
    if demonstrations < 0:
        raise ValueError(f"demonstrations must be >= 0, got {demonstrations}")
    text = math.ceil(DATASETS[dataset].words_per_input * TOKENS_PER_WORD)
    return demonstrations * (text + DEMO_TEMPLATE_TOKENS) + text + QUERY_TEMPLATE_TOKENS


@dataclass(frozen=True)
class AttnShape:
    """One benchmark case of ``attention(q [B, H, Tq, D], k/v [B, Hkv, Tk, D])``."""

    name: str
    group: str
    B: int
    H: int
    Hkv: int
    Tq: int
    Tk: int
    D: int
    causal: bool = True
    dtype: str = "bf16"
    note: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        heads = f"H{self.H}" if self.H == self.Hkv else f"H{self.H}/{self.Hkv}"
        length = f"T{self.Tq}" if self.Tq == self.Tk else f"Tq{self.Tq} Tk{self.Tk}"
        return f"B{self.B} {heads} {length} d{self.D} {self.dtype} {'causal' if self.causal else 'full'}"

    def flops(self, mode: str) -> float:
        return attention_flops(self.B, self.H, self.Tq, self.Tk, self.D, causal=self.causal, mode=mode)

    def params(self) -> dict:
        return asdict(self)


def attention_flops(B: int, H: int, Tq: int, Tk: int, D: int, *, causal: bool, mode: str) -> float:
    """FLOP model of SPEC.md (FlashAttention convention).

    Forward ``4·B·H·Tq·Tk·D`` (two matmuls of ``2·Tq·Tk·D``), halved when causal and square;
    backward 2.5x the forward; forward + backward 3.5x.
    """
    fwd = 4.0 * B * H * Tq * Tk * D
    if causal and Tq == Tk:
        fwd /= 2.0
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    if mode not in factor:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return fwd * factor[mode]


def model_shape(
    name: str, group: str, model: str, T: int, *, B: int = 1, Tq: int | None = None, dtype: str = "bf16", note: str = ""
) -> AttnShape:
    """A self-attention case with ``model``'s head geometry (``Tq`` < ``T``: a chunk over a cache)."""
    m = MODELS[model]
    return AttnShape(name, group, B, m.heads, m.kv_heads, T if Tq is None else Tq, T, m.head_dim, True, dtype, note)


def acceptance_set() -> list[AttnShape]:
    return [
        AttnShape(
            f"acceptance-T{T}",
            "acceptance",
            B=ACCEPTANCE_TOKENS // T,
            H=16,
            Hkv=16,
            Tq=T,
            Tk=T,
            D=128,
            note="B·T = 16k, H 16, d 128 (FlashAttention benchmark setting)",
        )
        for T in ACCEPTANCE_LENGTHS
    ]


def papers_set(
    *, batch: int = 1, dataset: str = "agnews", dtype: str = "bf16", models=tuple(MODELS)
) -> list[AttnShape]:
    return [
        model_shape(
            f"{key}-{dataset}-{n}demo",
            "papers",
            key,
            prompt_tokens(dataset, n),
            B=batch,
            dtype=dtype,
            note=f"{MODELS[key].name}, {n} {DATASETS[dataset].name} demonstration(s)",
        )
        for key in models
        for n in DEMONSTRATIONS
    ]


def cpu_set() -> list[AttnShape]:
    sst2_per_class = prompt_tokens("sst2", DATASETS["sst2"].classes)
    ag1, ag4 = prompt_tokens("agnews", 1), prompt_tokens("agnews", 4)
    return [
        model_shape(
            "cpu-gpt2-xl-sst2-2demo",
            "cpu",
            "gpt2-xl",
            sst2_per_class,
            dtype="fp32",
            note="GPT2-XL, SST-2 one demonstration per class (the anchors paper's setting)",
        ),
        model_shape("cpu-gpt2-xl-agnews-4demo", "cpu", "gpt2-xl", ag4, dtype="fp32", note="GPT2-XL, 4 AGNews demos"),
        model_shape("cpu-gpt-j-agnews-1demo", "cpu", "gpt-j", ag1, dtype="fp32", note="GPT-J (d 256), 1 AGNews demo"),
        model_shape(
            "cpu-llama-gqa-agnews-1demo", "cpu", "llama-gqa", ag1, dtype="fp32", note="GQA 32/8, 1 AGNews demo"
        ),
        model_shape(
            "cpu-llama-7b-chunk-over-cache",
            "cpu",
            "llama-7b",
            ag4,
            Tq=64,
            dtype="fp32",
            note="64 new query rows over a 4-demo cache (bottom-right causal, Tq < Tk)",
        ),
    ]


def tiny_set() -> list[AttnShape]:
    return [AttnShape("tiny-gqa", "tiny", 2, 4, 2, 17, 17, 16, dtype="fp32", note="smoke test")]


SETS = {
    "acceptance": acceptance_set,
    "papers": papers_set,
    "cpu": cpu_set,
    "tiny": tiny_set,
}


def get_set(name: str, *, cuda: bool, batch: int | None = None) -> list[AttnShape]:
    """Shapes of set ``name``; ``default`` is acceptance + papers on a GPU and ``cpu`` otherwise,
    ``all`` is every GPU set (plus the CPU set without a GPU)."""
    papers = (lambda: papers_set(batch=batch)) if batch is not None else papers_set
    if name == "default":
        return acceptance_set() + papers() if cuda else cpu_set()
    if name == "all":
        return acceptance_set() + papers() + ([] if cuda else cpu_set())
    if name == "papers":
        return papers()
    if name not in SETS:
        raise ValueError(f"unknown shape set {name!r}; choose from {('default', 'all', *SETS)}")
    return SETS[name]()


# --------------------------------------------------------------------------------------------------
# Anchor re-weighting (SPEC §2) and isolation (SPEC §3) cases, for ``benchmarks/bench_anchors.py``.
#
# ICL prompt geometry: ``ANCHOR_DEMONSTRATIONS`` demonstrations (4 classes x 4 demonstrations = 16
# label words) followed by the test input. The prompt of ``T`` tokens is cut into 17 equal segments
# (``seg = T // 17``): demonstration ``i`` fills ``[i·seg, (i+1)·seg)`` and ends with
# ``"<label>\n"``, so its label word (the anchor) sits at ``(i+1)·seg - 2``; the test input fills
# ``[16·seg, T)``. Classes cycle 0, 1, 2, 3, 0, ... (balanced). The 16 anchors are spread over the
# whole prompt, as in the papers' prompts, at any ``T``.
# --------------------------------------------------------------------------------------------------

ANCHOR_CLASSES = 4
ANCHOR_DEMOS_PER_CLASS = 4
ANCHOR_DEMONSTRATIONS = ANCHOR_CLASSES * ANCHOR_DEMOS_PER_CLASS
ANCHOR_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)
ANCHOR_MODES = ("fwd", "fwd+bwd")
# feature variant -> what it does
ANCHOR_VARIANTS = {
    "anchors-last": "anchor re-weighting of the last query row only (the paper's setting)",
    "anchors-from": "anchor re-weighting of every query row from the first label word on (worst case)",
    "isolation": "isolation of the label-word rows, window 0 (SPEC §3)",
}


def icl_anchor_layout(
    T: int, demonstrations: int = ANCHOR_DEMONSTRATIONS, classes: int = ANCHOR_CLASSES
) -> tuple[list[int], list[int], int]:
    """``(label positions, their classes, first token of the test input)`` of a ``T``-token prompt."""
    seg = T // (demonstrations + 1)
    if seg < 3:
        raise ValueError(f"T = {T} is too short for {demonstrations} demonstrations (need >= 3 tokens each)")
    positions = [(i + 1) * seg - 2 for i in range(demonstrations)]
    return positions, [i % classes for i in range(demonstrations)], demonstrations * seg


@dataclass(frozen=True)
class AnchorShape(AttnShape):
    """An :class:`AttnShape` (self-attention, ``Tq == Tk``) with an anchor / isolation variant."""

    variant: str = "anchors-last"
    demonstrations: int = ANCHOR_DEMONSTRATIONS
    classes: int = ANCHOR_CLASSES

    @property
    def feature(self) -> str:
        """``"anchors"`` or ``"isolation"``."""
        return "isolation" if self.variant == "isolation" else "anchors"

    def layout(self) -> tuple[list[int], list[int], int]:
        return icl_anchor_layout(self.Tk, self.demonstrations, self.classes)

    @property
    def reweight_from(self) -> int | None:
        """``None`` (last row) for ``anchors-last``; the first label word's row for ``anchors-from``."""
        if self.variant == "anchors-from":
            return self.layout()[0][0] + (self.Tq - self.Tk)
        return None

    @property
    def label(self) -> str:
        what = {
            "anchors-last": f"{self.demonstrations} anchors/{self.classes} classes, last row",
            "anchors-from": f"{self.demonstrations} anchors/{self.classes} classes, rows >= {self.reweight_from}",
            "isolation": f"{self.demonstrations} isolated rows, window 0",
        }[self.variant]
        return f"{super().label}, {what}"


def anchor_shape(variant: str, model: str, T: int, *, B: int = 1, dtype: str = "bf16", group: str = "anchors"):
    if variant not in ANCHOR_VARIANTS:
        raise ValueError(f"variant must be one of {tuple(ANCHOR_VARIANTS)}, got {variant!r}")
    m = MODELS[model]
    return AnchorShape(
        f"{variant}-{model}-T{T}",
        group,
        B,
        m.heads,
        m.kv_heads,
        T,
        T,
        m.head_dim,
        True,
        dtype,
        f"{m.name}, {ANCHOR_VARIANTS[variant]}",
        variant=variant,
    )


ANCHOR_MODELS = ("gpt2-xl", "llama-7b")


def anchors_gpu_set(*, batch: int = 1) -> list[AnchorShape]:
    """bf16, GPT2-XL (H 25, d 64) and Llama-7B-like (H 32, d 128), T = 256 ... 16k, every variant."""
    return [
        anchor_shape(variant, model, T, B=batch)
        for variant in ANCHOR_VARIANTS
        for model in ANCHOR_MODELS
        for T in ANCHOR_LENGTHS
    ]


ANCHOR_CPU_LENGTHS = (256,)


def anchors_cpu_set(*, batch: int = 1) -> list[AnchorShape]:
    """fp32, both head geometries at T = 256: small enough for ``make bench`` on a 2-core CPU."""
    return [
        anchor_shape(variant, model, T, B=batch, dtype="fp32", group="anchors-cpu")
        for variant in ANCHOR_VARIANTS
        for model in ANCHOR_MODELS
        for T in ANCHOR_CPU_LENGTHS
    ]


def anchors_tiny_set() -> list[AnchorShape]:
    """One tiny case per variant for the smoke test (B 2, H 4, T 40, d 16, fp32, 2 classes x 2
    demonstrations)."""
    return [
        AnchorShape(
            f"tiny-{v}",
            "tiny",
            2,
            4,
            4,
            40,
            40,
            16,
            dtype="fp32",
            note="smoke test",
            variant=v,
            demonstrations=4,
            classes=2,
        )
        for v in ANCHOR_VARIANTS
    ]


def _feature_set(name: str, own: str, gpu_set, cpu_set, tiny_set, cuda: bool, batch: int | None) -> list:
    """Shape-set dispatch of a feature benchmark: ``default``/``all`` = its GPU set on a GPU, else its CPU set;
    ``own`` (the feature's set name) = always the GPU set; ``cpu``; ``tiny``; any other known set = ``[]``."""
    kw = {} if batch is None else {"batch": batch}
    if name in ("default", "all"):
        return gpu_set(**kw) if cuda else cpu_set(**kw)
    if name == own:
        return gpu_set(**kw)
    if name == "cpu":
        return cpu_set(**kw)
    if name == "tiny":
        return tiny_set()
    if name in ("acceptance", "papers", "anchors", "saliency"):
        return []
    raise ValueError(f"unknown shape set {name!r}")


def get_anchor_set(name: str, *, cuda: bool, batch: int | None = None) -> list[AnchorShape]:
    """Anchor / isolation cases of shape set ``name`` (the names of ``benchmarks.run --set``):
    ``default`` and ``all`` are the GPU set on a GPU and the CPU set otherwise, ``anchors`` always
    the GPU set, ``cpu`` the CPU set, ``tiny`` the smoke test's; the attention-only sets
    (``acceptance``, ``papers``) and ``saliency`` have no anchor cases (``[]``)."""
    return _feature_set(name, "anchors", anchors_gpu_set, anchors_cpu_set, anchors_tiny_set, cuda, batch)


# --------------------------------------------------------------------------------------------------
# Information-flow saliency (SPEC §4) cases, for ``benchmarks/bench_saliency.py``.
#
# A case is a chain of ``layers`` attention layers (no MLP) over one ``T``-token prompt with the ICL
# geometry of ``icl_anchor_layout``: the label words of ``demonstrations`` demonstrations are the
# ``p_c`` of the flow scores, the last position is the target ``q``.
# --------------------------------------------------------------------------------------------------

SALIENCY_LENGTHS = (256, 1024, 2048, 4096, 8192, 16384)
SALIENCY_CPU_LENGTHS = (128, 256, 512)
# model key -> (layers, heads, head dim, what it mirrors)
SALIENCY_MODELS = {
    "gpt2-xl": (48, 25, 64, "GPT2-XL-shaped stack: 48 attention layers, H 25, d 64"),
    "llama-7b": (1, 32, 128, "Llama-7B-shaped layer: one attention layer, H 32, d 128"),
    "cpu-stack": (4, 4, 64, "small stack for a 2-core CPU: 4 attention layers, H 4, d 64"),
    "cpu-layer": (1, 4, 128, "small layer for a 2-core CPU: one attention layer, H 4, d 128"),
}


@dataclass(frozen=True)
class SaliencyCase:
    """One flow-score case: ``layers`` causal self-attention layers of ``H`` heads of dimension ``D`` over
    ``B`` prompts of ``T`` tokens, ``demonstrations`` label words (``classes`` classes)."""

    name: str
    group: str
    model: str
    layers: int
    H: int
    D: int
    T: int
    B: int = 1
    dtype: str = "fp16"
    demonstrations: int = ANCHOR_DEMONSTRATIONS
    classes: int = ANCHOR_CLASSES
    note: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        return (
            f"L{self.layers} B{self.B} H{self.H} T{self.T} d{self.D} {self.dtype} causal, "
            f"{self.demonstrations} label words/{self.classes} classes"
        )

    def layout(self) -> tuple[list[int], list[int], int]:
        """``(label positions, their classes, first token of the test input)``; the target is ``T - 1``."""
        return icl_anchor_layout(self.T, self.demonstrations, self.classes)

    def flops(self, mode: str) -> float:
        """Attention forward + backward of every layer (SPEC's model, 3.5x the forward); the saliency
        pass, the projections and the score reduction are not counted."""
        return self.layers * attention_flops(self.B, self.H, self.T, self.T, self.D, causal=True, mode="fwd+bwd")

    def params(self) -> dict:
        return asdict(self)


def saliency_case(model: str, T: int, *, B: int = 1, dtype: str = "fp16", group: str = "saliency") -> SaliencyCase:
    layers, heads, head_dim, note = SALIENCY_MODELS[model]
    return SaliencyCase(f"{model}-T{T}", group, model, layers, heads, head_dim, T, B, dtype, note=note)


def saliency_gpu_set(*, batch: int = 1) -> list[SaliencyCase]:
    """fp16, batch 1: the GPT2-XL-shaped stack and the Llama-7B-shaped layer at T = 256 ... 16k."""
    return [saliency_case(m, T, B=batch) for m in ("gpt2-xl", "llama-7b") for T in SALIENCY_LENGTHS]


def saliency_cpu_set(*, batch: int = 1) -> list[SaliencyCase]:
    """fp32, a 4-layer H 4 d 64 stack and a one-layer H 4 d 128 layer at T = 128, 256, 512."""
    return [
        saliency_case(m, T, B=batch, dtype="fp32", group="saliency-cpu")
        for m in ("cpu-stack", "cpu-layer")
        for T in SALIENCY_CPU_LENGTHS
    ]


def saliency_tiny_set() -> list[SaliencyCase]:
    """The smoke test's two cases: 2 layers, B 2, H 2, d 16, T 40 and 48, fp32, 4 label words/2 classes."""
    return [SaliencyCase(f"tiny-T{T}", "tiny", "tiny", 2, 2, 16, T, 2, "fp32", 4, 2, "smoke test") for T in (40, 48)]


def get_saliency_set(name: str, *, cuda: bool, batch: int | None = None) -> list[SaliencyCase]:
    """Saliency cases of shape set ``name`` (the names of ``benchmarks.run --set``): ``default`` and
    ``all`` are the GPU set on a GPU and the CPU set otherwise, ``saliency`` always the GPU set, ``cpu``
    the CPU set, ``tiny`` the smoke test's; the other sets have no saliency cases (``[]``)."""
    return _feature_set(name, "saliency", saliency_gpu_set, saliency_cpu_set, saliency_tiny_set, cuda, batch)
