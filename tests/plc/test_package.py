"""linewatch_plc stands alone: it installs on a box without linewatch, numpy or torch, and imports only the
standard library, pyzmq and (in their own modules) the protocol libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "plc" / "linewatch_plc"
ALLOWED = {"zmq": None, "asyncua": "opcua.py", "pymodbus": "modbus.py"}  # library -> the one module using it


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return found | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}


def test_each_module_imports_the_standard_library_pyzmq_itself_and_its_own_protocol_library_only() -> None:
    bad = []
    for path in sorted(PACKAGE.glob("*.py")):
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "linewatch_plc":
                continue
            if top not in ALLOWED or ALLOWED[top] not in (None, path.name):
                bad.append(f"{path.name} imports {module}")
    assert bad == []


def test_the_gateways_import_with_numpy_and_torch_unimportable() -> None:
    script = (
        "import sys\n"
        "for name in ('numpy', 'torch', 'cv2', 'pipeline', 'edge', 'calibration'):\n"
        "    sys.modules[name] = None\n"
        "import linewatch_plc.cli, linewatch_plc.opcua, linewatch_plc.modbus\n"
        "linewatch_plc.cli.build_parser().parse_args(['modbus', '--camera', 'top'])\n"
        "print('imported')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO / "plc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "imported"


def test_the_wheel_built_from_plc_holds_only_linewatch_plc_and_needs_no_numpy_or_torch(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "./plc"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("linewatch_plc-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"linewatch_plc"}
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any("pyzmq" in r for r in requires) and not any(x in r for r in requires for x in ("numpy", "torch"))

    env = tmp_path / "bare"  # a PLC box's interpreter: nothing but this wheel
    venv.create(env, with_pip=True)
    python = str(env / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    assert installed.returncode == 0
    script = (
        "from linewatch_plc.wire import ReplayRequest, Verdict, decode, decode_replay_reply, encode\n"
        "from linewatch_plc.wire import encode_replay_reply, reply_holes\n"
        "v = Verdict('cam0', 7, 1, 2, 3.5, 1.0, 'reject', None)\n"
        "body = decode(encode('run', 1, 1, v, 'hash'))\n"
        "assert body['verdict'] == 'reject' and body['frame_id'] == 7 and body['bundle'] == 'hash', body\n"
        "ask = ReplayRequest.decode(ReplayRequest('run', 1, 1).encode())\n"
        "header, got = decode_replay_reply(encode_replay_reply(ask, [encode('run', 1, 1, v, 'hash')]))\n"
        "assert got == [body] and header['to_seq'] == 1 and reply_holes(header, got) == [], (header, got)\n"
        "import linewatch_plc.users as u\n"
        "assert u.verify_password('s3cret', u.hash_password('s3cret', 1000))\n"
        "try:\n    import numpy\nexcept ImportError:\n    print('numpy absent')\n"
    )
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "numpy absent"  # the venv really lacks it


@pytest.mark.parametrize("option", ["--address", "--replay-address"])
@pytest.mark.parametrize("command", ["log", "modbus"])
def test_an_address_zeromq_cannot_use_is_refused_in_one_line(command: str, option: str) -> None:
    args = [command, option, "tcp://nowhere", "--duration", "5"] + (["--port", "0"] if command == "modbus" else [])
    done = subprocess.run(
        [sys.executable, "-m", "linewatch_plc.cli", *args], capture_output=True, text=True, cwd=REPO / "plc", timeout=60
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith(f"linewatch-plc: {option} 'tcp://nowhere': not a ZeroMQ")
