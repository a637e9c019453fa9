"""The layers import downward only: edge <- calibration <- pipeline (runtime) <- pipeline.app (shell).

Every import statement of every module is read, function-level ones included (a lazy import is still a
dependency). A lower layer importing a higher one fails with the file, the line and the import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import venv
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


def test_the_wire_format_imports_without_numpy_or_torch(tmp_path: Path) -> None:
    """A PLC bridge's interpreter: a fresh venv with nothing installed, the repository on its path."""
    env = tmp_path / "bare"
    venv.create(env, with_pip=False)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from pipeline.wire import ReplayRequest, Verdict, decode, decode_replay_reply, encode, encode_replay_reply\n"
        "from pipeline.wire import reply_holes\n"
        "v = Verdict('cam0', 7, 1, 2, 3.5, 1.0, 'reject', None)\n"
        "body = decode(encode('run', 1, 1, v, 'hash'))\n"
        "assert body['verdict'] == 'reject' and body['frame_id'] == 7 and body['bundle'] == 'hash', body\n"
        "ask = ReplayRequest.decode(ReplayRequest('run', 1, 1).encode())\n"
        "header, got = decode_replay_reply(encode_replay_reply(ask, [encode('run', 1, 1, v, 'hash')]))\n"
        "assert got == [body] and header['to_seq'] == 1, (header, got)\n"
        "assert reply_holes(header, got) == [], reply_holes(header, got)\n"
        "heavy = sorted({'numpy', 'torch', 'zmq', 'cv2'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "try:\n    import numpy\nexcept ImportError:\n    print('numpy absent')\n"
    )
    proc = subprocess.run([str(env / "bin" / "python"), "-c", script, str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "numpy absent"  # the venv really lacks it
