"""Every benchmark's cases, as data: the case types and the named sets of ``benchmarks.run --set``
(benchmarks/README.md explains every set)."""

from __future__ import annotations

import functools
import math
import random
from collections import namedtuple
from dataclasses import asdict, dataclass
from typing import Any

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SET_NAMES = ("default", "acceptance", "papers", "anchors", "saliency", "cpu", "all", "tiny")

TOKENS_PER_WORD = 1.3
DEMO_TEMPLATE_TOKENS = 7
QUERY_TEMPLATE_TOKENS = 5
TEMPLATE_HEAD = 2  # template tokens that open a demonstration ("<Input prefix>", ":"); the rest close it


Dataset = namedtuple("Dataset", "name words_per_input classes")
Model = namedtuple("Model", "name heads kv_heads head_dim")
DATASETS = {"sst2": Dataset("SST-2", 20, 2), "trec": Dataset("TREC", 10, 6), "agnews": Dataset("AGNews", 40, 4),
            "emoc": Dataset("EmoC", 15, 4)}
MODELS = {"gpt2-xl": Model("GPT2-XL", 25, 25, 64), "gpt-j": Model("GPT-J", 16, 16, 256),
          "llama-7b": Model("Llama-7B-like", 32, 32, 128), "llama-gqa": Model("GQA 32/8", 32, 8, 128)}
DEMONSTRATIONS = (1, 2, 4, 8, 16)
ACCEPTANCE_TOKENS = 16384
ACCEPTANCE_LENGTHS = (1024, 2048, 4096, 8192, 16384)


def prompt_tokens(dataset: str, demonstrations: int) -> int:
    """Tokens in a prompt of ``demonstrations`` labelled examples of ``dataset`` plus the test input."""
    if demonstrations < 0:
        raise ValueError(f"demonstrations must be >= 0, got {demonstrations}")
    text = math.ceil(DATASETS[dataset].words_per_input * TOKENS_PER_WORD)
    return demonstrations * (text + DEMO_TEMPLATE_TOKENS) + text + QUERY_TEMPLATE_TOKENS


def template_positions(demonstrations: int, demo_tokens: int) -> list[int]:
    """The template tokens of back-to-back demonstrations (the first ``TEMPLATE_HEAD`` and the last
    ``DEMO_TEMPLATE_TOKENS - TEMPLATE_HEAD`` of each), in order; position 0 is among them."""
    tail = DEMO_TEMPLATE_TOKENS - TEMPLATE_HEAD
    out: list[int] = []
    for i in range(demonstrations):
        start, end = i * demo_tokens, (i + 1) * demo_tokens
        out += list(range(start, start + TEMPLATE_HEAD)) + list(range(end - tail, end))
    return out


def attention_flops(B: int, H: int, Tq: int, Tk: int, D: int, *, causal: bool, mode: str) -> float:
    """FlashAttention's FLOP model: forward ``4·B·H·Tq·Tk·D``, halved when causal and square; bwd 2.5x, fwd+bwd
    3.5x the forward."""
    fwd = 4.0 * B * H * Tq * Tk * D / (2.0 if causal and Tq == Tk else 1.0)
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    if mode not in factor:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return fwd * factor[mode]


def case_set(own: str, gpu, cpu, tiny, batch: int | None = 1):
    """A benchmark's ``cases(name, cuda, batch)``: ``default``/``all`` the GPU set on a GPU and the CPU set otherwise,
    ``own`` (the benchmark's set name) the GPU set, ``cpu``, ``tiny``; any other known set ``[]``. ``gpu`` and
    ``cpu`` take the batch (``batch`` when not given)."""

    def cases(name: str, cuda: bool, b: int | None = None) -> list:
        if name in ("default", "all"):
            name = own if cuda else "cpu"
        if name not in (own, *SET_NAMES):
            raise ValueError(f"unknown shape set {name!r}; choose from {SET_NAMES}")
        make = {own: gpu, "cpu": cpu, "tiny": lambda _: tiny()}.get(name)
        return make(batch if b is None else b) if make else []

    return cases


class _Case:
    """``torch_dtype``, ``flops`` (none unless a case says) and ``params`` of a case dataclass."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def flops(self, mode: str) -> float | None:
        return None

    def params(self) -> dict:
        return asdict(self)


class DemonstrationGeometry(_Case):
    """Cases with ``dataset`` and ``per_class``: ``demonstrations``, their tokens and kept anchor positions."""

    @property
    def demonstrations(self) -> int:
        return DATASETS[self.dataset].classes * self.per_class

    @property
    def demo_tokens(self) -> int:
        return prompt_tokens(self.dataset, 1) - prompt_tokens(self.dataset, 0)

    @property
    def T_demo(self) -> int:
        return self.demonstrations * self.demo_tokens

    @property
    def M(self) -> int:
        return self.demonstrations * DEMO_TEMPLATE_TOKENS

    def positions(self) -> list[int]:
        return template_positions(self.demonstrations, self.demo_tokens)

    @property
    def demos_text(self) -> str:
        return f"{self.demonstrations} {DATASETS[self.dataset].name} demos ({self.per_class}/class)"


@dataclass(frozen=True)
class CacheCase(DemonstrationGeometry):
    """An ``L``-layer K/V cache (or state) of ``per_class`` demos per class: the fields gather and update share."""

    name: str
    group: str
    model: str
    layers: int
    Hkv: int
    D: int
    dataset: str
    per_class: int


def cache_case(cls, name: str, model: str, full: int, layers: int | None, dataset: str, what: str, group: str,
               per_class: int, *rest):
    """A ``cls`` case of ``model``'s kv heads at ``layers`` of its ``full`` (``-L{layers}`` named when fewer)."""
    m, L = MODELS[model], layers or full
    depth = f"L {L}" if L == full else f"L {L} of its {full}"
    return cls(name + ("" if L == full else f"-L{L}"), group, model, L, m.kv_heads, m.head_dim, dataset, per_class,
               *rest, note=f"{m.name}{what} ({depth}, Hkv {m.kv_heads}, d {m.head_dim}), {DATASETS[dataset].name}")


@dataclass(frozen=True)
class AttnShape(_Case):
    """One case of ``attention(q [B, H, Tq, D], k/v [B, Hkv, Tk, D])``."""

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
    def label(self) -> str:
        heads = f"H{self.H}" if self.H == self.Hkv else f"H{self.H}/{self.Hkv}"
        length = f"T{self.Tq}" if self.Tq == self.Tk else f"Tq{self.Tq} Tk{self.Tk}"
        return f"B{self.B} {heads} {length} d{self.D} {self.dtype} {'causal' if self.causal else 'full'}"

    def flops(self, mode: str) -> float:
        return attention_flops(self.B, self.H, self.Tq, self.Tk, self.D, causal=self.causal, mode=mode)


def model_shape(name, group, model, T, *, B=1, Tq=None, dtype="bf16", note="") -> AttnShape:
    """A causal case with ``model``'s head geometry (``Tq`` < ``T``: a chunk over a cache)."""
    m = MODELS[model]
    return AttnShape(name, group, B, m.heads, m.kv_heads, T if Tq is None else Tq, T, m.head_dim, True, dtype, note)


def acceptance_set() -> list[AttnShape]:
    note = "B·T = 16k, H 16, d 128 (FlashAttention benchmark setting)"
    return [AttnShape(f"acceptance-T{T}", "acceptance", ACCEPTANCE_TOKENS // T, 16, 16, T, T, 128, note=note)
            for T in ACCEPTANCE_LENGTHS]


def papers_set(*, batch: int = 1, dataset: str = "agnews", dtype: str = "bf16", models=tuple(MODELS)):
    return [model_shape(f"{key}-{dataset}-{n}demo", "papers", key, prompt_tokens(dataset, n), B=batch, dtype=dtype,
                        note=f"{MODELS[key].name}, {n} {DATASETS[dataset].name} demonstration(s)")
            for key in models for n in DEMONSTRATIONS]


def cpu_set() -> list[AttnShape]:
    ag1, ag4 = prompt_tokens("agnews", 1), prompt_tokens("agnews", 4)
    return [
        model_shape("cpu-gpt2-xl-sst2-2demo", "cpu", "gpt2-xl", prompt_tokens("sst2", DATASETS["sst2"].classes),
                    dtype="fp32", note="GPT2-XL, SST-2 one demonstration per class (the anchors paper's setting)"),
        model_shape("cpu-gpt2-xl-agnews-4demo", "cpu", "gpt2-xl", ag4, dtype="fp32", note="GPT2-XL, 4 AGNews demos"),
        model_shape("cpu-gpt-j-agnews-1demo", "cpu", "gpt-j", ag1, dtype="fp32", note="GPT-J (d 256), 1 AGNews demo"),
        model_shape("cpu-llama-gqa-agnews-1demo", "cpu", "llama-gqa", ag1, dtype="fp32",
                    note="GQA 32/8, 1 AGNews demo"),
        model_shape("cpu-llama-7b-chunk-over-cache", "cpu", "llama-7b", ag4, Tq=64, dtype="fp32",
                    note="64 new query rows over a 4-demo cache (bottom-right causal, Tq < Tk)"),
    ]


def tiny_set() -> list[AttnShape]:
    return [AttnShape("tiny-gqa", "tiny", 2, 4, 2, 17, 17, 16, dtype="fp32", note="smoke test")]


def attention_cases(name: str, cuda: bool, batch: int | None = None) -> list[AttnShape]:
    """``default``: acceptance + papers on a GPU, ``cpu`` otherwise; ``all``: every GPU set (+ ``cpu`` on CPU)."""
    papers = papers_set(batch=batch) if batch is not None else papers_set()
    if name in ("default", "all"):
        gpu = acceptance_set() + papers
        return gpu if cuda else (gpu if name == "all" else []) + cpu_set()
    sets = {"acceptance": acceptance_set, "papers": lambda: papers, "cpu": cpu_set, "tiny": tiny_set}
    if name not in SET_NAMES:
        raise ValueError(f"unknown shape set {name!r}; choose from {SET_NAMES}")
    return sets[name]() if name in sets else []


ANCHOR_CLASSES, ANCHOR_DEMOS_PER_CLASS = 4, 4
ANCHOR_DEMONSTRATIONS = ANCHOR_CLASSES * ANCHOR_DEMOS_PER_CLASS
ANCHOR_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)
ANCHOR_MODELS = ("gpt2-xl", "llama-7b")
ANCHOR_VARIANTS = {
    "anchors-last": "anchor re-weighting of the last query row only (the paper's setting)",
    "anchors-from": "anchor re-weighting of every query row from the first label word on (worst case)",
    "isolation": "isolation of the label-word rows, window 0 (docs/methods.md §3)",
}


def icl_anchor_layout(T: int, demonstrations: int = ANCHOR_DEMONSTRATIONS, classes: int = ANCHOR_CLASSES):
    """``(label positions, their classes, first token of the test input)``: the prompt is cut into
    ``demonstrations + 1`` equal segments, each demonstration's label word 2 tokens before its segment's end."""
    seg = T // (demonstrations + 1)
    if seg < 3:
        raise ValueError(f"T = {T} is too short for {demonstrations} demonstrations (need >= 3 tokens each)")
    return [(i + 1) * seg - 2 for i in range(demonstrations)], [i % classes for i in range(demonstrations)], \
        demonstrations * seg


@dataclass(frozen=True)
class AnchorShape(AttnShape):
    """An :class:`AttnShape` (``Tq == Tk``) with an anchor / isolation variant."""

    variant: str = "anchors-last"
    demonstrations: int = ANCHOR_DEMONSTRATIONS
    classes: int = ANCHOR_CLASSES

    @property
    def feature(self) -> str:
        return "isolation" if self.variant == "isolation" else "anchors"

    def layout(self):
        return icl_anchor_layout(self.Tk, self.demonstrations, self.classes)

    @property
    def reweight_from(self) -> int | None:
        return self.layout()[0][0] + (self.Tq - self.Tk) if self.variant == "anchors-from" else None

    @property
    def label(self) -> str:
        what = {"anchors-last": f"{self.demonstrations} anchors/{self.classes} classes, last row",
                "anchors-from": f"{self.demonstrations} anchors/{self.classes} classes, rows >= {self.reweight_from}",
                "isolation": f"{self.demonstrations} isolated rows, window 0"}[self.variant]
        return f"{super().label}, {what}"


def anchor_shape(variant: str, model: str, T: int, *, B: int = 1, dtype: str = "bf16", group: str = "anchors"):
    if variant not in ANCHOR_VARIANTS:
        raise ValueError(f"variant must be one of {tuple(ANCHOR_VARIANTS)}, got {variant!r}")
    m = MODELS[model]
    return AnchorShape(f"{variant}-{model}-T{T}", group, B, m.heads, m.kv_heads, T, T, m.head_dim, True, dtype,
                       f"{m.name}, {ANCHOR_VARIANTS[variant]}", variant=variant)


anchor_cases = case_set(
    "anchors", lambda b: [anchor_shape(v, m, T, B=b) for v in ANCHOR_VARIANTS for m in ANCHOR_MODELS
                          for T in ANCHOR_LENGTHS],
    lambda b: [anchor_shape(v, m, 256, B=b, dtype="fp32", group="anchors-cpu") for v in ANCHOR_VARIANTS
               for m in ANCHOR_MODELS],
    lambda: [AnchorShape(f"tiny-{v}", "tiny", 2, 4, 4, 40, 40, 16, dtype="fp32", note="smoke test", variant=v,
                         demonstrations=4, classes=2) for v in ANCHOR_VARIANTS])


SALIENCY_LENGTHS = (256, 1024, 2048, 4096, 8192, 16384)
SALIENCY_CPU_LENGTHS = (128, 256, 512)
SALIENCY_MODELS = {  # key -> (layers, heads, head dim, what it mirrors)
    "gpt2-xl": (48, 25, 64, "GPT2-XL-shaped stack: 48 attention layers, H 25, d 64"),
    "llama-7b": (1, 32, 128, "Llama-7B-shaped layer: one attention layer, H 32, d 128"),
    "cpu-stack": (4, 4, 64, "small stack for a 2-core CPU: 4 attention layers, H 4, d 64"),
    "cpu-layer": (1, 4, 128, "small layer for a 2-core CPU: one attention layer, H 4, d 128"),
}


@dataclass(frozen=True)
class SaliencyCase(_Case):
    """``layers`` causal attention layers of ``H`` heads of dim ``D`` over ``B`` prompts of ``T`` tokens."""

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
    def label(self) -> str:
        return (f"L{self.layers} B{self.B} H{self.H} T{self.T} d{self.D} {self.dtype} causal, "
                f"{self.demonstrations} label words/{self.classes} classes")

    def layout(self):
        return icl_anchor_layout(self.T, self.demonstrations, self.classes)

    def flops(self, mode: str) -> float:
        """Every layer's attention forward + backward; the saliency pass and projections are not counted."""
        return self.layers * attention_flops(self.B, self.H, self.T, self.T, self.D, causal=True, mode="fwd+bwd")


def saliency_case(model: str, T: int, *, B: int = 1, dtype: str = "fp16", group: str = "saliency"):
    layers, heads, head_dim, note = SALIENCY_MODELS[model]
    return SaliencyCase(f"{model}-T{T}", group, model, layers, heads, head_dim, T, B, dtype, note=note)


saliency_cases = case_set(
    "saliency", lambda b: [saliency_case(m, T, B=b) for m in ("gpt2-xl", "llama-7b") for T in SALIENCY_LENGTHS],
    lambda b: [saliency_case(m, T, B=b, dtype="fp32", group="saliency-cpu") for m in ("cpu-stack", "cpu-layer")
               for T in SALIENCY_CPU_LENGTHS],
    lambda: [SaliencyCase(f"tiny-T{T}", "tiny", "tiny", 2, 2, 16, T, 2, "fp32", 4, 2, "smoke test") for T in (40, 48)])


GATHER_LAYERS = {"gpt2-xl": 48, "gpt-j": 28}
FOUR_DATASETS = ("sst2", "trec", "agnews", "emoc")
GATHER_CPU_LAYERS = 24  # every CPU output under glibc's 32 MiB mmap ceiling (benchmarks/README.md)


@dataclass(frozen=True)
class GatherCase(CacheCase):
    """Keep the template tokens of ``per_class`` demos per class from an ``L``-layer cache ``[B, Hkv, T, D]``."""

    B: int = 1
    dtype: str = "fp16"
    note: str = ""

    @property
    def T(self) -> int:
        return self.T_demo

    @property
    def bytes_moved(self) -> int:
        """``4 · L · B · Hkv · M · D · element size``: K and V, each kept element read once and written once."""
        return 4 * self.layers * self.B * self.Hkv * self.M * self.D * DTYPES[self.dtype].itemsize

    @property
    def label(self) -> str:
        return f"L{self.layers} B{self.B} Hkv{self.Hkv} T{self.T} M{self.M} d{self.D} {self.dtype}, {self.demos_text}"

    def params(self) -> dict:
        return {**asdict(self), "T": self.T, "M": self.M, "demonstrations": self.demonstrations,
                "bytes_moved": self.bytes_moved}


def gather_case(model, dataset, per_class, *, B=1, dtype="fp16", group="gather", layers=None) -> GatherCase:
    return cache_case(GatherCase, f"{model}-{dataset}-{per_class}pc-b{B}", model, GATHER_LAYERS[model], layers,
                      dataset, " cache", group, per_class, B, dtype)


def _gather_gpu(batch: int) -> list[GatherCase]:
    cases = [gather_case(m, ds, pc, B=batch) for m in GATHER_LAYERS for ds in FOUR_DATASETS for pc in (1, 4)]
    cases += [gather_case(m, ds, pc, B=16) for m in GATHER_LAYERS for ds, pc in (("sst2", 1), ("agnews", 4))]
    return list({c.name: c for c in cases}.values())  # --batch 16 would repeat the batched cases


gather_cases = case_set(
    "gather", _gather_gpu,
    lambda b: [gather_case("gpt2-xl", ds, pc, B=b, dtype="fp32", group="gather-cpu", layers=GATHER_CPU_LAYERS)
               for ds in ("sst2", "agnews") for pc in (1, 4)],
    lambda: [GatherCase(f"tiny-b{B}", "tiny", "tiny", 3, 2, 8, "sst2", 1, B, "fp32", "smoke test") for B in (1, 2)])


@dataclass(frozen=True)
class ModelSpec(_Case):
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
    def label(self) -> str:
        rotary = f" rotary {self.rotary_dim}" if self.rotary_dim else ""
        return f"L{self.layers} d_model {self.d_model} H{self.heads}{rotary} vocab {self.vocab} {self.dtype}"

    def config(self):
        from transformers import GPT2Config, GPTJConfig

        common = dict(vocab_size=self.vocab, bos_token_id=self.vocab - 1, eos_token_id=self.vocab - 1,
                      n_positions=self.positions, n_embd=self.d_model, n_layer=self.layers, n_head=self.heads,
                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        if self.family == "gpt2":
            return GPT2Config(**common)
        if self.family == "gptj":
            return GPTJConfig(rotary_dim=self.rotary_dim, **common)
        raise ValueError(f"unknown model family {self.family!r}")


CPU_VOCAB = 1024  # the LM head a GPT2-XL-like share of the parameters (8%); at 50k it would be 80% of them
MODEL_SPECS = {
    "gpt2-xl": ModelSpec("gpt2-xl", "gpt2", "GPT2-XL-shaped", 48, 1600, 25, 50257, 1024),
    "gpt-j": ModelSpec("gpt-j", "gptj", "GPT-J-shaped", 28, 4096, 16, 50400, 2048, rotary_dim=64),
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
        return prompt_tokens(self.dataset, 0)

    @property
    def label(self) -> str:
        return (f"{self.model.name} {self.model.label}, {self.demos_text}, B{self.B}, T_demo {self.T_demo} + "
                f"S {self.S}, M {self.M}")

    def params(self) -> dict:
        return {**asdict(self), "model_key": self.model.key, "family": self.model.family,
                "demonstrations": self.demonstrations, "T_demo": self.T_demo, "S": self.S,
                "T_full": self.T_demo + self.S, "M": self.M}


def serve_case(model: str, dataset: str, per_class: int, B: int) -> ServeCase:
    spec = MODEL_SPECS[model]
    return ServeCase(f"{model}-{dataset}-{per_class}pc-b{B}", model, spec, dataset, per_class, B,
                     f"{spec.name} ({spec.label}), {DATASETS[dataset].name}")


def _serve_cases(models, datasets, per_class, batches):
    return lambda batch=None: [serve_case(m, ds, n, B) for m in models for ds in datasets for n in per_class
                               for B in ((batch,) if batch else batches)]


compression_cases = case_set(
    "compression", _serve_cases(("gpt2-xl", "gpt-j"), FOUR_DATASETS, (1, 4), (1, 16, 64)),
    _serve_cases(("gpt2-cpu", "gptj-cpu"), ("sst2", "agnews"), (1, 4), (1, 8)),
    _serve_cases(("gpt2-tiny", "gptj-tiny"), ("sst2",), (1,), (1, 2)), batch=None)


MOMENTUM_ETA = 0.9
DT_LAYERS = {"gpt2-xl": 48, "llama-7b": 32}
DT_CPU_LAYERS = 4


@dataclass(frozen=True)
class MomentumShape(AttnShape):
    """An :class:`AttnShape` (self-attention) with the momentum coefficient ``eta``."""

    eta: float = MOMENTUM_ETA
    model: str = ""

    @property
    def label(self) -> str:
        return f"{super().label}, η {self.eta:g}"


momentum_cases = case_set(
    "momentum", lambda _: [MomentumShape(f"momentum-{key}-T{T}", "momentum", ACCEPTANCE_TOKENS // T, MODELS[key].heads,
                                         MODELS[key].kv_heads, T, T, MODELS[key].head_dim, True, "bf16",
                                         f"{MODELS[key].name}, B·T = {ACCEPTANCE_TOKENS}", model=key)
                           for key in ("llama-7b", "llama-gqa") for T in ACCEPTANCE_LENGTHS],
    lambda _: [MomentumShape(f"momentum-cpu-T{T}", "momentum-cpu", 1, 4, 4, T, T, 64, True, "fp32", "small CPU shape",
                             model="cpu-h4") for T in (128, 256, 512)],
    lambda: [MomentumShape("tiny-momentum-gqa", "tiny", 2, 4, 2, 33, 33, 16, True, "fp32", "smoke test", model="tiny")])


@dataclass(frozen=True)
class UpdateCase(CacheCase):
    """One Deep-Thinking update of an ``L``-layer state ``[1, Hkv, N, d]`` per K and V, ``N`` demo tokens."""

    dtype: str = "fp16"
    eta: float = 0.01
    beta: float = 0.9
    note: str = ""

    @property
    def N(self) -> int:
        return self.T_demo

    @property
    def rows(self) -> int:
        """``R = 2·L·Hkv``: the rows of ``work.view(R, 2, N·d)``."""
        return 2 * self.layers * self.Hkv

    @property
    def bytes_moved(self) -> int:
        """``R·N·d · (3·e + 8)``: ``X̂``, ``X_new`` read, ``X̂`` written (``e`` each); ``m`` read and written."""
        return self.rows * self.N * self.D * (3 * DTYPES[self.dtype].itemsize + 8)

    @property
    def label(self) -> str:
        return (f"L{self.layers} B1 Hkv{self.Hkv} N{self.N} d{self.D} {self.dtype}, η {self.eta:g} β {self.beta:g}, "
                f"{self.demos_text}")

    def params(self) -> dict:
        return {**asdict(self), "N": self.N, "demonstrations": self.demonstrations, "bytes_moved": self.bytes_moved}


def update_case(model: str, dataset: str, *, dtype="fp16", layers=None, group="deep-thinking") -> UpdateCase:
    return cache_case(UpdateCase, f"dt-{model}-{dataset}-4pc", model, DT_LAYERS[model], layers, dataset,
                      "-shaped state", group, 4, dtype)


update_cases = case_set(
    "momentum", lambda _: [update_case(m, ds) for m in DT_LAYERS for ds in ("sst2", "agnews")],
    lambda _: [update_case(m, ds, dtype="fp32", layers=DT_CPU_LAYERS, group="deep-thinking-cpu") for m in DT_LAYERS
               for ds in ("sst2", "agnews")],
    lambda: [UpdateCase(f"tiny-dt-{dt}", "tiny", "tiny", 2, 2, 8, "sst2", 1, dt, note="smoke test")
             for dt in ("fp32", "fp16")])


TEMPLATE = "Review: {x}\nSentiment: {y}\n"
LABEL_WORDS = ["negative", "positive"]
_POSITIVE = ["great", "lovely", "superb", "fun", "charming", "moving", "brilliant", "warm", "funny", "smart"]
_NEGATIVE = ["awful", "dull", "boring", "bad", "clumsy", "tedious", "weak", "bland", "flat", "messy"]
_NEUTRAL = ("the film movie was plot and acting story a very quite really it is of this that with its to in as but "
            "director cast script scenes ending characters performance music").split()
REVIEW_WORDS = (20, 24)  # SST-2 averages about 20 words per sentence, so ~27 tokens per demonstration


@functools.lru_cache(maxsize=1)
def word_tokenizer():
    """A word-level ``tokenizers.Tokenizer`` over the task's words (one token per word or punctuation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(_POSITIVE + _NEGATIVE + _NEUTRAL + LABEL_WORDS + ["Review", "Sentiment", ":"]))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def _review(rng: random.Random, label: int) -> str:
    n, sentiment = rng.randint(*REVIEW_WORDS), rng.sample(_POSITIVE if label else _NEGATIVE, 3)
    words = [rng.choice(_NEUTRAL) for _ in range(n - 3)] + sentiment
    rng.shuffle(words)
    return " ".join(words)


@functools.lru_cache(maxsize=32)
def epoch_examples(demos_per_class: int, train_per_class: int, classes: int = 2) -> tuple:
    """``(builder, examples)``: demonstrations interleaved by class, training examples alternating."""
    from fastattn_icl.methods import PromptBuilder

    rng = random.Random(1000 * demos_per_class + train_per_class)
    demos = [(_review(rng, c), c) for _ in range(demos_per_class) for c in range(classes)]
    builder = PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS[:classes], demos)
    return builder, tuple(builder.example(_review(rng, c), c) for _ in range(train_per_class) for c in range(classes))


@dataclass(frozen=True)
class EpochCase(_Case):
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
    def examples(self) -> tuple:
        return epoch_examples(self.demos_per_class, self.train_per_class, self.classes)[1]

    @property
    def num_examples(self) -> int:
        return self.train_per_class * self.classes

    @property
    def steps(self) -> int:
        return -(-self.num_examples // self.batch_size)

    @property
    def label(self) -> str:
        lengths = [len(e.input_ids) for e in self.examples]
        return (f"L{self.layers} H{self.heads} d_model {self.d_model} vocab {self.vocab} {self.dtype}, "
                f"{self.demos_per_class} demo/class, T {min(lengths)}-{max(lengths)}, {self.num_examples} examples, "
                f"batch {self.batch_size} ({self.steps} step{'s' if self.steps > 1 else ''})")

    def params(self) -> dict:
        lengths = [len(e.input_ids) for e in self.examples]
        return {**asdict(self), "T_min": min(lengths), "T_max": max(lengths), "steps": self.steps}


def _epoch_case(prefix, layers, d_model, dtype, demos, batch, note):
    return EpochCase(f"{prefix}-sst2-{demos}demo-b{batch}", prefix, layers, 25, d_model, 512, demos,
                     4 if batch == 1 else batch // 2, batch, dtype, note=note)


epoch_cases = case_set(
    "epoch", lambda _: [_epoch_case("gpt2-xl", 48, 1600, "bf16", d, b, "GPT2-XL-shaped, vocab 512 instead of 50257")
                        for d in (1, 4) for b in (1, 16)],
    lambda _: [_epoch_case("gpt2-xl-cpu", 2, 400, "fp32", d, b,
                           "GPT2-XL's 25 heads at head dim 16 (d_model 400), 2 layers, vocab 512")
               for d in (1, 4) for b in (1, 16)],
    lambda: [EpochCase(f"tiny-b{b}", "tiny", 1, 4, 64, 128, 1, 1, b, "fp32") for b in (1, 2)])


@dataclass(frozen=True)
class PaddedShape(AttnShape):
    """An :class:`AttnShape` whose last batch row is left-padded by ``pad`` keys (a ``[B, Tk]`` key mask)."""

    pad: int = 0

    @property
    def label(self) -> str:
        return f"{super().label}, last row left-padded by {self.pad} keys"


@dataclass(frozen=True)
class E2ECase(_Case):
    """The real model (``smollm2``) or a random tiny Llama, one left-padded batch of ``B`` SST-2-geometry prompts of
    ``per_class`` demonstrations per class (about ``T`` tokens)."""

    name: str
    group: str
    model: str
    per_class: int
    T: int
    B: int = 1
    dtype: str = "fp32"
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.model} B{self.B} ~T{self.T} {self.dtype}, SST-2 template, {self.per_class} demos/class"


@dataclass(frozen=True)
class CpuCase(_Case):
    """One case of the CPU-targets benchmark: the target ``op`` at length ``T``; ``inner`` is the op's own case
    (the case type its benchmark declaration takes)."""

    name: str
    group: str
    op: str
    T: int
    inner: Any
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.op}: {self.inner.label}"

    def flops(self, mode: str) -> float | None:
        return self.inner.flops(mode) if self.op in ("attention", "anchors", "isolation", "momentum") else None

    def params(self) -> dict:
        return {"name": self.name, "op": self.op, "T": self.T, "inner": self.inner.params()}


CPU_TARGET_LENGTHS = {"attention": (256, 1024, 4096), "anchors": (256, 1024, 2048), "saliency": (256, 1024, 2048),
                      "momentum": (256, 1024, 4096)}
E2E_MODEL, E2E_PER_CLASS, E2E_T = "smollm2", 9, 512  # 18 SST-2 demonstrations: about 512 SmolLM2 tokens


def _cpu_case(op, inner, T, group, note=""):
    name = inner.name if inner.name.startswith(op) else f"{op}-{inner.name}"
    return CpuCase(name, group, op, T, inner, note or getattr(inner, "note", ""))


def _cpu_targets_set(group: str) -> list[CpuCase]:
    """The issue's CPU targets: every op at its lengths (benchmarks/README.md, CPU targets)."""
    cases = [_cpu_case("attention", PaddedShape(f"gqa-T{T}", group, 2, 8, 2, T, T, 64, True, "fp32",
                                                "GQA 8/2, d 64, B 2", pad=T // 8), T, group)
             for T in CPU_TARGET_LENGTHS["attention"]]
    for variant in ANCHOR_VARIANTS:
        cases += [_cpu_case("isolation" if variant == "isolation" else "anchors",
                            AnchorShape(f"{variant}-T{T}", group, 1, 8, 8, T, T, 64, True, "fp32",
                                        f"GPT2-XL-like scaled (H 8, d 64), {ANCHOR_VARIANTS[variant]}",
                                        variant=variant),
                            T, group) for T in CPU_TARGET_LENGTHS["anchors"]]
    cases += [_cpu_case("saliency", saliency_case("cpu-stack", T, dtype="fp32", group=group), T, group)
              for T in CPU_TARGET_LENGTHS["saliency"]]
    cases += [_cpu_case("momentum", MomentumShape(f"momentum-T{T}", group, 1, 8, 8, T, T, 64, True, "fp32",
                                                  "H 8, d 64", model="cpu-h8"), T, group)
              for T in CPU_TARGET_LENGTHS["momentum"]]
    cases += [_cpu_case("deep-thinking", c, c.N, group) for c in (
        update_case(m, ds, dtype="fp32", layers=DT_CPU_LAYERS, group=group) for m in DT_LAYERS
        for ds in ("sst2", "agnews"))]
    return cases + [_cpu_case("e2e", E2ECase(f"{E2E_MODEL}-sst2-{E2E_PER_CLASS}pc", group, E2E_MODEL, E2E_PER_CLASS,
                                             E2E_T, note="SmolLM2-135M-Instruct (GGUF, de-quantised to fp32)"),
                              E2E_T, group)]


def _cpu_targets_tiny() -> list[CpuCase]:
    g = "tiny"
    return [_cpu_case("attention", PaddedShape("tiny-gqa", g, 2, 4, 2, 24, 24, 16, True, "fp32", pad=3), 24, g),
            *(_cpu_case("isolation" if v == "isolation" else "anchors",
                        AnchorShape(f"tiny-{v}", g, 1, 4, 4, 40, 40, 16, True, "fp32", variant=v, demonstrations=4,
                                    classes=2), 40, g) for v in ANCHOR_VARIANTS),
            *(_cpu_case("saliency", SaliencyCase(f"tiny-T{T}", g, "tiny", 2, 2, 16, T, 1, "fp32", 4, 2), T, g)
              for T in (40, 48)),
            _cpu_case("momentum", MomentumShape("tiny-momentum", g, 1, 4, 4, 33, 33, 16, True, "fp32", model="tiny"),
                      33, g),
            _cpu_case("deep-thinking", UpdateCase("tiny-dt", g, "tiny", 2, 2, 8, "sst2", 1, "fp32"), 8, g),
            _cpu_case("e2e", E2ECase("tiny-llama", g, "tiny-llama", 1, 80, note="random-weight 2-layer Llama, GQA 4/2"),
                      80, g)]


cpu_target_cases = case_set("cpu-targets", lambda _: _cpu_targets_set("cpu-targets-on-gpu"),
                            lambda _: _cpu_targets_set("cpu-targets"), _cpu_targets_tiny)


RETUNING_DIGITS, RETUNING_BATCHES, RETUNING_GPU_BATCHES = (8, 12, 16), (1, 32), (1, 32, 256)


@dataclass(frozen=True)
class RetuneCase(_Case):
    """``B`` Re-Tuning ``task`` problems of ``digits`` digits (``sample_problem`` with ``random.Random(digits)``: the
    first ``B`` of one sequence, so a smaller batch is a prefix of a larger one), solved on ``model``: ``"trained"``
    (the checkpoint ``scripts/train_retuning.py`` writes), ``"scripted"`` (random weights of that checkpoint's shape,
    steered to the task's training data: a model that recurses right every time) or ``"tiny-scripted"`` (the same
    at a toy size, for the smoke test)."""

    name: str
    group: str
    model: str
    task: str
    digits: int
    B: int
    dtype: str = "fp32"
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.task}, {self.digits} digits, {self.B} problem{'s' if self.B > 1 else ''}, {self.model} model"


RETUNING_MODELS = {"trained": "", "scripted": "scripted-", "tiny-scripted": "tiny-"}  # -> case name prefix
RETUNING_NOTES = {"trained": "the trained model", "tiny-scripted": "smoke test",
                  "scripted": "random weights of the trained shape, steered to the data"}


def _retune_cases(models, digits, batches, gpu: bool):
    return lambda batch=None: [RetuneCase(f"{RETUNING_MODELS[m]}addition-{n}d-b{B}", m + ("-gpu" if gpu else ""), m,
                                          "addition", n, B, note=RETUNING_NOTES[m])
                               for m in models for n in digits for B in ((batch,) if batch else batches)]


retuning_cases = case_set(
    "retuning", _retune_cases(("trained", "scripted"), RETUNING_DIGITS, RETUNING_GPU_BATCHES, True),
    _retune_cases(("trained", "scripted"), RETUNING_DIGITS, RETUNING_BATCHES, False),
    lambda: _retune_cases(("tiny-scripted",), (3,), (1, 2), False)(), batch=None)
