"""Anchor compression end to end: compressed prefix vs full prompts; benchmarks/README.md."""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch

from benchmarks import harness as h
from benchmarks.shapes import DATASETS, compression_cases
from fastattn_icl.testing import FWD_FACTOR, max_error

OURS, FULL_EAGER, FULL_SDPA = "compressed", "full-eager", "full-sdpa"
EXPANDED_SDPA, EXPANDED_EAGER = "compressed-expanded-sdpa", "compressed-expanded-eager"
FULL = (FULL_EAGER, FULL_SDPA)
SEAM = "fastattn_icl"
IMPLEMENTATION = {OURS: SEAM, FULL_EAGER: "eager", FULL_SDPA: "sdpa", EXPANDED_SDPA: "sdpa", EXPANDED_EAGER: "eager"}
# the gate's reference of each provider: the eager implementation of the same computation
REFERENCE = {OURS: EXPANDED_EAGER, EXPANDED_SDPA: EXPANDED_EAGER, EXPANDED_EAGER: EXPANDED_EAGER,
             FULL_EAGER: FULL_EAGER, FULL_SDPA: FULL_EAGER}
GATE_ROWS = 4
REFERENCE_DTYPE = {"fp32": torch.float64, "fp16": torch.float32, "bf16": torch.float32}
REL_TOL = {"fp16": 2e-2, "bf16": 5e-2, "fp32": 1e-4}  # fallback only, when the copy cannot be built
# Wang et al., "Label Words are Anchors" (EMNLP 2023, arXiv:2305.14160), §3.2: Hidden_anchor vs full ICL, batch 1
PAPER_SPEEDUPS = {"gpt2": {"sst2": 1.1, "trec": 1.5, "agnews": 2.5, "emoc": 1.4},
                  "gptj": {"sst2": 1.5, "trec": 2.2, "agnews": 2.9, "emoc": 1.9}}
THROUGHPUT_RATIO, THROUGHPUT_BATCH, THROUGHPUT_DATASET = 3.0, 64, "agnews"


def build_model(spec, device: torch.device, dtype: torch.dtype | None = None):
    """The random-weight model of ``spec`` on ``device`` (``torch.manual_seed(0)``), eval, frozen, eager."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(spec.config(), dtype=dtype or spec.torch_dtype,
                                                 attn_implementation="eager")
    return model.eval().requires_grad_(False)


def no_sdpa(provider: str, model) -> str | None:
    if IMPLEMENTATION[provider] == "sdpa" and not getattr(type(model), "_supports_sdpa", False):
        return (f"transformers' {type(model).__name__} has no sdpa attention (it does not route attention through "
                "AttentionInterface; eager only)")
    return None


@contextlib.contextmanager
def provider_context(model, provider: str):
    """The block with the model on ``provider``'s attention implementation (the seam for ``compressed``)."""
    impl = IMPLEMENTATION[provider]
    if impl == SEAM:
        from fastattn_icl.integrations import enabled

        with enabled(model):
            yield
        return
    previous = model.config._attn_implementation
    if previous != impl:
        model.set_attn_implementation(impl)
    try:
        yield
    finally:
        if previous != impl:
            model.set_attn_implementation(previous)


@dataclass
class GeometryInputs:
    """Token ids of one (model, dataset, n): ``demo_ids [T_demo]``, ``test_ids [rows, S]``, ``keep [M]``."""

    demo_ids: torch.Tensor
    test_ids: torch.Tensor
    keep: torch.Tensor

    def full_ids(self, B: int) -> torch.Tensor:
        return torch.cat([self.demo_ids.expand(B, -1), self.test_ids[:B]], dim=1)


def make_inputs(case, rows: int, device: torch.device) -> GeometryInputs:
    gen = torch.Generator().manual_seed(zlib.crc32("-".join(map(str, case.geometry)).encode()))
    demo = torch.randint(0, case.model.vocab, (case.T_demo,), generator=gen)
    test = torch.randint(0, case.model.vocab, (rows, case.S), generator=gen)
    return GeometryInputs(demo.to(device), test.to(device), torch.tensor(case.positions(), dtype=torch.long))


def compress(model, inp: GeometryInputs):
    from fastattn_icl.methods.compression import CompressedDemonstrations

    return CompressedDemonstrations.from_ids(model, inp.demo_ids, inp.keep, method="hidden_anchor")


def serve_fn(provider: str, model, comp, inp: GeometryInputs, B: int):
    """The timed call of ``provider`` on the first ``B`` test inputs: logits ``[B, 1, V]``."""
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


def _last_logits(provider, model, comp, inp, rows) -> torch.Tensor:
    with provider_context(model, provider):
        return serve_fn(provider, model, comp, inp, rows)()[:, -1].detach().float().cpu().clone()


def gate_geometry(case, model, comp, inp, names, ref_model) -> dict:
    """``{provider: check | (status, message)}``: logits vs the reference on ``ref_model``, or (no copy) the
    relative fallback rule against the same-dtype reference."""
    rows, device, logits, failed, high = min(GATE_ROWS, inp.test_ids.shape[0]), model.device, {}, {}, {}
    for p in dict.fromkeys([REFERENCE[p] for p in names] + names):
        try:
            logits[p] = _last_logits(p, model, comp, inp, rows)
        except Exception as exc:
            failed[p] = h.failure(exc, "gate")
        h.free_memory(device)
    if ref_model is not None:
        try:
            comp_high = compress(ref_model, inp)
            for ref in dict.fromkeys(REFERENCE[p] for p in names):
                high[ref] = _last_logits(ref, ref_model, comp_high, inp, rows).double()
            del comp_high
        except Exception as exc:
            failed["reference copy"] = h.failure(exc, "gate")
        h.free_memory(device)
    dtype, head, checks = case.model.dtype, f"last-position logits of the first {rows} test inputs", {}
    for p in names:
        ref = REFERENCE[p]
        broken = failed.get(p) or failed.get(ref) or failed.get("reference copy")
        if broken:
            checks[p] = broken if p in failed else (broken[0], f"{broken[1]} (the gate's reference)")
            continue
        got, same = logits[p], logits[ref]
        if ref_model is not None:
            scope = (f"{head} vs a {str(ref_model.dtype).removeprefix('torch.')} copy of the model ({ref} there, same "
                     f"weights upcast): error <= {FWD_FACTOR:g}x {ref}'s own {dtype} error + 1e-5 * max(1, max|logit|)")
            errors, message = h.compare("logits", got, same, high[ref], FWD_FACTOR)
        else:
            rel = REL_TOL[dtype]
            err, tol = max_error(got, same), rel * float(same.abs().max())
            scope = (f"{head} vs {ref} in {dtype} (fallback: no higher-precision copy of the model): max abs error "
                     f"<= {rel:g} * max|logit|" + (f"; {p} is the reference, not checked itself" if p == ref else ""))
            errors = {"error": err, "tolerance": tol}
            message = None if err <= tol else (f"logits: max error {err:.3e} > tolerance {tol:.3e} "
                                               f"({rel:g} * max|logit|)")
        checks[p] = {"status": "incorrect" if message else h.STATUS_OK, "scope": scope, "errors": {"logits": errors},
                     "message": message, "logits_max_abs": float(same.abs().max())}
    return checks


def setup(group, cases) -> None:
    """Build the model (and its reference copy); compress (timed) and gate every geometry; free the copy."""
    spec, device = cases[0].model, group.device
    group.model = build_model(spec, device)
    try:
        ref_model = build_model(spec, device, REFERENCE_DTYPE[spec.dtype])
        ref_model.load_state_dict(group.model.state_dict())
    except Exception as exc:
        ref_model = None
        h.free_memory(device)
        group.notes.append(f"gate on {spec.key}: no {REFERENCE_DTYPE[spec.dtype]} copy of the model "
                           f"({h.failure(exc)[1]}); the relative fallback rule ({REL_TOL[spec.dtype]:g} * max|logit|) "
                           "applies, which is weak on random-weight models (benchmarks/README.md)")
    names = [p.name for p in group.providers if not no_sdpa(p.name, group.model)]
    group.geometries = {}
    for geometry in dict.fromkeys(c.geometry for c in cases):
        members = [c for c in cases if c.geometry == geometry]
        first = members[0]
        entry = {"geometry": "-".join(map(str, geometry)) + "pc", "model": spec.key, "dataset": first.dataset,
                 "per_class": first.per_class, "T_demo": first.T_demo, "M": first.M, "status": h.STATUS_OK,
                 "median_ms": None, "p20_ms": None, "p80_ms": None, "prefix_bytes": None, "message": None}
        group.extra.setdefault("compress", []).append(entry)
        try:
            inp = make_inputs(first, max(GATE_ROWS, *(c.B for c in members)), device)

            def build(_inp=inp):
                with torch.inference_mode():
                    return compress(group.model, _inp)

            with provider_context(group.model, OURS):
                comp = build()
                entry.update(h.bench(build, device, group.timing))
            h.free_memory(device)
            entry["prefix_bytes"] = comp.keys.nbytes + comp.values.nbytes
            group.geometries[geometry] = comp, inp, gate_geometry(first, group.model, comp, inp, names, ref_model)
        except Exception as exc:
            entry["status"], entry["message"] = h.failure(exc, "compress")
            group.geometries[geometry] = None, None, dict.fromkeys(names, (entry["status"], entry["message"]))
            h.free_memory(device)
    del ref_model
    h.free_memory(device)


def _rate(x: float) -> str:
    """Test inputs per second: 4 significant digits, whole numbers from 1000 on (no exponent)."""
    return f"{x:.4g}" if x < 1000 else f"{x:.0f}"


def _throughput(ours, base, ratio, text) -> str:
    if ratio is None:
        return text
    B = ours["params"]["B"]
    return f"{ratio:.2f}x ({_rate(B / ours['median_ms'] * 1e3)} vs {_rate(B / base['median_ms'] * 1e3)} inputs/s)"


def _find(rows, provider, **params):
    return next((r for r in rows if r["provider"] == provider and all(r["params"].get(k) == v
                                                                     for k, v in params.items())), None)


def targets(rows: list[dict]) -> list[dict]:
    """The paper's per-dataset speed-ups at B = 1 (1 demo/class), and 3x throughput at B = 64 on AGNews."""
    out = []
    for key, family in dict.fromkeys((r["params"]["model_key"], r["params"]["family"]) for r in rows):
        for ds in dict.fromkeys(r["params"]["dataset"] for r in rows if r["params"]["model_key"] == key):
            paper = PAPER_SPEEDUPS.get(family, {}).get(ds)
            if paper is None:
                continue
            where = dict(model_key=key, dataset=ds, per_class=1, B=1)
            ours, base = _find(rows, OURS, **where), _find(rows, FULL_EAGER, **where)
            name = (f"{key} {DATASETS[ds].name}, B 1, 1 demo/class: {OURS} vs {FULL_EAGER} >= {paper:g}x "
                    "(the paper's)")
            if ours is None:
                out.append({"target": name, "result": "N/A", "detail": "no such row in this run"})
                continue
            ok, ratio, text = h.ratio_verdict(ours, base, lambda r, _p=paper: r >= _p)
            detail = f"not compared: {text}" if ratio is None else (
                f"{ratio:.2f}x ({OURS} {ours['median_ms']:.4g} ms vs {FULL_EAGER} {base['median_ms']:.4g} ms; T_demo "
                f"{ours['params']['T_demo']} + S {ours['params']['S']}, M {ours['params']['M']}); paper {paper:g}x")
            out.append({"target": name, "result": h.verdict([ok]), "detail": detail})
        mine = [r for r in rows if r["params"]["model_key"] == key and r["params"]["dataset"] == THROUGHPUT_DATASET]
        if not mine:
            continue
        batches = {r["params"]["B"] for r in mine}
        B = THROUGHPUT_BATCH if THROUGHPUT_BATCH in batches else max(batches)
        at = "" if B == THROUGHPUT_BATCH else f" (this set's largest; the target is at B {THROUGHPUT_BATCH})"
        per_class = sorted({r["params"]["per_class"] for r in mine})
        for base_name in FULL:
            where = [dict(model_key=key, dataset=THROUGHPUT_DATASET, per_class=n, B=B) for n in per_class]
            t = h.ratio_target(f"{key} {DATASETS[THROUGHPUT_DATASET].name}, B {THROUGHPUT_BATCH}: {OURS} throughput >= "
                             f"{THROUGHPUT_RATIO:g}x {base_name} ({', '.join(map(str, per_class))} demo/class)",
                             [(f"{w['per_class']}/class", _find(rows, OURS, **w), _find(rows, base_name, **w))
                              for w in where], lambda r: r >= THROUGHPUT_RATIO, _throughput, sep="; ")
            out.append({**t, "detail": f"at B {B}{at}: {t['detail']}"})
    return out


def break_even(results: dict) -> None:
    """``break_even_inputs`` of each geometry: test inputs after which compressing has paid for itself against
    ``full-eager`` at B = 1 (``compress / (full-eager - compressed)`` per input; ``None`` when not faster)."""
    for e in results.get("compress", []):
        where = dict(model_key=e["model"], dataset=e["dataset"], per_class=e["per_class"], B=1)
        ours, base = _find(results["rows"], OURS, **where), _find(results["rows"], FULL_EAGER, **where)
        ratio = h.speedup(ours, base)[0] if ours is not None else None
        saved = None if ratio is None else base["median_ms"] - ours["median_ms"]
        e["break_even_inputs"] = e["median_ms"] / saved if saved and saved > 0 and e["median_ms"] else None


def _describe(provider: str):
    impl = IMPLEMENTATION[provider]
    if provider == OURS:
        return lambda device: ("comp.forward(model, test_ids, share_prefix=True, logits_to_keep=1): one shared prefix "
                               f"copy read in place through the seam ({h.kernel_text(device)}; the model is switched "
                               "to the seam, GPT-J by patch_gptj, outside the timed call)")
    if provider in FULL:
        return lambda device: (f"model(full_ids [B, T_demo + S], use_cache=False, logits_to_keep=1), "
                               f"attn_implementation='{impl}': the demonstrations run again with every test input"
                               + (" (the paper's code)" if provider == FULL_EAGER else ""))
    return lambda device: (f"comp.forward(model, test_ids, share_prefix=False, logits_to_keep=1), attn_implementation="
                           f"'{impl}': a DynamicCache of B prefix copies (the Hugging Face way)")


def _timed(case, inputs, group, p, mode) -> h.Timed:
    comp, inp, _ = inputs
    return h.Timed(serve_fn(p.name, group.model, comp, inp, case.B), context=provider_context(group.model, p.name))


BENCH = h.Benchmark(
    name="compression", suffix="-compression", modes=("serve",), cases=compression_cases, group=lambda c: c.model.key,
    op="anchor compression end to end: serve test inputs over the compressed demonstrations vs full prompts",
    setup=setup, inputs=lambda case, group: group.geometries[case.geometry],
    gate=lambda case, inputs, group, providers, mode: {p.name: inputs[2][p.name] for p in providers},
    timed=_timed, finish=break_even,
    timing=h.TimingConfig(cpu_warmup_ms=0.0, cpu_rep_ms=100.0, cpu_min_reps=2, cpu_max_reps=20),
    metric=lambda case, ms: {"ms_per_input": None if ms is None else ms / case.B,
                             "inputs_per_s": None if ms is None else case.B / (ms * 1e-3)},
    providers=[h.Provider(p, None, _describe(p), skip=lambda case, group, _p=p: no_sdpa(_p, group.model))
               for p in (OURS, FULL_EAGER, FULL_SDPA, EXPANDED_SDPA, EXPANDED_EAGER)],
    gate_text=f"per model, dataset and demos/class: last-position logits of the first {GATE_ROWS} test inputs vs the "
    f"eager twin ({EXPANDED_EAGER} for the compressed providers, {FULL_EAGER} for the full ones) on a copy of the "
    f"model upcast to float64 (fp32 models) or float32 (half): error <= {FWD_FACTOR:g}x the same-dtype twin's own "
    "error + 1e-5·max(1, max|logit|); without that copy (see Skipped): max abs error vs the same-dtype twin <= "
    + ", ".join(f"{v:g} ({k})" for k, v in REL_TOL.items()) + " · max|logit|",
    call="one call = B test inputs (ms/input = median / B); compress = CompressedDemonstrations.from_ids once",
    memory="the model's weights and the compressed prefix (its size: compress table) are allocated before",
    flop_model="none (end-to-end model forwards; TFLOP/s not reported)",
    cpu_path="the compressed rows are the seam's CPU path (backend 'torch')",
    cpu_note="CPU models: 4 layers, d_model 256, vocab 1024, fp32; CPU times are a smoke signal, not the GPU result",
    columns=[("T_demo + S, M", lambda by: "{T_demo} + {S}, {M}".format(**next(r for r in by.values() if r)["params"]))],
    tables=[("compress", "Compression (once per geometry, amortised over every test input)", [
        ("geometry", lambda e: e["geometry"]), ("T_demo", lambda e: str(e["T_demo"])), ("M", lambda e: str(e["M"])),
        ("compress ms (p20–p80)",
         lambda e: f"{e['status']}: {e['message']}" if e["median_ms"] is None else h.fmt_ms(e)),
        ("prefix MiB", lambda e: "—" if e["prefix_bytes"] is None else f"{e['prefix_bytes'] / 2**20:.3g}"),
        ("break-even vs full-eager at B 1 (inputs)",
         lambda e: "—" if e.get("break_even_inputs") is None else f"{e['break_even_inputs']:.3g}")])],
    targets=targets,
)
