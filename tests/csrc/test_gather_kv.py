"""fastattn_icl::gather_kv (csrc/gather_kv.cpp, csrc/cuda/gather_kv.cu) against its oracle.

The op is an exact copy, so results are compared with ``torch.equal`` (bit-exact), not a tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastattn_icl import _ext
from fastattn_icl.ops.gather import gather_kv
from fastattn_icl.reference.compression import gather_kv_reference

needs_ext = pytest.mark.skipif(
    not _ext.has_op("gather_kv"),
    reason=f"fastattn_icl._C is not built ({_ext.load_error()}); {_ext.BUILD_HINT}",
)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rand(shape, dtype, device="cpu", gen=None):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return torch.randint(-100, 100, shape, generator=gen).to(device=device, dtype=dtype)


def _cache(L, B, H, T, D, dtype=torch.float32, device="cpu", layout="contiguous", seed=0):
    """``L`` tensors ``[B, H, T, D]`` laid out in memory as ``layout`` says."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(L):
        kind = layout if layout != "mixed" else ("contiguous", "bthd", "d_major", "sliced")[layer % 4]
        if kind == "contiguous":
            t = _rand((B, H, T, D), dtype, device, gen)
        elif kind == "bthd":  # a [B, T, H, D] buffer seen as [B, H, T, D] (D still innermost)
            t = _rand((B, T, H, D), dtype, device, gen).transpose(1, 2)
        elif kind == "d_major":  # D not innermost: a transposed view
            t = _rand((B, H, D, T), dtype, device, gen).transpose(2, 3)
        elif kind == "sliced":  # a pre-allocated cache of capacity > T, and an odd offset along D
            t = _rand((B, H, T + 3, D + 1), dtype, device, gen)[:, :, 2 : T + 2, 1:]
        else:
            raise ValueError(kind)
        assert t.shape == (B, H, T, D)
        out.append(t)
    return out


def _check(keys, values, index):
    K, V = gather_kv(keys, values, index)
    if index.dim() == 1:
        index = index.expand(keys[0].shape[0], -1)
    rk, rv = gather_kv_reference(keys, values, index)
    L, (B, H, _, D), M = len(keys), keys[0].shape, index.shape[1]
    assert K.shape == V.shape == (L, B, H, M, D)
    assert K.is_contiguous() and V.is_contiguous()
    assert K.dtype == keys[0].dtype and K.device == keys[0].device
    assert torch.equal(K, rk) and torch.equal(V, rv)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "L,B,H,T,D,M",
    [
        (1, 1, 1, 1, 1, 1),  # everything 1
        (3, 2, 4, 17, 64, 9),  # B > 1, typical D
        (2, 3, 5, 13, 7, 1),  # odd sizes, M = 1
        (4, 1, 2, 33, 3, 40),  # M > T: positions repeat
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "mixed"])
def test_matches_reference(dtype, L, B, H, T, D, M, layout):
    keys = _cache(L, B, H, T, D, dtype, layout=layout, seed=1)
    values = _cache(L, B, H, T, D, dtype, layout=layout, seed=2)
    index = torch.randint(0, T, (B, M), generator=torch.Generator().manual_seed(3))
    _check(keys, values, index)


@needs_ext
@pytest.mark.parametrize("layout", ["bthd", "d_major", "sliced"])
def test_non_contiguous_layouts(layout):
    keys = _cache(3, 2, 3, 11, 6, layout=layout, seed=4)
    values = _cache(3, 2, 3, 11, 6, layout="contiguous", seed=5)
    assert not keys[0].is_contiguous()
    _check(keys, values, torch.tensor([[0, 10, 3], [5, 5, 1]]))


@needs_ext
def test_per_row_positions_repeats_unsorted_and_index_layouts():
    keys, values = _cache(2, 3, 2, 8, 4, seed=6), _cache(2, 3, 2, 8, 4, seed=7)
    index = torch.tensor([[7, 0, 0, 3], [1, 2, 3, 4], [6, 6, 6, 6]])
    _check(keys, values, index)
    _check(keys, values, torch.tensor([[7, 0], [1, 2], [6, 5]]).t().contiguous().t())  # [B, M] with stride (1, B)
    _check(keys, values, torch.tensor([[5, 9, 4, 9, 2]])[:, ::2].expand(3, -1))  # stride 0 rows, step 2
    _check(keys, values, torch.tensor([2, 0, 7]))  # [M]: the same positions for every row


@needs_ext
def test_rows_pick_their_own_positions():
    # keys[l][b, h, t, :] = 1000 l + 100 b + 10 h + t, so every gathered element says where it came from.
    L, B, H, T, D = 2, 3, 2, 6, 3
    pos = torch.arange(T).view(1, 1, 1, T, 1)
    base = 1000 * torch.arange(L).view(L, 1, 1, 1, 1) + 100 * torch.arange(B).view(1, B, 1, 1, 1)
    cache = (base + 10 * torch.arange(H).view(1, 1, H, 1, 1) + pos).expand(L, B, H, T, D).double()
    index = torch.tensor([[5, 0], [2, 2], [1, 4]])
    K, _ = gather_kv(list(cache.unbind(0)), list(cache.unbind(0)), index)
    for layer in range(L):
        for b in range(B):
            for h in range(H):
                for m in range(2):
                    assert torch.all(K[layer, b, h, m] == 1000 * layer + 100 * b + 10 * h + index[b, m])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.complex64, torch.complex128])
def test_other_dtypes_bit_exact(dtype):
    keys, values = _cache(2, 2, 2, 5, 3, dtype, layout="mixed", seed=8), _cache(2, 2, 2, 5, 3, dtype, seed=9)
    if dtype.is_complex:
        keys = [k + 1j for k in keys]
    _check(keys, values, torch.tensor([[4, 0], [2, 2]]))


@needs_ext
def test_nan_payloads_are_copied_bit_exactly():
    k = torch.tensor([0x7FC1, -1, 0x7E01, 0x3C00], dtype=torch.int16).view(torch.float16).view(1, 1, 4, 1)
    K, _ = gather_kv([k], [k], torch.tensor([[3, 2, 1, 0]]))
    assert torch.equal(K.view(torch.int16).flatten(), torch.tensor([0x3C00, 0x7E01, -1, 0x7FC1], dtype=torch.int16))


@needs_ext
def test_empty_shapes():
    keys, values = _cache(2, 2, 3, 4, 5), _cache(2, 2, 3, 4, 5)
    K, V = gather_kv(keys, values, torch.empty(2, 0, dtype=torch.long))
    assert K.shape == V.shape == (2, 2, 3, 0, 5)
    K, V = gather_kv(_cache(1, 0, 3, 4, 5), _cache(1, 0, 3, 4, 5), torch.empty(0, 2, dtype=torch.long))
    assert K.shape == (1, 0, 3, 2, 5)
    K, _ = gather_kv(_cache(1, 2, 3, 4, 0), _cache(1, 2, 3, 4, 0), torch.zeros(2, 2, dtype=torch.long))
    assert K.shape == (1, 2, 3, 2, 0)


@needs_ext
def test_autograd_matches_reference():
    keys = [t.requires_grad_() for t in _cache(3, 2, 2, 7, 4, torch.float64, layout="mixed", seed=10)]
    values = [t.detach().clone().requires_grad_() for t in _cache(3, 2, 2, 7, 4, torch.float64, seed=11)]
    index = torch.tensor([[6, 0, 6], [2, 3, 2]])  # repeats: gradients add up
    w = torch.randn(3, 2, 2, 3, 4, dtype=torch.float64)

    K, V = gather_kv(keys, values, index)
    ours = torch.autograd.grad((K * w).sum() + (V * V).sum(), keys + values)
    rk, rv = gather_kv_reference(keys, values, index)
    want = torch.autograd.grad((rk * w).sum() + (rv * rv).sum(), keys + values)
    # bit-exact: a gradient element sums at most two copies (each index repeats once), and a + b == b + a
    for a, b in zip(ours, want):
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    samples = [
        (_cache(2, 2, 3, 9, 4, layout="mixed"), _cache(2, 2, 3, 9, 4, seed=1), torch.tensor([[8, 0, 1], [3, 3, 4]])),
        (_cache(1, 1, 1, 5, 3, torch.bfloat16), _cache(1, 1, 1, 5, 3, torch.bfloat16), torch.tensor([[4]])),
    ]
    for keys, values, index in samples:
        if requires_grad:
            keys = [k.detach().requires_grad_() for k in keys]
        torch.library.opcheck(torch.ops.fastattn_icl.gather_kv.default, (keys, values, index))


@needs_ext
def test_torch_compile_fullgraph():
    keys, values = _cache(2, 2, 2, 9, 4), _cache(2, 2, 2, 9, 4, seed=1)

    def f(keys, values, index):
        K, V = gather_kv(keys, values, index)
        return K * 2 + V

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    index = torch.tensor([[1, 8, 2], [0, 0, 5]])
    rk, rv = gather_kv_reference(keys, values, index)
    assert torch.equal(compiled(keys, values, index), rk * 2 + rv)


# --- bad inputs ------------------------------------------------------------------------------------


def _good():
    return _cache(2, 2, 3, 6, 4), _cache(2, 2, 3, 6, 4, seed=1), torch.tensor([[0, 5], [1, 2]])


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda k, v, i: ([], [], i), ValueError, "keys is empty"),
        (lambda k, v, i: (k, v[:1], i), ValueError, "2 key tensors but 1 value"),
        (lambda k, v, i: (k[0], v, i), TypeError, "keys must be a list"),
        (lambda k, v, i: (k, [v[0], "x"], i), TypeError, r"values\[1\] must be a tensor"),
        (lambda k, v, i: ([k[0], k[1][:, :, :5]], v, i), ValueError, r"keys\[1\] has shape \(2, 3, 5, 4\)"),
        (lambda k, v, i: (k, [v[0], v[1][0]], i), ValueError, r"values\[1\] must be \[B, Hkv, T, D\]"),
        (lambda k, v, i: (k, [v[0], v[1].half()], i), TypeError, r"values\[1\] has dtype torch.float16"),
        (lambda k, v, i: (k, v, i.int()), TypeError, "index must be int64"),
        (lambda k, v, i: (k, v, i.float()), TypeError, "index must be int64"),
        (lambda k, v, i: (k, v, i[:1]), ValueError, r"index must be \[B, M\] = \[2, M\]"),
        (lambda k, v, i: (k, v, i[None]), ValueError, r"index must be \[B, M\]"),
        (lambda k, v, i: (k, v, i.tolist()), TypeError, "index must be an int64 tensor"),
        (lambda k, v, i: (k, v, i.to("meta")), ValueError, "index is on meta but keys are on cpu"),
        (lambda k, v, i: (k, [v[0], v[1].to("meta")], i), ValueError, r"values\[1\] is on meta"),
        (lambda k, v, i: (k, v, torch.tensor([[0, 6], [1, 2]])), ValueError, r"index\[0, 1\] = 6 is out of range"),
        (lambda k, v, i: (k, v, torch.tensor([[0, 1], [-1, 2]])), ValueError, r"index\[1, 0\] = -1 .*\[0, 6\)"),
        (lambda k, v, i: (k, v, torch.tensor([0, 99])), ValueError, r"index\[1\] = 99 is out of range"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, exc, match):
    with pytest.raises(exc, match=match):
        gather_kv(*mutate(*_good()))


@needs_ext
def test_the_op_itself_checks_inputs():
    keys, values, _ = _good()
    op = torch.ops.fastattn_icl.gather_kv
    with pytest.raises(IndexError, match=r"index\[1, 0\] = 6 is out of range.*\[0, 6\)"):
        op(keys, values, torch.tensor([[0, 1], [6, 0]]))
    with pytest.raises(IndexError, match="out of range"):
        gather_kv(keys, values, torch.tensor([[0, -3], [0, 0]]), check_index=False)
    with pytest.raises(RuntimeError, match="keys is an empty list"):
        op([], [], torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"values\[1\] has shape \[2, 3, 5, 4\] but keys\[0\] has shape"):
        op(keys, [values[0], values[1][:, :, :5]], torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="index must be int64"):
        op(keys, values, torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"index must be \[B, M\] = \[2, M\]"):
        op(keys, values, torch.zeros(3, dtype=torch.long))


# --- missing backends: a clear error, never a silent fallback ---------------------------------------


def test_missing_extension_raises_with_build_command(monkeypatch):
    monkeypatch.setitem(_ext._state, "tried", True)
    monkeypatch.setitem(_ext._state, "module", None)
    monkeypatch.setitem(_ext._state, "error", "ImportError: simulated")
    assert not _ext.available() and not _ext.has_cuda_kernels()
    with pytest.raises(RuntimeError, match=r"fastattn_icl\._C.*simulated.*pip install --no-build-isolation -e \."):
        gather_kv(*_good())


@needs_ext
def test_missing_cuda_kernels_raise_with_rebuild_hint(monkeypatch):
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: False)
    hint = r"built without CUDA kernels.*CUDA toolkit \(CUDA_HOME.*CUDA build of torch"
    with pytest.raises(RuntimeError, match=hint):
        _ext.require("gather_kv", "cuda")
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels.*CUDA_HOME"):
        _ext.require("gather_kv", torch.device("cuda", 1))
    _ext.require("gather_kv", "cpu")
    _ext.require("gather_kv", "meta")  # the fake kernel
    keys, values, index = _good()
    K, V = gather_kv([k.to("meta") for k in keys], [v.to("meta") for v in values], index.to("meta"))
    assert K.shape == V.shape == (2, 2, 3, 2, 4) and K.device.type == "meta"


@needs_ext
def test_stale_build_and_unknown_device_raise():
    with pytest.raises(RuntimeError, match=r"no op fastattn_icl::no_such_op.*older sources.*pip install"):
        _ext.require("no_such_op", "cpu")
    with pytest.raises(RuntimeError, match=r"no kernel for device mps.*it has: cpu"):
        _ext.require("gather_kv", "mps")


def test_build_flag_matches_dispatcher():
    if not _ext.available():
        pytest.skip(f"fastattn_icl._C is not built: {_ext.load_error()}")
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("fastattn_icl::gather_kv", "CUDA")
    assert _ext.has_cuda_kernels() == has_cuda_kernel
    if torch.version.cuda is None:
        assert not _ext.has_cuda_kernels()


# --- subprocesses: import without the extension, and both registration orders ------------------------


def _run(parts: list[str], *args: str) -> str:
    """Run the code fragments (each dedented on its own) in a fresh interpreter; its stdout."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = "\n".join(textwrap.dedent(part) for part in parts)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


_NO_CUDA_INIT = """
    import torch
    def _no_cuda(*a, **k):
        raise AssertionError("CUDA was initialised")
    torch.cuda._lazy_init = _no_cuda
    torch.cuda.init = _no_cuda
"""


def test_import_without_extension_or_triton_touches_no_cuda():
    out = _run(
        [
            """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):  # a broken build: importing it fails
            def find_spec(self, name, path, target=None):
                if name == "fastattn_icl._C":
                    raise ImportError(f"blocked {name}")
                return None

        sys.meta_path.insert(0, Block())
        sys.modules["triton"] = None  # not installed: import fails, importlib.util.find_spec is None
        """,
            _NO_CUDA_INIT,
            """
        import fastattn_icl
        import fastattn_icl.ops.gather as g
        from fastattn_icl import _ext
        assert "fastattn_icl._C" not in sys.modules and sys.modules["triton"] is None
        assert not _ext.available() and not _ext.has_cuda_kernels() and not g._registered
        assert "blocked fastattn_icl._C" in _ext.load_error(), _ext.load_error()
        k = torch.zeros(1, 1, 3, 2)
        try:
            g.gather_kv([k], [k], torch.zeros(1, 1, dtype=torch.long))
        except RuntimeError as e:
            assert "pip install --no-build-isolation" in str(e), e
        else:
            raise AssertionError("gather_kv ran without the extension")
        assert not torch.cuda.is_initialized()
        print("ok")
        """,
        ]
    )
    assert out.strip() == "ok"


@needs_ext
def test_import_with_extension_touches_no_cuda():
    out = _run(
        [
            _NO_CUDA_INIT,
            """
        import fastattn_icl, fastattn_icl.ops.gather
        from fastattn_icl import _ext
        assert _ext.available() and fastattn_icl.ops.gather._registered
        _ext.has_cuda_kernels()
        assert not torch.cuda.is_initialized()
        print("ok")
        """,
        ]
    )
    assert out.strip() == "ok"


_USE_BOTH = """
    from fastattn_icl.ops.attention import attention
    from fastattn_icl.ops.gather import gather_kv
    k = torch.randn(1, 2, 5, 8)
    K, V = gather_kv([k], [k], torch.tensor([[4, 1]]))
    assert torch.equal(K[0], k[:, :, [4, 1]])
    q = torch.randn(1, 2, 3, 8)
    out = attention(q, k, k, backend="torch")
    assert out.shape == q.shape
    km = k.to("meta")  # the fake kernel registered from Python serves the C++ op's Meta key
    Km, _ = torch.ops.fastattn_icl.gather_kv([km, km], [km, km], torch.zeros(1, 3, dtype=torch.long, device="meta"))
    assert Km.shape == (2, 1, 2, 3, 8) and Km.device.type == "meta"
    print("ok")
"""


@needs_ext
def test_cpp_library_first_then_python_ops():
    # The C++ TORCH_LIBRARY block registers before any Python custom_op of the namespace exists.
    out = _run(
        [
            """
        import sys, torch
        torch.ops.load_library(sys.argv[1])
        assert "fastattn_icl" not in sys.modules
        torch._C._dispatch_find_schema_or_throw("fastattn_icl::gather_kv", "")
        try:
            torch._C._dispatch_find_schema_or_throw("fastattn_icl::attention_fwd", "")
        except RuntimeError:
            pass
        else:
            raise AssertionError("the Python ops were registered first")
        import fastattn_icl
        """,
            _USE_BOTH,
        ],
        _ext.load().__file__,
    )
    assert out.strip() == "ok"


@needs_ext
def test_python_ops_first_then_cpp_library():
    out = _run(
        [
            """
        import sys, torch
        import fastattn_icl.ops.attention
        assert "fastattn_icl._C" not in sys.modules
        torch._C._dispatch_find_schema_or_throw("fastattn_icl::attention_fwd", "")
        try:
            torch._C._dispatch_find_schema_or_throw("fastattn_icl::gather_kv", "")
        except RuntimeError:
            pass
        else:
            raise AssertionError("the C++ library was registered first")
        import fastattn_icl._C
        """,
            _USE_BOTH,
        ]
    )
    assert out.strip() == "ok"


# --- CUDA ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8])
@pytest.mark.parametrize(
    "L,B,H,T,D,M,layout",
    [
        (3, 2, 4, 33, 128, 9, "contiguous"),  # 16-byte vectors
        (2, 3, 2, 17, 64, 5, "bthd"),  # HF-like [B, T, H, D] view, still vectorised
        (2, 2, 3, 13, 7, 1, "contiguous"),  # odd D: narrow units
        (4, 2, 2, 19, 8, 6, "sliced"),  # base pointers off by one element: narrower vectors
        (4, 2, 2, 19, 6, 6, "d_major"),  # element-wise strided path
        (5, 2, 2, 23, 16, 30, "mixed"),  # every layout in one launch
        (80, 1, 8, 64, 128, 24, "contiguous"),  # many layers: the descriptor table
        (1, 1, 1, 1, 1, 1, "contiguous"),
    ],
)
def test_cuda_kernel_matches_reference(dtype, L, B, H, T, D, M, layout):
    _ext.require("gather_kv", "cuda")  # a GPU build without CUDA kernels fails here, with the fix
    keys = _cache(L, B, H, T, D, dtype, "cuda", layout, seed=1)
    values = _cache(L, B, H, T, D, dtype, "cuda", layout, seed=2)
    index = torch.randint(0, T, (B, M), generator=torch.Generator().manual_seed(3)).cuda()
    _check(keys, values, index)
    _check(keys, values, index[0])  # [M] index: stride-0 rows


@pytest.mark.gpu
def test_cuda_kernel_other_device_stream_autograd_and_errors():
    _ext.require("gather_kv", "cuda")
    keys = [t.requires_grad_() for t in _cache(2, 2, 2, 9, 16, torch.float32, "cuda", "mixed")]
    values = _cache(2, 2, 2, 9, 16, torch.float32, "cuda", seed=1)
    index = torch.tensor([[8, 0, 8], [3, 4, 5]], device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        K, V = gather_kv(keys, values, index)
        (K * K).sum().backward()
    stream.synchronize()
    rk, rv = gather_kv_reference(keys, values, index)
    assert torch.equal(K, rk) and torch.equal(V, rv)
    want = torch.autograd.grad((rk * rk).sum(), keys)
    for k, w in zip(keys, want):  # bit-exact: at most two copies add up per element, in either order the same
        assert torch.equal(k.grad, w)
    torch.library.opcheck(torch.ops.fastattn_icl.gather_kv.default, (keys, values, index))
    with pytest.raises(ValueError, match="out of range"):
        gather_kv(keys, values, torch.tensor([[9, 0, 0], [0, 0, 0]], device="cuda"))
    with pytest.raises(ValueError, match="index is on cpu"):
        gather_kv(keys, values, index.cpu())
    if torch.cuda.device_count() > 1:
        keys1, values1 = [k.detach().to("cuda:1") for k in keys], [v.to("cuda:1") for v in values]
        K1, _ = gather_kv(keys1, values1, index.to("cuda:1"))
        assert K1.device == torch.device("cuda:1") and torch.equal(K1.cpu(), rk.detach().cpu())
