"""One backend dispatch for every op, and an ``ops`` package whose modules import each other without a cycle."""

from __future__ import annotations

import ast
import pathlib

import pytest

import fastattn_icl.ops
from fastattn_icl.ops import _torch_backend
from fastattn_icl.ops.backend import _TORCH_ONLY, _TRITON_MODULE, kernel

OPS = pathlib.Path(fastattn_icl.ops.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    """The ``fastattn_icl.ops`` modules that ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastattn_icl.ops"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(n for n in names if (OPS / f"{n.rsplit('.', 1)[-1]}.py").exists() and n.count(".") == 2)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fastattn_icl.ops."))
    return found


def test_ops_modules_import_each_other_without_a_cycle():
    graph = {f"fastattn_icl.ops.{p.stem}": _imports(p) - {f"fastattn_icl.ops.{p.stem}"} for p in OPS.glob("*.py")}
    graph.pop("fastattn_icl.ops.__init__")
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            cycle = " -> ".join(path[path.index(module):] + (module,))
            raise AssertionError(f"import cycle in fastattn_icl.ops: {cycle}")
        if module in done:
            return
        for target in graph.get(module, ()):
            visit(target, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())
    assert "fastattn_icl.ops.attention" in graph["fastattn_icl.ops.momentum"]  # the walk sees real imports


@pytest.mark.parametrize("name", sorted(_TRITON_MODULE))
def test_every_kernel_exists_in_both_backends(name):
    assert kernel("torch", name) is getattr(_torch_backend, name)
    assert callable(kernel("triton", name))


@pytest.mark.parametrize("name", sorted(_TORCH_ONLY))
def test_torch_only_fusions_are_none_on_triton(name):
    assert kernel("torch", name) is getattr(_torch_backend, name)
    assert kernel("triton", name) is None
    assert name not in _TRITON_MODULE


def test_kernel_refuses_unknown_names_and_unresolved_backends():
    with pytest.raises(ValueError, match="no kernel named 'attention_fwdx'"):
        kernel("torch", "attention_fwdx")
    with pytest.raises(ValueError, match="resolved to 'triton' or 'torch' first, got 'auto'"):
        kernel("auto", "attention_fwd")
