"""The OPC UA gateway with Basic256Sha256, a trusted-clients folder and logins: only a trusted client
certificate with a known user name and password gets a session. Real asyncua clients on loopback against the
gateway as a process."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID

from pipeline.app.ports import free_port

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "conveyor-7"


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    uri: str


def make_identity(folder: Path, name: str, server: bool) -> Identity:
    uri = f"urn:linewatch:test:{name}"
    use = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    cert, key = folder / f"{name}.der", folder / f"{name}.pem"
    asyncio.run(setup_self_signed_certificate(key, cert, uri, "localhost", use, {"commonName": name}))
    return Identity(cert, key, uri)


@dataclass(frozen=True)
class SecureGateway:
    endpoint: str
    server: Identity
    trusted: Identity
    stranger: Identity
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureGateway]:
    tmp = tmp_path_factory.mktemp("opcua_security")
    server, trusted, stranger = (make_identity(tmp, n, n == "server") for n in ("server", "trusted", "stranger"))
    (tmp / "clients").mkdir()
    shutil.copy(trusted.cert, tmp / "clients" / "trusted.der")
    env = {**os.environ, "PYTHONPATH": str(REPO / "plc")}
    cli = [sys.executable, "-m", "linewatch_plc.cli"]
    users = tmp / "users.txt"
    added = subprocess.run([*cli, "add-user", str(users), "alice"], input=f"{PASSWORD}\n", text=True, env=env)
    assert added.returncode == 0 and "alice:pbkdf2_sha256$" in users.read_text() and PASSWORD not in users.read_text()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/linewatch"
    args = ["opcua", "--endpoint", endpoint, "--address", f"tcp://127.0.0.1:{free_port()}", "--replay-address", ""]
    args += ["--certificate", str(server.cert), "--private-key", str(server.key)]
    args += ["--trusted-clients", str(tmp / "clients"), "--users", str(users), "--camera", "top"]
    with (tmp / "gateway.log").open("w") as log:
        proc = subprocess.Popen([*cli, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "OPC UA on" not in (tmp / "gateway.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "gateway.log").read_text()
            time.sleep(0.1)
        yield SecureGateway(endpoint, server, trusted, stranger, proc)
    finally:
        proc.terminate()
        proc.wait(10)


async def read_line(gw: SecureGateway, who: Identity | None, user: str | None, password: str | None) -> dict:
    client = Client(gw.endpoint, timeout=5)
    if who is not None:
        client.application_uri = who.uri
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            str(who.cert),
            str(who.key),
            server_certificate=str(gw.server.cert),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
    if user is not None:
        client.set_user(user)
        client.set_password(password or "")
    async with client:
        idx = await client.get_namespace_index("urn:linewatch:plc")
        line = await client.nodes.objects.get_child(f"{idx}:Linewatch")
        ok = await (await line.get_child(f"{idx}:LinewatchOk")).read_value()
        camera = await line.get_child([f"{idx}:Cameras", f"{idx}:top", f"{idx}:Verdict"])
        return {"LinewatchOk": ok, "top": await camera.read_value()}


def test_a_trusted_client_with_a_known_login_reads_the_line(gateway: SecureGateway) -> None:
    got = asyncio.run(read_line(gateway, gateway.trusted, "alice", PASSWORD))
    assert got == {"LinewatchOk": False, "top": ""}  # nothing heard from linewatch: not OK


@pytest.mark.parametrize(
    "who, user, password, refusal",
    [
        ("none", None, None, "No matching endpoints"),  # the endpoint offers Basic256Sha256 only
        ("trusted", None, None, "BadIdentityTokenRejected"),
        ("trusted", "alice", "wrong", "BadUserAccessDenied"),
        ("trusted", "mallory", PASSWORD, "BadUserAccessDenied"),
        ("stranger", "alice", PASSWORD, "BadCertificateUntrusted"),
    ],
    ids=["no-security", "anonymous", "wrong-password", "unknown-user", "untrusted-certificate"],
)
def test_anything_less_gets_no_session(
    gateway: SecureGateway, who: str, user: str | None, password: str | None, refusal: str
) -> None:
    identity = {"none": None, "trusted": gateway.trusted, "stranger": gateway.stranger}[who]
    with pytest.raises(ua.UaError, match=refusal):
        asyncio.run(read_line(gateway, identity, user, password))
    assert gateway.process.poll() is None  # refused, and still serving
    assert asyncio.run(read_line(gateway, gateway.trusted, "alice", PASSWORD))["LinewatchOk"] is False


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--users", "users.txt"], "--users and --trusted-clients need --certificate"),
        (["--trusted-clients", "clients"], "--users and --trusted-clients need --certificate"),
        (["--certificate", "server.der"], "--certificate and --private-key go together"),
    ],
)
def test_an_endpoint_that_would_send_passwords_in_clear_is_refused_at_start(args: list[str], expected: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "plc")}
    done = subprocess.run(
        [sys.executable, "-m", "linewatch_plc.cli", "opcua", *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2 and expected in done.stderr.strip().splitlines()[-1]


def test_a_users_file_with_a_malformed_line_is_refused_naming_the_line(tmp_path: Path) -> None:
    from linewatch_plc.users import add_user, load_users, verify_password

    users = tmp_path / "users.txt"
    add_user(users, "alice", PASSWORD)
    assert users.stat().st_mode & 0o777 == 0o600
    (stored,) = load_users(users).values()
    assert verify_password(PASSWORD, stored) and not verify_password("nope", stored)
    assert not verify_password(PASSWORD, "pbkdf2_sha256$1000$zz$" + "0" * 64)  # not a hash: no login, no crash
    users.write_text(users.read_text() + "bob:pbkdf2_sha256$1000$nothex$" + "0" * 64 + "\n")
    with pytest.raises(ValueError, match=rf"^{users}:2: expected NAME:pbkdf2_sha256"):
        load_users(users)
