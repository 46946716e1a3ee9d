"""fastattn_icl: fused attention kernels for in-context-learning research in Hugging Face models.

Importing the package needs neither a GPU, nor Triton, nor the compiled extension, and touches no
CUDA state. It registers the ``"fastattn_icl"`` attention implementation with transformers when
transformers is installed.
"""

from fastattn_icl import integrations  # noqa: F401  (registers "fastattn_icl" with transformers, lazily)
from fastattn_icl.ops import (
    Saliency,
    anchor_reweight_attention,
    attention,
    attention_with_lse,
    momentum_attention,
    shared_prefix_attention,
    use_backend,
)

__version__ = "0.1.0"
__all__ = [
    "Saliency",
    "anchor_reweight_attention",
    "attention",
    "attention_with_lse",
    "momentum_attention",
    "shared_prefix_attention",
    "use_backend",
    "__version__",
]
