"""Flash attention forward and backward in Triton: the one kernel family every ICL method extends.

Math (per batch ``b``, query head ``h``, kv head ``h // N_REP``)::

    S = scale · Q Kᵀ            masked to -inf where not visible
    P = softmax(S)              lse = logsumexp(S) per row (natural log, saved for the backward)
    O = P V

Visibility: bottom-right causal (row ``i`` sees key ``j`` iff ``j <= i + Tk - Tq``) when
``IS_CAUSAL``, and the key-padding mask ``[B, Tk]`` (nonzero = keep) when ``HAS_PADDING``. A row that
sees no key returns 0 and ``lse = -inf``; no NaN is ever produced.

Method flags (both off = plain attention, same code path):

- ``HAS_ANCHORS`` (docs/methods.md §2): per-key log-weights ``logw [B, H, Tk]`` (β of the anchor's class at anchor
  keys, 0 elsewhere) and the first re-weighted query row ``[B]``. On re-weighted rows
  ``P̂ = W ∘ P`` with ``W = exp(logw)``: the numerator only, the softmax denominator stays unweighted.
- ``HAS_ISOLATION`` (docs/methods.md §3): a per-row column limit ``[B, Tq]``; keys ``j < limit`` get the logit
  ``-1e4`` (overwritten, after scaling and masking; a masked key stays masked).

Constraints: fp16, bf16 or fp32 inputs (fp32 accumulation always; fp32 dots use tf32x3 on a GPU, three
tf32 passes with close to fp32 accuracy, never plain tf32); head dim 8..256, padded to a power of two
``BLOCK_D`` with masked loads; any sequence lengths; arbitrary strides on every tensor (row offsets are
taken in int64). Grids are flat (``blocks x batch x heads`` on axis 0), so batch x heads is not capped
at 65535, and causal programs start with the query blocks that see the most keys.

Feature flags are ``tl.constexpr`` so a flag that is off compiles away: ``IS_CAUSAL``, ``HAS_PADDING``,
``HAS_ANCHORS``, ``HAS_ISOLATION``, ``HAS_PREFIX``, ``HAS_MOMENTUM``. Within a kernel, a block of keys (or
rows) is masked only where it needs it: ``MASK_BOUNDS`` (the block may reach past the sequence end) and
``MASK_CAUSAL`` (the block straddles the causal diagonal).

Modules: :mod:`.primitives` (what the kernels and launchers share), :mod:`.forward` (``O``, ``lse``; the shared
prefix and the momentum epilogue), :mod:`.backward` (``dQ``, ``dK``, ``dV``, ``d logw``), :mod:`.saliency` (the
saliency reduction of the backward), :mod:`.tuning` (flag sets, block configs, shared-memory prune, launch).

Caveat: under ``TRITON_INTERPRET=1`` a ``tl.dot`` on bf16 operands is wrong (triton 3.9), so bf16 is
only exercised on a GPU.
"""

from .backward import attention_bwd
from .forward import attention_fwd, momentum_attention_fwd
from .saliency import attention_saliency
from .tuning import FLAG_SETS, TUNED_KINDS, SharedMemoryError, device_smem_limit, prune_configs, smem_bytes

__all__ = [
    "FLAG_SETS",
    "TUNED_KINDS",
    "SharedMemoryError",
    "attention_bwd",
    "attention_fwd",
    "attention_saliency",
    "device_smem_limit",
    "momentum_attention_fwd",
    "prune_configs",
    "smem_bytes",
]
