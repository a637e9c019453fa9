"""Modbus TCP gateway (pymodbus): linewatch's verdicts as coils and holding registers a PLC polls.

Register map (one Modbus device, id `--device-id`; the PLC only reads: writes are refused with exception 1,
illegal function). Coil n is bit n % 16 (least significant first) of holding register n // 16, so holding
registers 0-15 also read the coils as words.

    coil 0          LINEWATCH_OK: heartbeats arrive in time (0 before the first one and in fail-safe)
    coil 1          HEARTBEAT_TOGGLE: flips with every heartbeat (a PLC watchdog checks that it moves)
    coil 2          FAIL_SAFE: no heartbeat for --failsafe-after intervals
    coil 3          DEGRADED: linewatch reports itself degraded (a camera lost, a stage not ready)
    coil 16 + k     REJECT of camera k: on for --pulse-ms per reject or error, then off for --pulse-ms before
                    the next one (each reject is its own rising edge); on all through fail-safe with
                    --failsafe reject

    Line, from linewatch's heartbeat (32-bit values take two registers, high word first):
    HR 16-17        last seq published in the run
    HR 18-19        parts passed in the run
    HR 20-21        parts rejected in the run
    HR 22-23        parts in error in the run (not scored: treat as rejects)
    HR 24           heartbeat interval, ms
    HR 25           runs seen by this gateway (counts up when linewatch restarts)

    Camera k, at base 32 + 16 k (k < 16; cameras in --camera order, or one block for all cameras):
    +0-1            seq of its last verdict
    +2-3            frame id of its last verdict
    +4-5            trigger / encoder value of its last part (0xFFFFFFFF: the source has none)
    +6              last verdict: 0 pass, 1 reject, 2 error
    +7              rejects waiting for their pulse
    +8-9            last score, IEEE 754 float32 (NaN: not scored)
    +10-11          threshold, float32 (reject when score > threshold)
    +12-13          seq of the reject whose pulse is on, or was last
    +14-15          rejects and errors of this camera since the gateway started
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from linewatch_plc.gateway import Beat, Event, FailSafe, Part

COIL_OK, COIL_TOGGLE, COIL_FAILSAFE, COIL_DEGRADED = 0, 1, 2, 3
COIL_REJECT = 16
HR_SEQ, HR_PASSED, HR_REJECTED, HR_ERRORS, HR_INTERVAL, HR_RUNS = 16, 18, 20, 22, 24, 25
CAMERA_BASE, CAMERA_STRIDE, MAX_CAMERAS = 32, 16, 16
CAM_SEQ, CAM_FRAME, CAM_TRIGGER, CAM_VERDICT, CAM_QUEUED = 0, 2, 4, 6, 7
CAM_SCORE, CAM_THRESHOLD, CAM_PULSE_SEQ, CAM_REJECTS = 8, 10, 12, 14
REGISTERS = CAMERA_BASE + CAMERA_STRIDE * MAX_CAMERAS
NO_TRIGGER = 0xFFFFFFFF
VERDICT_CODES = {"pass": 0, "reject": 1, "error": 2}
ILLEGAL_FUNCTION = 1  # Modbus exception code for a write to this read-only map


class RegisterImage:
    """The holding registers the PLC reads (coils are their bits), with typed writers."""

    def __init__(self) -> None:
        self.words = [0] * REGISTERS

    def coil(self, n: int) -> bool:
        return bool(self.words[n // 16] >> (n % 16) & 1)

    def set_coil(self, n: int, on: bool) -> None:
        bit = 1 << (n % 16)
        self.words[n // 16] = self.words[n // 16] | bit if on else self.words[n // 16] & ~bit

    def set_u16(self, address: int, value: int) -> None:
        self.words[address] = value & 0xFFFF

    def set_u32(self, address: int, value: int) -> None:
        value &= 0xFFFFFFFF
        self.words[address : address + 2] = [value >> 16, value & 0xFFFF]

    def set_f32(self, address: int, value: float) -> None:
        high, low = struct.unpack(">HH", struct.pack(">f", value))
        self.words[address : address + 2] = [high, low]

    def u32(self, address: int) -> int:
        return self.words[address] << 16 | self.words[address + 1]


@dataclass
class RejectOutput:
    """One camera's reject coil: rejects queue up, and each gets its own pulse."""

    coil: int
    base: int
    waiting: deque[int] = field(default_factory=deque)  # seqs of rejects not pulsed yet
    on_until: float = 0.0  # the pulse in progress ends then (monotonic s)
    free_at: float = 0.0  # the next pulse may start then
    rejects: int = 0


class ModbusView:
    """The line as the register map above; `apply` and `tick` run on the server's event loop."""

    def __init__(self, cameras: Sequence[str], pulse_s: float, failsafe: str) -> None:
        if len(cameras) > MAX_CAMERAS:
            raise ValueError(f"--camera: at most {MAX_CAMERAS} cameras have a register block, got {len(cameras)}")
        self.image = RegisterImage()
        self.pulse_s, self.failsafe_rejects = pulse_s, failsafe == "reject"
        names = list(cameras) or ["*"]  # "*": one block for every camera
        self.outputs = {
            name: RejectOutput(COIL_REJECT + k, CAMERA_BASE + CAMERA_STRIDE * k) for k, name in enumerate(names)
        }
        self.in_failsafe, self.run, self.runs = False, None, 0
        self.unknown: set[str] = set()

    def output_of(self, camera: str) -> RejectOutput | None:
        found = self.outputs.get(camera) or self.outputs.get("*")
        if found is None and camera not in self.unknown:
            self.unknown.add(camera)
            print(f"camera {camera} has no Modbus block (start the gateway with --camera {camera})", flush=True)
        return found

    async def apply(self, event: Event) -> None:
        if isinstance(event, Part):
            self._part(event.message)
        elif isinstance(event, Beat):
            self._heartbeat(event)
        elif isinstance(event, FailSafe):
            self._failsafe(event.active)

    def _part(self, message: dict[str, Any]) -> None:
        out = self.output_of(str(message["camera_id"]))
        if out is None:
            return
        img, base, score, trigger = self.image, out.base, message["score"], message["trigger"]
        img.set_u32(base + CAM_SEQ, int(message["seq"]))
        img.set_u32(base + CAM_FRAME, int(message["frame_id"]))
        img.set_u32(base + CAM_TRIGGER, NO_TRIGGER if trigger is None else int(trigger))
        img.set_u16(base + CAM_VERDICT, VERDICT_CODES[message["verdict"]])
        img.set_f32(base + CAM_SCORE, float("nan") if score is None else float(score))
        img.set_f32(base + CAM_THRESHOLD, float(message["threshold"]))
        if message["verdict"] != "pass":
            out.rejects += 1
            out.waiting.append(int(message["seq"]))
            img.set_u32(base + CAM_REJECTS, out.rejects)
            img.set_u16(base + CAM_QUEUED, len(out.waiting))

    def _heartbeat(self, beat: Beat) -> None:
        hb, img = beat.heartbeat, self.image
        if hb.run != self.run:
            self.run, self.runs = hb.run, self.runs + 1
        img.set_coil(COIL_OK, True)
        img.set_coil(COIL_TOGGLE, not img.coil(COIL_TOGGLE))
        img.set_coil(COIL_DEGRADED, hb.health != "ok")
        img.set_u32(HR_SEQ, hb.seq)
        for address, name in ((HR_PASSED, "pass"), (HR_REJECTED, "reject"), (HR_ERRORS, "error")):
            img.set_u32(address, hb.topic_seqs.get(name, 0))
        img.set_u16(HR_INTERVAL, round(hb.interval_ms))
        img.set_u16(HR_RUNS, self.runs)

    def _failsafe(self, active: bool) -> None:
        self.in_failsafe = active
        self.image.set_coil(COIL_FAILSAFE, active)
        if active:
            self.image.set_coil(COIL_OK, False)
        if self.failsafe_rejects:
            for out in self.outputs.values():
                self.image.set_coil(out.coil, active)

    async def tick(self, now: float) -> None:
        for out in self.outputs.values():
            self._pulse(out, now)

    def _pulse(self, out: RejectOutput, now: float) -> None:
        img = self.image
        if out.on_until and now >= out.on_until:  # the pulse ends; the coil stays on through a fail-safe
            out.on_until, out.free_at = 0.0, now + self.pulse_s
            img.set_coil(out.coil, self.in_failsafe and self.failsafe_rejects)
        if not out.on_until and out.waiting and now >= out.free_at:
            img.set_u32(out.base + CAM_PULSE_SEQ, out.waiting.popleft())
            img.set_u16(out.base + CAM_QUEUED, len(out.waiting))
            img.set_coil(out.coil, True)
            out.on_until = now + self.pulse_s

    async def serve_request(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> int | None:
        """pymodbus's device action, before each request: the image goes into its registers; writes refused."""
        if values is not None:
            return ILLEGAL_FUNCTION
        registers[: len(self.image.words)] = self.image.words
        return None


async def start_server(view: ModbusView, host: str, port: int, device_id: int) -> Any:
    """Serve `view` on host:port; returns the server (call `shutdown()` on it). OSError naming the address when
    it cannot listen there."""
    from pymodbus.constants import ExcCodes
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    async def action(*request: Any) -> Any:
        refused = await view.serve_request(*request)
        return None if refused is None else ExcCodes(refused)

    block = SimData(0, count=REGISTERS, values=0, datatype=DataType.REGISTERS)
    device = SimDevice(device_id, simdata=[block], use_bit_addressing=True, action=action)
    server = ModbusTcpServer(device, address=(host, port))
    try:
        await server.serve_forever(background=True)
    except RuntimeError:  # pymodbus logs the OSError and says only this
        raise OSError(f"cannot listen on {host}:{port} (in use, or not an address of this box)") from None
    return server
