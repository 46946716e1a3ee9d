"""One anchor re-weighting training epoch end to end, seam vs seed-style; benchmarks/README.md."""

from __future__ import annotations

import contextlib

import torch

from benchmarks.harness import Benchmark, Provider, Timed, TimingConfig, compare, kernel_text, make_check
from benchmarks.shapes import epoch_cases, epoch_examples
from fastattn_icl.testing import GRAD_FACTOR

OURS, EAGER = "fastattn_icl", "eager"
GATE_BETA_STD, GATE_MAX_BATCH = 0.5, 4


def seed_style_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with the controller's anchor re-weighting, as the seed code does it (full passes only, the
    final query row re-weighted). ``query [B, H, T, D]``, ``key``/``value [B, Hkv, T, D]``, ``attention_mask``
    ``None`` or bool ``[B, T]`` (True = keep). Returns ``(out [B, T, H, D], None)``."""
    from fastattn_icl.integrations.controller import find_controller

    B, H, Tq, D = query.shape
    Tk = key.shape[2]
    if Tq != Tk:
        raise NotImplementedError("seed_style_attention: full passes only (no KV cache)")
    if key.shape[1] != H:
        key, value = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (key, value))
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * (D**-0.5 if scaling is None else scaling)
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :Tk].bool()
    probs = torch.softmax(scores.masked_fill(~keep, torch.finfo(scores.dtype).min), dim=-1)  # [B, H, T, T]
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
        probs = probs * torch.cat([ones, final_row[:, :, None, :]], dim=2)  # [B, H, T, T] weights, materialised
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous(), None


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


def _context(provider: str):
    return seed_style_installed() if provider == EAGER else contextlib.nullcontext()


def build_model(case, device: torch.device, dtype: torch.dtype):
    """Random-weight GPT2 of the case's shape (same weights in every dtype), frozen, eval, on the seam."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=case.vocab, n_positions=1024, n_embd=case.d_model, n_layer=case.layers,
                        n_head=case.heads, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    model = model.to(dtype).eval().requires_grad_(False)
    model.set_attn_implementation("fastattn_icl")
    return model


def reweighting(model, case):
    from fastattn_icl.methods import AnchorReweighting

    builder, _ = epoch_examples(case.demos_per_class, case.train_per_class, case.classes)
    return AnchorReweighting(model, builder.num_classes, builder.label_token_ids, pad_token_id=0)


def dbeta(rw, examples, beta: torch.Tensor, provider: str) -> torch.Tensor:
    """``dbeta`` of one training step's loss (mean CE over the label-word logits, in float64)."""
    from fastattn_icl.methods import collate

    batch, device = collate(examples, rw.pad_token_id), rw.beta.device
    with torch.no_grad():
        rw.beta.copy_(beta.to(rw.beta.dtype))
    rw.beta.grad = None
    with _context(provider), rw.applied(batch["anchor_positions"], batch["anchor_classes"]):
        logits = rw.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          position_ids=batch["position_ids"].to(device), use_cache=False, logits_to_keep=1).logits
    logits = logits[:, -1, rw.label_token_ids].double()
    torch.nn.functional.cross_entropy(logits, batch["labels"].to(device)).backward()
    grad = rw.beta.grad.detach().clone()
    rw.beta.grad = None
    with torch.no_grad():
        rw.beta.zero_()
    return grad


def gate(case, rw, group, providers, mode) -> dict:
    """``dbeta`` of each provider vs the seed-style implementation on a float64 copy of the model."""
    model64 = build_model(case, group.device, torch.float64)
    model64.load_state_dict(rw.model.state_dict())  # the benchmark dtype's (rounded) weights, upcast
    rw64 = reweighting(model64, case)
    rw64.beta = torch.nn.Parameter(rw64.beta.detach().double())
    first = list(case.examples[: min(case.batch_size, GATE_MAX_BATCH)])
    beta = (GATE_BETA_STD * torch.randn(rw.beta.shape, generator=torch.Generator().manual_seed(7)))
    beta = beta.to(torch.bfloat16).double()
    ref64, same = dbeta(rw64, first, beta, EAGER), dbeta(rw, first, beta, EAGER)
    scope = f"dbeta of one step on the first {len(first)} example(s) of the first batch, random beta"
    checks = {}
    for p in providers:
        errors, message = compare("dbeta", same if p.name == EAGER else dbeta(rw, first, beta, p.name), same, ref64,
                                  GRAD_FACTOR)
        checks[p.name] = make_check({"dbeta": errors}, [message], scope, dbeta_max_abs=float(ref64.abs().max()))
    return checks


def _timed(case, rw, group, p, mode) -> Timed:
    examples = list(case.examples)

    def epoch():
        with torch.no_grad():
            rw.beta.zero_()
        rw.fit(examples, epochs=1, batch_size=case.batch_size, shuffle=False, progress=False)

    return Timed(epoch, context=_context(p.name))


def _setup(group, cases) -> None:
    group.model = build_model(cases[0], group.device, cases[0].torch_dtype)


BENCH = Benchmark(
    name="epoch", suffix="-epoch", modes=("epoch",), cases=epoch_cases, setup=_setup,
    group=lambda c: (c.layers, c.heads, c.d_model, c.vocab, c.dtype),
    op="anchor re-weighting: one training epoch (AnchorReweighting.fit, forward + backward + Adam)",
    inputs=lambda case, group: reweighting(group.model, case), gate=gate, timed=_timed,
    # calls of 0.1-10 s: no warm-up beyond the untimed calls; CUDA 3 s of epochs; CPU exactly 2 timed epochs
    timing=TimingConfig(cuda_warmup_ms=0.0, cuda_rep_ms=3000.0, cpu_warmup_ms=0.0, cpu_rep_ms=0.0, cpu_min_reps=2),
    metric=lambda case, ms: {"ms_per_example": None if ms is None else ms / case.num_examples},
    providers=[
        Provider(OURS, None, lambda device: (
            f"AnchorReweighting.fit through attn_implementation='fastattn_icl' (the seam: {kernel_text(device)})")),
        Provider(EAGER, None, lambda device: (
            "AnchorReweighting.fit with benchmarks.bench_reweighting_epoch.seed_style_attention under the seam's "
            "name (seed-style: materialised P [B, H, T, T] times a materialised weight matrix, then P̂ V)")),
    ],
    gate_text="one step's dbeta vs the seed-style implementation on a float64 copy of the model: error <= "
    f"{GRAD_FACTOR:g}x the seed-style implementation's own error in the benchmark dtype + 1e-5 * max(1, max|dbeta|); "
    "random beta ~ N(0, 0.5^2); first <= 4 examples of the first batch",
    call="one call = one epoch (beta reset to 0 first)",
    memory="the frozen model's weights are allocated before and not counted",
    flop_model="none (end-to-end epoch; TFLOP/s not reported)",
    cpu_path="`fastattn_icl` rows are the seam's CPU path (backend 'torch')",
    cpu_note="CPU model: 2 layers, GPT2-XL's 25 heads at head dim 16 (d_model 400), fp32; CPU times are a smoke "
    "signal, not the GPU result",
)
