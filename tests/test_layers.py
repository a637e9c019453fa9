"""The layers import downward only: edge <- calibration <- pipeline (runtime) <- pipeline.app (shell).

Every import statement of every module is read, function-level ones included (a lazy import is still a
dependency). A lower layer importing a higher one fails with the file, the line and the import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("edge", "calibration", "pipeline", "pipeline.app")  # lowest first


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the innermost layer `module` belongs to; None for other packages."""
    found = None
    for i, name in enumerate(LAYERS):
        if module == name or module.startswith(name + "."):
            found = i
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def upward_imports(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        own = layer_of(module_name(path))
        for line, imported in imports_of(path):
            target = layer_of(imported)
            if own is not None and target is not None and target > own:
                bad.append(f"{path.relative_to(REPO)}:{line}: {LAYERS[own]} imports {imported} ({LAYERS[target]})")
    return bad


def test_layer_of_reads_the_innermost_layer() -> None:
    assert [layer_of(m) for m in ("edge.bundle", "calibration", "pipeline.ring", "pipeline.app.cli", "numpy")] == [
        0,
        1,
        2,
        3,
        None,
    ]
    assert layer_of("pipeline.application") == 2  # a sibling module, not the shell


@pytest.mark.parametrize("package", ["edge", "calibration", "pipeline"])
def test_no_module_imports_a_higher_layer(package: str) -> None:
    assert upward_imports(REPO / package) == []


def test_an_upward_import_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "edge"
    fake.mkdir()
    (fake / "scoring.py").write_text("import torch\n\n\ndef f():\n    from calibration.fit import fit\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert upward_imports(fake) == ["edge/scoring.py:5: edge imports calibration.fit (calibration)"]
