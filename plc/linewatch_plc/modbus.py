"""Modbus TCP gateway (pymodbus): linewatch's verdicts as coils and holding registers a PLC polls.

Register map (one Modbus device, id `--device-id`; the PLC only reads: writes are refused with exception 1,
illegal function). Coil n is bit n % 16 (least significant first) of holding register n // 16, so holding
registers 0-15 also read the coils as words.

    coil 0          LINEWATCH_OK: heartbeats arrive in time (0 before the first one and in fail-safe)
    coil 1          HEARTBEAT_TOGGLE: flips with every heartbeat (a PLC watchdog checks that it moves)
    coil 2          FAIL_SAFE: no heartbeat for --failsafe-after intervals
    coil 3          DEGRADED: linewatch reports itself degraded (a camera lost, a stage not ready)
    coil 16 + k     REJECT of camera k: on for --pulse-ms per live reject or error, then off for --pulse-ms
                    before the next one (each its own rising edge); on all through fail-safe with
                    --failsafe reject
    coil 32 + k     LATE_REJECT of camera k: pulsed the same way for each reject recovered from the replay
                    endpoint, whose part has most likely passed the gate (divert it further down, or flag it)

    Line, from linewatch's heartbeat (32-bit values take two registers, high word first):
    HR 16-17        last seq published in the run
    HR 18-19        parts passed in the run
    HR 20-21        parts rejected in the run
    HR 22-23        parts in error in the run (not scored: treat as rejects)
    HR 24           heartbeat interval, ms
    HR 25           runs seen by this gateway (counts up when linewatch restarts)

    Camera k, at base 64 + 32 k (k < 16; cameras in --camera order, or one block for all cameras):
    +0-1            seq of its newest verdict (a recovered older one does not replace it)
    +2-3            frame id of that verdict
    +4-5            trigger / encoder value of its part (0xFFFFFFFF: the source has none)
    +6              its verdict: 0 pass, 1 reject, 2 error
    +7              live rejects waiting for their pulse
    +8-9            its score, IEEE 754 float32 (NaN: not scored)
    +10-11          threshold, float32 (reject when score > threshold)
    +12-13          seq of the live reject whose pulse is on, or was last
    +14-15          live rejects and errors of this camera since the gateway started
    +16-17          seq of the late reject whose pulse is on, or was last
    +18-19          late rejects of this camera since the gateway started
    +20             late rejects waiting for their pulse
    +24-27          capture time of the live reject in +12, ms since the epoch (64 bits, high word first)
    +28-31          capture time of the late reject in +16, ms since the epoch
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from linewatch_plc.gateway import Beat, Event, FailSafe, Part, score_or_nan, shows_newer, trigger_or

COIL_OK, COIL_TOGGLE, COIL_FAILSAFE, COIL_DEGRADED = 0, 1, 2, 3
COIL_REJECT, COIL_LATE_REJECT = 16, 32
HR_SEQ, HR_PASSED, HR_REJECTED, HR_ERRORS, HR_INTERVAL, HR_RUNS = 16, 18, 20, 22, 24, 25
CAMERA_BASE, CAMERA_STRIDE, MAX_CAMERAS = 64, 32, 16
CAM_SEQ, CAM_FRAME, CAM_TRIGGER, CAM_VERDICT, CAM_QUEUED = 0, 2, 4, 6, 7
CAM_SCORE, CAM_THRESHOLD, CAM_PULSE_SEQ, CAM_REJECTS = 8, 10, 12, 14
CAM_LATE_PULSE_SEQ, CAM_LATE_REJECTS, CAM_LATE_QUEUED = 16, 18, 20
CAM_PULSE_CAPTURE_MS, CAM_LATE_PULSE_CAPTURE_MS = 24, 28
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

    def set_u64(self, address: int, value: int) -> None:
        value &= 0xFFFFFFFFFFFFFFFF
        self.words[address : address + 4] = [
            value >> 48 & 0xFFFF,
            value >> 32 & 0xFFFF,
            value >> 16 & 0xFFFF,
            value & 0xFFFF,
        ]

    def u32(self, address: int) -> int:
        return self.words[address] << 16 | self.words[address + 1]


@dataclass
class PulseOutput:
    """One reject coil: rejects queue up, and each gets its own pulse (on, then off as long, then the next)."""

    coil: int
    seq_register: int  # seq of the reject whose pulse is on, or was last
    capture_register: int  # its capture time, ms since the epoch
    count_register: int
    waiting_register: int
    waiting: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, capture ms) of rejects not pulsed yet
    on_until: float = 0.0  # the pulse in progress ends then (monotonic s); 0: none
    free_at: float = 0.0  # the next pulse may start then
    held: bool = False  # held on by the fail-safe
    count: int = 0  # rejects given to this coil
    pulsed: int = 0  # of them, pulses ended


@dataclass
class CameraBlock:
    base: int
    live: PulseOutput
    late: PulseOutput
    shown: tuple[str, int] | None = None  # (run, seq) of the verdict in the block


def camera_block(k: int) -> CameraBlock:
    base = CAMERA_BASE + CAMERA_STRIDE * k
    live = PulseOutput(
        COIL_REJECT + k, base + CAM_PULSE_SEQ, base + CAM_PULSE_CAPTURE_MS, base + CAM_REJECTS, base + CAM_QUEUED
    )
    late = PulseOutput(
        COIL_LATE_REJECT + k,
        base + CAM_LATE_PULSE_SEQ,
        base + CAM_LATE_PULSE_CAPTURE_MS,
        base + CAM_LATE_REJECTS,
        base + CAM_LATE_QUEUED,
    )
    return CameraBlock(base, live, late)


class ModbusView:
    """The line as the register map above; `apply` and `tick` run on the server's event loop."""

    def __init__(self, cameras: Sequence[str], pulse_s: float, failsafe: str) -> None:
        if len(cameras) > MAX_CAMERAS:
            raise ValueError(f"--camera: at most {MAX_CAMERAS} cameras have a register block, got {len(cameras)}")
        self.image = RegisterImage()
        self.pulse_s, self.failsafe_rejects = pulse_s, failsafe == "reject"
        names = list(cameras) or ["*"]  # "*": one block for every camera
        self.blocks = {name: camera_block(k) for k, name in enumerate(names)}
        self.in_failsafe, self.run, self.runs = False, None, 0
        self.unknown: set[str] = set()

    def block_of(self, camera: str) -> CameraBlock | None:
        found = self.blocks.get(camera) or self.blocks.get("*")
        if found is None and camera not in self.unknown:
            self.unknown.add(camera)
            print(f"camera {camera} has no Modbus block (start the gateway with --camera {camera})", flush=True)
        return found

    async def apply(self, event: Event) -> None:
        if isinstance(event, Part):
            self._part(event.message, event.replayed)
        elif isinstance(event, Beat):
            self._heartbeat(event)
        elif isinstance(event, FailSafe):
            self._failsafe(event.active)

    def outputs(self) -> list[PulseOutput]:
        return [out for block in self.blocks.values() for out in (block.live, block.late)]

    def mark(self) -> tuple[int, ...]:
        """How many rejects each coil has been given so far."""
        return tuple(out.count for out in self.outputs())

    def reached(self, mark: tuple[int, ...]) -> bool:
        """Every reject given up to `mark` has had its pulse end, or waits on a coil the fail-safe holds on (its
        part is rejected with every other; it still gets its own pulse once the fail-safe ends)."""
        outputs = zip(self.outputs(), mark, strict=True)
        return all(out.pulsed + (len(out.waiting) if out.held else 0) >= given for out, given in outputs)

    def _part(self, message: dict[str, Any], replayed: bool) -> None:
        block = self.block_of(str(message["camera_id"]))
        if block is None:
            return
        seq = int(message["seq"])
        if shows_newer(block.shown, message, replayed, self.run):
            self._show(block, message)
        if message["verdict"] != "pass":
            out = block.late if replayed else block.live
            out.count += 1
            out.waiting.append((seq, int(message["t_capture_ns"]) // 1_000_000))
            self.image.set_u32(out.count_register, out.count)
            self.image.set_u16(out.waiting_register, len(out.waiting))

    def _show(self, block: CameraBlock, message: dict[str, Any]) -> None:
        img, base = self.image, block.base
        block.shown = (message["run"], int(message["seq"]))
        img.set_u32(base + CAM_SEQ, int(message["seq"]))
        img.set_u32(base + CAM_FRAME, int(message["frame_id"]))
        img.set_u32(base + CAM_TRIGGER, trigger_or(message, NO_TRIGGER))
        img.set_u16(base + CAM_VERDICT, VERDICT_CODES[message["verdict"]])
        img.set_f32(base + CAM_SCORE, score_or_nan(message))
        img.set_f32(base + CAM_THRESHOLD, float(message["threshold"]))

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
        """The reject coils follow at the next tick, where pulses are timed."""
        self.in_failsafe = active
        self.image.set_coil(COIL_FAILSAFE, active)
        if active:
            self.image.set_coil(COIL_OK, False)

    async def tick(self, now: float) -> None:
        held = self.in_failsafe and self.failsafe_rejects
        for block in self.blocks.values():
            self._pulse(block.live, now, held)
            self._pulse(block.late, now, False)

    def _pulse(self, out: PulseOutput, now: float, held: bool) -> None:
        """End the pulse that is due, follow the fail-safe, start the next pulse; the coil is on while either
        a pulse or the fail-safe holds it. Leaving the fail-safe, the coil stays off for a pulse length before
        the next pulse, so that pulse is a rising edge of its own."""
        img = self.image
        if out.on_until and now >= out.on_until:
            out.on_until, out.free_at = 0.0, now + self.pulse_s
            out.pulsed += 1
        if held != out.held:
            out.held = held
            if not held:
                out.free_at = max(out.free_at, now + self.pulse_s)
        if not out.on_until and not out.held and out.waiting and now >= out.free_at:
            seq, capture_ms = out.waiting.popleft()
            img.set_u32(out.seq_register, seq)
            img.set_u64(out.capture_register, capture_ms)
            img.set_u16(out.waiting_register, len(out.waiting))
            out.on_until = now + self.pulse_s
        img.set_coil(out.coil, out.held or bool(out.on_until))

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
