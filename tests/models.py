"""Tiny random-weight models of each routed family and the helpers shared by the integration and method
tests: inputs with left padding, prefill and cached-decode runs that return logits and gradients, the
seam swap for GPT-J on either transformers path.

Comparisons use the tolerance rule of ``fastattn_icl.testing`` with ``float64_twin`` (or ``oracle_attention`` on
it) as the oracle.
"""

from __future__ import annotations

import copy
import importlib

import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    CodeGenConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from fastattn_icl import reference
from fastattn_icl.integrations import transformers as seam
from fastattn_icl.integrations.cache_keyword import cache_kwargs, output_cache
from fastattn_icl.integrations.controller import find_controller
from fastattn_icl.integrations.gptj import routes_attention_class, routes_attention_interface
from fastattn_icl.reference.anchors import anchor_log_weights, reweighted_rows
from fastattn_icl.testing import GRAD_FACTOR, check_close

VOCAB = 100
PAD = 3  # left-padding of the second row

LLAMA_LIKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)

FAMILIES = {
    "gpt2": lambda layers, **kw: GPT2Config(
        **{
            "n_embd": 64,
            "n_layer": layers,
            "n_head": 4,
            "vocab_size": VOCAB,
            "n_positions": 64,
            "attn_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "scale_attn_by_inverse_layer_idx": True,  # per-layer scaling: checks that `scaling` is honoured
            "initializer_range": 0.1,
            "bos_token_id": 0,
            "eos_token_id": 1,
            **kw,
        }
    ),
    "llama": lambda layers, **kw: LlamaConfig(**LLAMA_LIKE, num_hidden_layers=layers, **kw),
    "qwen2": lambda layers, **kw: Qwen2Config(**LLAMA_LIKE, num_hidden_layers=layers, **kw),
    # a window that never binds on these lengths: the sliding-window mask path reduces to causal
    "mistral": lambda layers, **kw: MistralConfig(
        **LLAMA_LIKE, num_hidden_layers=layers, **{"sliding_window": 32, **kw}
    ),
    "gpt_neox": lambda layers, **kw: GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=1,
        **kw,
    ),
    "opt": lambda layers, **kw: OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        init_std=0.1,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **kw,
    ),
}


def gptj_like_config(config_class):
    """A tiny GPT-J-shaped config builder (GPT-J, CodeGen); keyword overrides win."""
    return lambda layers, **kw: config_class(
        **{
            "n_layer": layers,
            "n_embd": 64,
            "n_head": 4,
            "rotary_dim": 8,
            "n_inner": 128,
            "vocab_size": VOCAB,
            "n_positions": 64,
            "attn_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "initializer_range": 0.1,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
            **kw,
        }
    )


def _routed_family(module: str, attention: str) -> bool:
    return routes_attention_class(getattr(importlib.import_module(module), attention))


# families that transformers routes only from 5.24 on (before, GPT-J has its own patch, tests/integrations/
# test_gptj.py, and CodeGen is refused, tests/methods/test_gptj_methods.py)
if _routed_family("transformers.models.gptj.modeling_gptj", "GPTJAttention"):
    FAMILIES["gptj"] = gptj_like_config(GPTJConfig)
if _routed_family("transformers.models.codegen.modeling_codegen", "CodeGenAttention"):
    FAMILIES["codegen"] = gptj_like_config(CodeGenConfig)

BACKENDS = ["torch", "triton"]
# Triton runs on the GPU when there is one, else on CPU under the interpreter (set by tests/conftest.py),
# which costs about 0.2 s per kernel launch: one layer keeps the folder fast there
DEVICES = {"torch": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
LAYERS = {"torch": 2, "triton": 2 if torch.cuda.is_available() else 1}


def tiny_model(family: str, attn_implementation: str = "eager", layers: int = 2, seed: int = 0, **overrides):
    config = FAMILIES[family](layers, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def make_inputs(batch: int, length: int, padded: bool, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[1, :PAD] = 0
        ids[1, :PAD] = 2
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def run_prefill(model, ids, mask):
    """Loss over non-padded positions and their logits."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7)).to(logits.device)
    keep = mask.bool()
    (logits[keep] * weights[keep]).sum().backward()
    return logits.detach()[keep], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_decode(model, ids, mask, tokens):
    """Prefill then one token per step on the model's own cache; the loss sums every step's logits, so
    the gradients flow through the cached keys and values."""
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(7)
    out = model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
    keep = mask.bool()
    step_logits = [out.logits[keep]]
    past = output_cache(out)
    for step in range(tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            tokens[:, step : step + 1],
            attention_mask=mask,
            position_ids=positions(mask)[:, -1:],
            **cache_kwargs(past),
            use_cache=True,
        )
        past = output_cache(out)
        step_logits.append(out.logits[:, -1])
    loss = sum((logits * torch.randn(logits.shape, generator=gen).to(logits.device)).sum() for logits in step_logits)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [logits.detach() for logits in step_logits], grads


def float64_twin(model):
    """A float64 copy of a model that runs eager attention: the oracle of the tolerance rule."""
    twin = copy.deepcopy(model).double()
    if twin.config._attn_implementation != "eager":
        twin.set_attn_implementation("eager")
    return twin


def check_grads(actual: dict, same: dict, high: dict) -> None:
    """Every parameter gradient by the tolerance rule (``GRAD_FACTOR``): ``same`` from the eager model in the
    dtype of ``actual``, ``high`` from its float64 twin."""
    assert actual.keys() == same.keys() == high.keys()
    for name, ref64 in high.items():
        check_close(f"grad of {name}", actual[name], same[name], ref64, factor=GRAD_FACTOR)


ROUTED = routes_attention_interface()


def swap_seam(monkeypatch, replacement) -> None:
    """Put ``replacement`` in the seam's place for GPT-J on either path: the eager-core patch calls
    ``seam.fastattn_icl_attention_forward`` by name, a routed GPT-J the function registered with
    ``AttentionInterface``."""
    seam.register()
    monkeypatch.setattr(seam, "fastattn_icl_attention_forward", replacement)
    monkeypatch.setitem(AttentionInterface._global_mapping, seam.ATTN_IMPLEMENTATION, replacement)


def tiny_gptj(layers: int = 2, n_embd: int = 64, n_head: int = 4, rotary_dim: int = 8, seed: int = 0, **overrides):
    """Head dim ``n_embd // n_head`` (16 by default); rotary on the first ``rotary_dim`` features only."""
    config = gptj_like_config(GPTJConfig)(
        layers, n_embd=n_embd, n_head=n_head, rotary_dim=rotary_dim, n_inner=2 * n_embd, **overrides
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def _rows(t: torch.Tensor, B: int) -> torch.Tensor:
    return t.expand(B, -1) if t.shape[0] == 1 else t


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference attention with the controller's method state; full passes only (Tq == Tk)."""
    B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
    assert Tq == Tk, "the oracle implements full passes only"
    state = find_controller(module).layer_state(module.layer_idx) if find_controller(module) else {}
    common = dict(causal=True, scale=scaling, key_padding_mask=attention_mask)
    iso = state.get("isolation")
    if iso is not None:
        common.update(isolation_rows=_rows(iso.rows, B), isolation_window=iso.window)
    anchors = state.get("anchors")
    # asked for as the seam asks (GPT-2 pops output_attentions before the call; transformers' recorder still wants
    # the weights): testing the flag alone returned no weights there, and the recorder kept none
    probs = reference.attention_probs(query, key, **common) if seam._attentions_requested(kwargs) else None
    if anchors is None:
        out = reference.attention(query, key, value, **common)
    else:
        beta = state["beta"][module.layer_idx]
        positions, classes = _rows(anchors.positions, B), _rows(anchors.classes, B)
        out = reference.anchor_reweight_attention(
            query, key, value, beta, positions, classes, reweight_from=anchors.reweight_from, **common
        )
        if probs is not None:
            logw = anchor_log_weights(beta[None].expand(B, -1, -1).double(), positions, classes, Tk)  # [B, H, Tk]
            rows = reweighted_rows(anchors.reweight_from, B, Tq, query.device)  # [B, Tq]
            probs = probs * torch.where(rows[:, None, :, None], logw.exp()[:, :, None, :], 1.0).to(probs.dtype)
    return out.transpose(1, 2).contiguous(), probs
