"""``import fastattn_icl`` needs neither Triton nor the compiled extension, imports neither, leaves CUDA
uninitialised, and still makes ``attn_implementation="fastattn_icl"`` available to transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = ("triton", "fastattn_icl._C", "fastattn_icl._triton")

# "absent": as if not installed (a None entry in sys.modules makes `import x` raise ImportError and
# `importlib.util.find_spec("x")` return None). "broken": found, but importing it fails (a sys.meta_path
# hook whose loader raises, as a Triton or extension built for another CUDA or torch would).
_BLOCKERS = {
    "absent": f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
""",
    "broken": f"""
import importlib.abc, importlib.machinery, sys

class _Broken(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(f"{{spec.name}} is broken (blocked by the test)")

    def exec_module(self, module):
        pass

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            return importlib.machinery.ModuleSpec(name, _Broken())
        return None

sys.meta_path.insert(0, _Block())
""",
}


def _run(body: str, blocker: str | None = None) -> dict:
    code = (_BLOCKERS[blocker] if blocker else "") + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTATTN_ICL_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_imports_neither_triton_nor_transformers_modeling_code():
    result = _run(
        """
        import json
        import sys
        import torch
        import fastattn_icl

        print(json.dumps({
            "triton": "triton" in sys.modules,
            "transformers": "transformers.modeling_utils" in sys.modules,
            "cuda": torch.cuda.is_initialized(),
        }))
        """
    )
    assert result == {"triton": False, "transformers": False, "cuda": False}


@pytest.mark.parametrize("blocker", list(_BLOCKERS))
def test_import_without_triton_and_extension_registers_with_transformers(blocker):
    result = _run(
        """
        import json
        import torch
        import fastattn_icl

        from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
        from transformers.masking_utils import AttentionMaskInterface

        config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="fastattn_icl")
        logits = model(torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[0, 1, 1]])).logits

        print(json.dumps({
            "attention": "fastattn_icl" in AttentionInterface._global_mapping,
            "mask": "fastattn_icl" in AttentionMaskInterface._global_mapping,
            "finite": bool(logits.isfinite().all()),
            "cuda": torch.cuda.is_initialized(),
            "imported": sorted(n for n in ("triton", "fastattn_icl._C") if sys.modules.get(n) is not None),
        }))
        """,
        blocker,
    )
    assert result["attention"] and result["mask"]
    assert result["finite"], "a CPU forward through the seam needs neither Triton nor the extension"
    assert not result["cuda"]
    assert result["imported"] == []


def test_registration_when_transformers_was_imported_first():
    result = _run(
        """
        import json
        import torch
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        assert "fastattn_icl" not in AttentionInterface._global_mapping
        import fastattn_icl

        print(json.dumps({
            "attention": AttentionInterface._global_mapping.get("fastattn_icl").__name__,
            "mask": AttentionMaskInterface._global_mapping.get("fastattn_icl").__name__,
            "cuda": torch.cuda.is_initialized(),
        }))
        """
    )
    assert result == {
        "attention": "fastattn_icl_attention_forward",
        "mask": "fastattn_icl_mask",
        "cuda": False,
    }
