"""The enumeration the compile suite runs comes from the launchers' own tables, and the autotuner's prune works
from a stated shared-memory limit (no compile, no GPU: these run in the interpreter session)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
from fastattn_icl._triton import attention, momentum  # noqa: E402
from fastattn_icl._triton import specializations as S  # noqa: E402
from fastattn_icl._triton.attention import tuning  # noqa: E402


def _configs(kind, block_d, elem):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in tuning.candidates(kind, block_d, elem)]


def test_specs_enumerate_every_flag_set_dtype_head_dim_and_config():
    for kind in attention.TUNED_KINDS:
        expected = sum(len(tuning.candidates(kind, d, dt.itemsize))
                       for d in S.HEAD_DIMS for dt in S.DTYPES) * len(attention.FLAG_SETS[kind])
        assert len(S.specs((kind,))) == expected
    got = {(s.kind, s.flags) for s in S.specs()}
    for kind in S.KINDS:
        assert {flags for k, flags in got if k == kind} == set(S.flag_sets(kind))


def test_a_config_added_to_a_launcher_list_is_compiled(monkeypatch):
    key = (128, False)
    added = (16, 16, 4, 1)
    table = {**tuning.CANDIDATES, "dq": {**tuning.CANDIDATES["dq"], key: [*tuning.CANDIDATES["dq"][key], added]}}
    monkeypatch.setattr(tuning, "CANDIDATES", table)
    dq = S.specs(("dq",), (torch.float16,), (128,))
    assert any((s.block_m, s.block_n, s.num_warps, s.num_stages) == added for s in dq)
    assert any((s.block_m, s.block_n, s.num_warps, s.num_stages) == added for s in S.report_specs()
               if s.kind == "dq")


def test_ci_scope_covers_every_kernel_flag_and_dtype():
    ci = S.ci_specs()
    for kind in S.KINDS:
        mine = [s for s in ci if s.kind == kind]
        assert {s.dtype for s in mine} == set(S.DTYPES), kind
        names = {name for s in mine for name, value in s.flags if value is True}
        every = {name for fs in S.flag_sets(kind) for name, value in fs if value is True}
        assert names == every, f"{kind}: flags never compiled on in CI: {every - names}"
    first = {(s.kind, s.dtype, s.head_dim) for s in ci if s.position == 0 and s.kind in attention.TUNED_KINDS}
    assert (("fwd", torch.float16, 64) in first and ("dkdv", torch.float32, 256) in first)


def test_launch_refuses_a_flag_set_missing_from_the_table():
    flags = dict(IS_CAUSAL=False, HAS_PADDING=False, HAS_ANCHORS=True, HAS_ISOLATION=False, HAS_PREFIX=True,
                 HAS_MOMENTUM=False, STORE_ATTN=False)
    with pytest.raises(NotImplementedError, match="not in FLAG_SETS"):
        tuning.check_flags("fwd", flags)
    tuning.check_flags("fwd", {**flags, "HAS_PREFIX": False})  # anchors alone: in the table


def test_scan_refuses_a_form_missing_from_the_table():
    v = torch.zeros(1, 1, 4, 8)
    with pytest.raises(NotImplementedError, match="not in FLAG_SETS"):
        momentum._launch_scan(v, torch.empty(1, 1, 4, 8), torch.ones(1, 4, dtype=torch.bool), t_in=4, t_out=4,
                              out_start=0, eta=0.5, group=1, reverse=False, mask_in=False, mask_out=True)


@pytest.mark.parametrize("kind", attention.TUNED_KINDS)
def test_prune_keeps_the_configs_that_fit_a_stated_limit_in_order(kind):
    limit = S.SMEM_LIMIT_SMALL  # 101,376 B: A10, L4, RTX 3090/4090
    for block_d in S.HEAD_DIMS:
        for elem in (2, 4):
            configs = _configs(kind, block_d, elem)
            need = [attention.smem_bytes(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, c.num_stages, elem)
                    for c in configs]
            if min(need) > limit:
                with pytest.raises(attention.SharedMemoryError):
                    attention.prune_configs(kind, block_d, elem, configs, limit)
                continue
            kept = attention.prune_configs(kind, block_d, elem, configs, limit)
            assert kept == [c for c, n in zip(configs, need) if n <= limit]  # same order, only the fitting ones
            assert all(n > limit for c, n in zip(configs, need) if c not in kept)


def test_every_list_keeps_a_config_on_small_gpus():
    # a 101,376-byte GPU (A10, L4, RTX 4090) runs every kernel at every supported head dim and dtype
    for kind in attention.TUNED_KINDS:
        for block_d in S.HEAD_DIMS:
            for elem in (2, 4):
                assert attention.prune_configs(kind, block_d, elem, _configs(kind, block_d, elem),
                                               S.SMEM_LIMIT_SMALL), (kind, block_d, elem)


def test_no_fitting_config_names_the_kernel_and_the_bytes():
    configs = _configs("dkdv", 128, 4)
    smallest = min(attention.smem_bytes("dkdv", c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 128, c.num_stages, 4)
                   for c in configs)
    with pytest.raises(attention.SharedMemoryError) as err:
        attention.prune_configs("dkdv", 128, 4, configs, 48_000)
    text = str(err.value)
    assert "dkdv" in text and f"{smallest:,} B" in text and "48,000 B" in text


def test_smem_estimate_grows_with_tiles_stages_and_width():
    base = attention.smem_bytes("fwd", 64, 64, 128, 2, 2)
    assert attention.smem_bytes("fwd", 128, 64, 128, 2, 2) > base
    assert attention.smem_bytes("fwd", 64, 64, 128, 3, 2) > base
    assert attention.smem_bytes("fwd", 64, 64, 128, 2, 4) == pytest.approx(2 * base, rel=0.05)
    # one stage still stages q and one copy of k, v through shared memory
    assert attention.smem_bytes("fwd", 64, 64, 128, 1, 2) > 2 * 128 * (64 + 2 * 64)


@pytest.mark.gpu
def test_the_device_prune_reads_this_gpus_limit():
    device = torch.device("cuda")
    limit = attention.device_smem_limit(device)
    assert 48 * 1024 <= limit <= 256 * 1024
    configs = _configs("fwd", 128, 2)
    pruner = tuning._device_pruner("fwd", 128, 2)
    kept = pruner(configs, {"Q": torch.empty(1, device=device)})
    assert kept == attention.prune_configs("fwd", 128, 2, configs, limit) and kept
