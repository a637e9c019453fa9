"""The OPC UA and Modbus gateways against a real line: `linewatch run` replaying a folder as a process group,
both gateways as processes started after the first rejects were published (so they must recover them from the
replay endpoint), and each protocol's own client on loopback. The line is then killed with SIGKILL and both
gateways must go fail-safe."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from pymodbus.client import ModbusTcpClient
from store_helpers import stored_messages

from linewatch_plc import modbus as mb
from pipeline.app.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CAMERA = "top"
PULSE_MS = 20.0
HEARTBEAT_MS = 100
FAILSAFE_AFTER = 4  # heartbeats


def gateway(command: str, config: dict[str, Any], log: Path, *args: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "linewatch_plc.cli", command, "--address", config["publisher"]["address"]]
    argv += ["--replay-address", config["publisher"]["replay_address"], "--failsafe-after", str(FAILSAFE_AFTER)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "plc"), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        return subprocess.Popen([*argv, *args], env=env, stdout=out, stderr=subprocess.STDOUT)


@dataclass
class ModbusWatch:
    """Polls the register map every ~2 ms in a thread: the seq of each pulse of the live and the late reject
    coil, and the last image read."""

    port: int
    pulsed: list[int] = field(default_factory=list)  # live reject pulses' seqs, in the order seen
    late: list[int] = field(default_factory=list)  # late (recovered) reject pulses' seqs
    last: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = ModbusTcpClient("127.0.0.1", port=self.port)
        base = mb.CAMERA_BASE
        coils = {
            mb.COIL_REJECT: (base + mb.CAM_PULSE_SEQ, self.pulsed),
            mb.COIL_LATE_REJECT: (base + mb.CAM_LATE_PULSE_SEQ, self.late),
        }
        was_on = dict.fromkeys(coils, False)
        while not self.stop.is_set():
            if not client.connected and not client.connect():
                time.sleep(0.05)
                continue
            reply = client.read_holding_registers(0, count=base + mb.CAMERA_STRIDE, device_id=1)
            if reply.isError():
                time.sleep(0.05)
                continue
            words = reply.registers
            failsafe = bool(words[0] >> mb.COIL_FAILSAFE & 1)
            for coil, (register, seen) in coils.items():
                on = bool(words[coil // 16] >> (coil % 16) & 1)
                if on and not was_on[coil] and not failsafe:  # in fail-safe the coil is held on for every part
                    seen.append(words[register] << 16 | words[register + 1])
                was_on[coil] = on
            self.last = words
            time.sleep(0.002)
        client.close()

    def coil(self, n: int) -> bool:
        return bool(self.last[n // 16] >> (n % 16) & 1)


@dataclass
class OpcUaWatch:
    """An asyncua client in a thread, subscribed to the reject events; reads nodes on request."""

    endpoint: str
    events: list[dict[str, Any]] = field(default_factory=list)  # live, as notified
    history: list[dict[str, Any]] = field(default_factory=list)  # read back with HistoryRead at the end
    stop: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    line: dict[str, Any] = field(default_factory=dict)
    camera: dict[str, Any] = field(default_factory=dict)
    failsafe_at: float | None = None  # when the client first read FailSafe true (monotonic s)

    def event_notification(self, event: Any) -> None:
        fields = event.get_event_props_as_fields_dict()
        self.events.append({k: v.Value for k, v in fields.items()})

    def run(self) -> None:
        asyncio.run(self.watch())

    async def watch(self) -> None:
        for _ in range(200):  # the gateway takes a moment to listen
            try:
                async with Client(self.endpoint) as client:
                    await self.follow(client)
                return
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)

    async def follow(self, client: Client) -> None:
        idx = await client.get_namespace_index("urn:linewatch:plc")
        line = await client.nodes.objects.get_child(f"{idx}:Linewatch")
        event_type = await client.nodes.root.get_child(
            ["0:Types", "0:EventTypes", "0:BaseEventType", f"{idx}:RejectEventType"]
        )
        subscription = await client.create_subscription(20, self)
        await subscription.subscribe_events(client.nodes.server, event_type, queuesize=10_000)
        self.subscribed.set()
        failsafe = await line.get_child(f"{idx}:FailSafe")
        while not self.stop.is_set():
            await asyncio.sleep(0.02)
            if self.failsafe_at is None and await failsafe.read_value():
                self.failsafe_at = time.monotonic()
        kept = await client.nodes.server.read_event_history(evtypes=event_type)
        self.history = [e.get_event_props_as_fields_dict() for e in kept]
        self.history = [{k: v.Value for k, v in fields.items()} for fields in self.history]
        self.line = await read_children(line)
        camera = await line.get_child([f"{idx}:Cameras", f"{idx}:{CAMERA}"])
        self.camera = await read_children(camera)


async def read_children(node: Any) -> dict[str, Any]:
    values = {}
    for child in await node.get_children(nodeclassmask=ua.NodeClass.Variable):
        values[(await child.read_browse_name()).Name] = await child.read_value()
    return values


@dataclass
class Scenario:
    wanted: list[int]  # seqs of the run's rejects and errors, from its store
    stored: list[dict[str, Any]]  # every stored message of the run
    modbus: ModbusWatch
    opcua: OpcUaWatch
    failsafe_after_kill_s: dict[str, float]
    logs: dict[str, str]


@pytest.fixture(scope="module")
def scenario(bundle_path: Path, small_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("gateways")
    config = {
        "pipeline": {
            "max_frame_height": 256,
            "max_frame_width": 256,
            "control_address": f"tcp://127.0.0.1:{free_port()}",
            "sources": [{"spec": f"folder:{small_category}", "id": CAMERA, "loop": True, "rate_ppm": 600}],
        },
        "publisher": {
            "address": f"tcp://127.0.0.1:{free_port()}",
            "replay_address": f"tcp://127.0.0.1:{free_port()}",
            "heartbeat_ms": HEARTBEAT_MS,
        },
        "metrics": {"port": 0},
        "ui": {"enabled": False},
        "store": {"path": str(tmp / "data")},
    }
    (tmp / "config.yaml").write_text(json.dumps(config))
    url = f"sqlite:///{tmp / 'data' / 'verdicts.sqlite'}"
    cmd = [sys.executable, "-m", "pipeline.app.cli", "run", "--bundle", str(bundle_path), "--config"]
    line = subprocess.Popen([*cmd, str(tmp / "config.yaml")], start_new_session=True, stderr=subprocess.DEVNULL)
    procs: list[subprocess.Popen[bytes]] = []
    modbus = ModbusWatch(free_port())
    opcua = OpcUaWatch(f"opc.tcp://127.0.0.1:{free_port()}/linewatch")
    threads = [threading.Thread(target=w.run, daemon=True) for w in (modbus, opcua)]
    try:
        run = wait_for_rejects(url, line, at_least=3)
        pulse = ["--pulse-ms", str(PULSE_MS), "--failsafe", "reject"]
        procs.append(
            gateway("modbus", config, tmp / "modbus.log", "--port", str(modbus.port), "--camera", CAMERA, *pulse)
        )
        procs.append(gateway("opcua", config, tmp / "opcua.log", "--endpoint", opcua.endpoint))
        for thread in threads:
            thread.start()
        assert opcua.subscribed.wait(60), (tmp / "opcua.log").read_text()
        time.sleep(6.0)  # live rejects, beside the recovered ones
        os.killpg(line.pid, signal.SIGKILL)
        killed = time.monotonic()
        line.wait(10)
        failsafe = {"modbus": wait_until(lambda: modbus.last and modbus.coil(mb.COIL_FAILSAFE)) - killed}
        failsafe["opcua"] = wait_until(lambda: opcua.failsafe_at is not None) - killed
        time.sleep(1.0)  # the last events reach the client
        opcua.stop.set()
        threads[1].join(30)
        modbus.stop.set()
        threads[0].join(10)
        stored = stored_messages(url, run)
        wanted = [m["seq"] for m in stored if m["verdict"] != "pass"]
        logs = {name: (tmp / f"{name}.log").read_text() for name in ("modbus", "opcua")}
        yield Scenario(wanted, stored, modbus, opcua, failsafe, logs)
    finally:
        for watch in (modbus, opcua):
            watch.stop.set()
        if line.poll() is None:
            os.killpg(line.pid, signal.SIGKILL)
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for_rejects(url: str, line: subprocess.Popen[bytes], at_least: int) -> str:
    """The run's id once its store holds `at_least` rejects (published before any gateway exists)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and line.poll() is None:
        try:
            runs = stored_runs(url)
        except Exception:  # noqa: BLE001 - the store is being created
            runs = {}
        for run, rejects in runs.items():
            if rejects >= at_least:
                return run
        time.sleep(0.2)
    raise AssertionError(f"the line published fewer than {at_least} rejects (exit {line.poll()})")


def stored_runs(url: str) -> dict[str, int]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text("SELECT run_id, verdict FROM verdicts")).all()
    finally:
        engine.dispose()
    counts: dict[str, int] = {}
    for run, verdict in rows:
        counts[run] = counts.get(run, 0) + (verdict != "pass")
    return counts


def wait_until(done: Any, timeout_s: float = 30.0) -> float:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.01)
    return time.monotonic()


def test_a_modbus_client_sees_one_pulse_per_reject_of_the_run_recovered_ones_on_the_late_coil(
    scenario: Scenario,
) -> None:
    watch, wanted = scenario.modbus, set(scenario.wanted)
    assert len(scenario.wanted) >= 8 and "(replayed)" in scenario.logs["modbus"]
    pulsed = watch.pulsed + watch.late
    assert sorted(set(pulsed) & wanted) == scenario.wanted  # every reject got its pulse ...
    assert len(pulsed) == len(set(pulsed))  # ... one, on one coil
    assert watch.late and watch.pulsed and max(watch.late) < max(watch.pulsed)  # the early ones came back late
    published_after_store = {s for s in pulsed if s > max(m["seq"] for m in scenario.stored)}
    assert set(pulsed) <= wanted | published_after_store
    words, base = watch.last, mb.CAMERA_BASE
    assert words[base + mb.CAM_REJECTS] << 16 | words[base + mb.CAM_REJECTS + 1] == len(watch.pulsed)
    assert words[base + mb.CAM_LATE_REJECTS] << 16 | words[base + mb.CAM_LATE_REJECTS + 1] == len(watch.late)


def test_modbus_goes_fail_safe_after_the_line_is_killed(scenario: Scenario) -> None:
    watch = scenario.modbus
    limit_s = FAILSAFE_AFTER * HEARTBEAT_MS / 1000 + 1.0
    assert scenario.failsafe_after_kill_s["modbus"] < limit_s
    assert not watch.coil(mb.COIL_OK) and watch.coil(mb.COIL_REJECT)  # --failsafe reject: the gate rejects all
    assert "FAIL-SAFE: no heartbeat from linewatch" in scenario.logs["modbus"]


def test_modbus_holds_the_last_verdict_and_the_line_counts_of_the_heartbeat(scenario: Scenario) -> None:
    words, base = scenario.modbus.last, mb.CAMERA_BASE
    last = max(scenario.stored, key=lambda m: m["seq"])
    seq = words[base + mb.CAM_SEQ] << 16 | words[base + mb.CAM_SEQ + 1]
    assert seq >= last["seq"]  # the newest verdict (one published but not stored before the kill may be newer)
    threshold = struct.unpack(">f", struct.pack(">HH", *words[base + mb.CAM_THRESHOLD : base + mb.CAM_THRESHOLD + 2]))
    assert threshold[0] == pytest.approx(last["threshold"], rel=1e-6)  # one bundle: one threshold all run
    if seq == last["seq"]:
        assert words[base + mb.CAM_VERDICT] == mb.VERDICT_CODES[last["verdict"]]
    counted = sum(words[a] << 16 | words[a + 1] for a in (mb.HR_PASSED, mb.HR_REJECTED, mb.HR_ERRORS))
    assert counted == words[mb.HR_SEQ] << 16 | words[mb.HR_SEQ + 1] >= len(scenario.stored) - 5


def test_an_opcua_client_gets_one_reject_event_per_reject_of_the_run(scenario: Scenario) -> None:
    """Events are not kept for a client that was not subscribed yet (the gateway recovers the early rejects
    before this client subscribes): it reads those with HistoryRead and merges by Seq."""
    events, history = scenario.opcua.events, scenario.opcua.history
    seqs, kept = [e["Seq"] for e in events], [e["Seq"] for e in history]
    assert len(seqs) == len(set(seqs)) and len(kept) == len(set(kept))  # one event per reject
    assert sorted(set(kept) & set(scenario.wanted)) == scenario.wanted  # the history holds every one
    assert set(seqs) <= set(kept) and seqs  # and live ones arrived too
    by_seq = {m["seq"]: m for m in scenario.stored}
    for event in events + history:
        stored = by_seq.get(event["Seq"])
        if stored is not None:
            assert (event["Camera"], event["Verdict"], event["Bundle"]) == (CAMERA, stored["verdict"], stored["bundle"])
            assert event["Score"] == pytest.approx(stored["score"]) and event["FrameId"] == stored["frame_id"]
    assert {(e["SourceName"], e["SourceNode"]) for e in events} == {("Linewatch", events[0]["SourceNode"])}
    replayed = [e for e in history if e["Replayed"]]
    assert replayed and all(e["Severity"] == 700 for e in replayed)


def test_opcua_goes_fail_safe_after_the_line_is_killed_and_keeps_the_last_values(scenario: Scenario) -> None:
    line, camera = scenario.opcua.line, scenario.opcua.camera
    assert scenario.failsafe_after_kill_s["opcua"] < FAILSAFE_AFTER * HEARTBEAT_MS / 1000 + 1.0
    assert line["FailSafe"] is True and line["LinewatchOk"] is False
    assert line["Passed"] + line["Rejected"] + line["Errors"] == line["Seq"] >= len(scenario.stored) - 5
    assert camera["Rejects"] == len(scenario.opcua.history) and camera["Seq"] >= max(scenario.wanted)
