"""Product changeover at run time: a camera goes to another bundle at a frame boundary, without a restart.

`linewatch switch` (or a PLC bridge, or a script) sends a `SwitchRequest` to the run's control endpoint
(`pipeline.control_address`, ZeroMQ REQ/REP). The supervisor checks the bundle (it exists, its hash
matches its content, it has a threshold, it takes the run's input size) and adds it to the bundle
table; the infer stage loads and warms it up in the background while the current bundle goes on
deciding. Only then does the supervisor point the camera at the new slot. Preprocess reads the
camera's slot once per frame, so every frame is decided by exactly one bundle and none waits or is
dropped for the switch. The requester gets a `SwitchOutcome` once the switch is made or refused; a
refused switch leaves the current bundle running and says why. Every request naming a camera of the
run is recorded in the store, made or refused, except one for the bundle the camera runs already.

The request and reply are plain JSON (standard library only), so a PLC bridge can send them without
linewatch's runtime installed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from pipeline.bundles import LOAD_FAILED, LOADED, NO_BUNDLE, BundleTable, RunBundle
from pipeline.store.switches import BundleSwitch

CONTROL_VERSION = 1
LOAD_TIMEOUT_S = 600.0  # a TensorRT engine build for a new bundle may take minutes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwitchRequest:
    """Put `camera` on a bundle: a file (`bundle`) or a configured recipe name (`recipe`), exactly one. With
    `shadow`, the bundle scores the camera's frames in shadow instead (neither given: the shadow is removed);
    `promote` puts the camera's shadow bundle in charge (neither given)."""

    camera: str
    bundle: str | None = None
    recipe: str | None = None
    by: str = "unknown"  # who asks: an operator, "plc", a user@host
    shadow: bool = False
    promote: bool = False

    def encode(self) -> bytes:
        return json.dumps({"v": CONTROL_VERSION, "switch": asdict(self)}).encode()

    @classmethod
    def decode(cls, data: bytes) -> SwitchRequest:
        """ValueError, naming the field, for anything but a switch request of this version."""
        try:
            body = json.loads(data)
        except ValueError:
            raise ValueError("control request: not JSON") from None
        if not isinstance(body, dict) or body.get("v") != CONTROL_VERSION or not isinstance(body.get("switch"), dict):
            raise ValueError(f"control request: expected {{'v': {CONTROL_VERSION}, 'switch': {{...}}}}")
        fields = body["switch"]
        for name in ("camera", "bundle", "recipe", "by"):
            value = fields.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"control request switch.{name} = {value!r}: expected a string")
        for name in ("shadow", "promote"):
            if not isinstance(fields.get(name, False), bool):
                raise ValueError(f"control request switch.{name} = {fields[name]!r}: expected true or false")
        if not fields.get("camera"):
            raise ValueError("control request switch.camera: missing")
        shadow, promote = fields.get("shadow", False), fields.get("promote", False)
        given = (fields.get("bundle") is not None) + (fields.get("recipe") is not None)
        if promote and (given or shadow):
            raise ValueError("control request: switch.promote takes no switch.bundle, switch.recipe or switch.shadow")
        if not promote and given != 1 and not (shadow and given == 0):
            raise ValueError("control request: give exactly one of switch.bundle and switch.recipe")
        by = fields.get("by") or "unknown"
        return cls(fields["camera"], fields.get("bundle"), fields.get("recipe"), by, shadow, promote)


@dataclass(frozen=True)
class SwitchOutcome:
    camera: str
    switched: bool
    from_bundle: str | None = None
    to_bundle: str | None = None
    error: str | None = None  # why the switch was refused
    load_ms: float | None = None  # request to switch: checking, loading and warming up the new bundle
    shadow: bool = False  # the camera's shadow bundle changed (from/to None: there was / is none)

    def encode(self) -> bytes:
        return json.dumps({"v": CONTROL_VERSION, **asdict(self)}).encode()

    @classmethod
    def decode(cls, data: bytes) -> SwitchOutcome:
        try:
            return cls(**_reply_fields(data))
        except TypeError:
            raise ValueError("control reply: not a switch outcome of this version") from None


@dataclass(frozen=True)
class SelfTestRequest:
    """Run the golden-sample self-test of every bundle in charge now (`linewatch selftest`)."""

    by: str = "unknown"

    def encode(self) -> bytes:
        return json.dumps({"v": CONTROL_VERSION, "selftest": asdict(self)}).encode()


@dataclass(frozen=True)
class SelfTestOutcome:
    passed: bool
    results: list[dict[str, Any]] = field(default_factory=list)  # pipeline.selftest.SelfTestResult fields
    error: str | None = None  # why none ran

    def encode(self) -> bytes:
        return json.dumps({"v": CONTROL_VERSION, **asdict(self)}).encode()

    @classmethod
    def decode(cls, data: bytes) -> SelfTestOutcome:
        try:
            return cls(**_reply_fields(data))
        except TypeError:
            raise ValueError("control reply: not a self-test outcome of this version") from None


def _reply_fields(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        raise ValueError("control reply: not JSON") from None
    if not isinstance(body, dict) or body.get("v") != CONTROL_VERSION:
        raise ValueError(f"control reply: expected version {CONTROL_VERSION}")
    body.pop("v")
    return body


def decode_request(data: bytes) -> SwitchRequest | SelfTestRequest:
    """ValueError, naming the field, for anything but a switch or self-test request of this version."""
    try:
        body = json.loads(data)
    except ValueError:
        raise ValueError("control request: not JSON") from None
    if isinstance(body, dict) and body.get("v") == CONTROL_VERSION and isinstance(body.get("selftest"), dict):
        by = body["selftest"].get("by")
        return SelfTestRequest(by if isinstance(by, str) else "unknown")
    return SwitchRequest.decode(data)


def _ask(address: str, request: bytes, timeout_s: float) -> bytes:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            raise OSError(f"control address {address!r}: cannot connect ({exc})") from None
        sock.send(request)
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no answer from {address} within {timeout_s:g} s (is `linewatch run` running there?)")
        return sock.recv()
    finally:
        sock.close()
        ctx.term()


def ask_switch(address: str, request: SwitchRequest, timeout_s: float) -> SwitchOutcome:
    """Send `request` to a run's control endpoint and wait for the outcome; TimeoutError when none comes."""
    return SwitchOutcome.decode(_ask(address, request.encode(), timeout_s))


def ask_selftest(address: str, request: SelfTestRequest, timeout_s: float) -> SelfTestOutcome:
    """Ask a run for its self-test and wait for the outcome; TimeoutError when none comes."""
    return SelfTestOutcome.decode(_ask(address, request.encode(), timeout_s))


class ControlServer:
    """The run's control endpoint: a ROUTER socket the supervisor polls, so one slow switch (a bundle loading)
    never keeps another requester waiting."""

    def __init__(self, address: str) -> None:
        from pipeline.publisher import bound_socket

        self.ctx = zmq.Context()
        self.sock = bound_socket(self.ctx, zmq.ROUTER, address, "pipeline.control_address", {zmq.LINGER: 0})

    def requests(self) -> list[tuple[bytes, SwitchRequest | SelfTestRequest]]:
        """The requests waiting now (never blocks); malformed ones are answered with the reason at once."""
        out = []
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            identity, body = frames[0], frames[-1]
            try:
                out.append((identity, decode_request(body)))
            except ValueError as exc:
                self.reply(identity, SwitchOutcome("", False, error=str(exc)))

    def reply(self, identity: bytes, outcome: SwitchOutcome) -> None:
        self.sock.send_multipart([identity, b"", outcome.encode()])

    def reply_selftest(self, identity: bytes, outcome: SelfTestOutcome) -> None:
        self.sock.send_multipart([identity, b"", outcome.encode()])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@dataclass
class _Pending:
    ticket: Any  # the requester, for the reply
    request: SwitchRequest
    camera: int
    path: str
    bundle: RunBundle
    slot: int
    requested_ns: int
    t_request: float  # time.monotonic()

    @property
    def shadow(self) -> bool:
        return self.request.shadow


class Changeover:
    """The supervisor's side of switches: checks a request, has the bundle loaded, and moves the camera over."""

    def __init__(
        self,
        run_id: str,
        table: BundleTable,
        slot_bundles: dict[int, RunBundle],
        cameras: list[str],
        recipes: dict[str, str],
        on_switch: Callable[[int, RunBundle], None],
        record: Callable[[BundleSwitch], None],
    ) -> None:
        """`on_switch(camera, bundle)` after a camera moved; `record` keeps every request's outcome."""
        self.run_id, self.table, self.slot_bundles = run_id, table, slot_bundles
        self.cameras, self.recipes = cameras, recipes
        self.on_switch, self.record = on_switch, record
        self.pending: list[_Pending] = []

    def request(self, ticket: Any, req: SwitchRequest) -> SwitchOutcome | None:
        """Start a switch; its outcome now when it is refused or needs no loading, else None (see `poll`)."""
        requested_ns, t_request = time.time_ns(), time.monotonic()
        path = req.bundle if req.recipe is None else self.recipes.get(req.recipe)
        camera = self.cameras.index(req.camera) if req.camera in self.cameras else None
        current = "" if camera is None else self._current(camera, req.shadow)
        if (why := self._refusal(req, camera, path)) is not None or camera is None:
            return self._refuse(req, requested_ns, current, None, str(path or ""), why or "refused")
        if req.promote:
            return self._promote(req, camera, requested_ns)
        if path is None:  # a shadow removed
            self.table.shadow[camera] = NO_BUNDLE
            self.record(self._switch(req, requested_ns, "", current, None, time.time_ns()))
            return SwitchOutcome(req.camera, True, current or None, None, shadow=True)
        try:
            bundle = RunBundle.read(str(path), self._input_size())
            self._check_shadow(req, camera, bundle)
        except (OSError, ValueError) as exc:  # BundleError, a file that cannot be read
            return self._refuse(req, requested_ns, current, None, str(path), str(exc))
        if bundle.hash == current:
            return SwitchOutcome(req.camera, True, current, current, load_ms=0.0, shadow=req.shadow)
        try:
            slot = self.table.add(bundle)
        except ValueError as exc:
            return self._refuse(req, requested_ns, current, bundle.hash, str(path), str(exc))
        self.slot_bundles[slot] = bundle
        if self.table.slots["loaded"][slot] == LOAD_FAILED:
            self.table.set_pending(slot)  # failed before: the infer stage tries again
        self.pending.append(_Pending(ticket, req, camera, str(path), bundle, slot, requested_ns, t_request))
        log.info("camera %s: loading %s (bundle %s) to switch to", req.camera, path, bundle.hash[:12])
        return None

    def _current(self, camera: int, shadow: bool) -> str:
        """The hash of the camera's live (or shadow) bundle; "" for no shadow."""
        slot = int((self.table.shadow if shadow else self.table.live)[camera])
        return "" if slot == NO_BUNDLE else self.table.hash(slot)

    def _promote(self, req: SwitchRequest, camera: int, requested_ns: int) -> SwitchOutcome:
        """The camera's shadow bundle takes charge (it is loaded and scoring already): no wait, no shadow after."""
        current, slot = self._current(camera, False), int(self.table.shadow[camera])
        if slot == NO_BUNDLE:
            return self._refuse(
                req, requested_ns, current, None, "", f"camera {req.camera}: no shadow bundle to promote"
            )
        self.table.live[camera], self.table.shadow[camera] = slot, NO_BUNDLE
        bundle = self.slot_bundles[slot]
        self.on_switch(camera, bundle)
        self.record(self._switch(req, requested_ns, str(bundle.path), current, bundle.hash, time.time_ns()))
        log.info("camera %s: shadow bundle %s promoted (was %s)", req.camera, bundle.hash[:12], current[:12])
        return SwitchOutcome(req.camera, True, current, bundle.hash, load_ms=0.0)

    def _check_shadow(self, req: SwitchRequest, camera: int, bundle: RunBundle) -> None:
        """A shadow scores the frames as the live bundle's preprocessing cut them: the two must cut them alike,
        whichever of them changes."""
        live, shadow = int(self.table.live[camera]), int(self.table.shadow[camera])
        if req.shadow and not bundle.cuts_like(other := self.slot_bundles[live]):
            raise ValueError(
                f"{bundle.path}: resizes or crops unlike camera {req.camera}'s bundle {other.path}; a shadow bundle "
                "scores the frames as the live one cuts them"
            )
        if not req.shadow and shadow != NO_BUNDLE and not bundle.cuts_like(other := self.slot_bundles[shadow]):
            raise ValueError(
                f"{bundle.path}: resizes or crops unlike camera {req.camera}'s shadow bundle {other.path}, which "
                "scores the frames as the live one cuts them: stop or promote the shadow first"
            )

    def poll(self) -> list[tuple[Any, SwitchOutcome]]:
        """Switch the cameras whose new bundle is loaded; refuse those whose bundle failed to load."""
        done, still = [], []
        for p in self.pending:
            loaded = int(self.table.slots["loaded"][p.slot])
            current = self._current(p.camera, p.shadow)
            if loaded == LOADED:
                # The frame boundary: preprocess takes it from the camera's next frame on.
                (self.table.shadow if p.shadow else self.table.live)[p.camera] = p.slot
                switched_ns, load_ms = time.time_ns(), (time.monotonic() - p.t_request) * 1e3
                if not p.shadow:
                    self.on_switch(p.camera, p.bundle)
                self.record(self._switch(p.request, p.requested_ns, p.path, current, p.bundle.hash, switched_ns))
                log.info("camera %s: %s from bundle %s to %s (%s) after %.0f ms", p.request.camera,
                         "shadow switched" if p.shadow else "switched", current[:12] or "none", p.bundle.hash[:12],
                         p.path, load_ms)  # fmt: skip
                outcome = SwitchOutcome(p.request.camera, True, current or None, p.bundle.hash, None, load_ms, p.shadow)
                done.append((p.ticket, outcome))
            elif loaded == LOAD_FAILED or time.monotonic() - p.t_request > LOAD_TIMEOUT_S:
                why = self.table.error(p.slot) if loaded == LOAD_FAILED else f"not loaded within {LOAD_TIMEOUT_S:g} s"
                why = f"{p.path}: cannot be loaded here: {why}"
                done.append((p.ticket, self._refuse(p.request, p.requested_ns, current, p.bundle.hash, p.path, why)))
            else:
                still.append(p)
        self.pending = still
        return done

    def refuse_pending(self, why: str) -> list[tuple[Any, SwitchOutcome]]:
        """Give up every switch still loading (the run stops): the cameras stay on their bundles."""
        done = []
        for p in self.pending:
            current = self._current(p.camera, p.shadow)
            done.append((p.ticket, self._refuse(p.request, p.requested_ns, current, p.bundle.hash, p.path, why)))
        self.pending = []
        return done

    def _refusal(self, req: SwitchRequest, camera: int | None, path: str | None) -> str | None:
        if camera is None:
            return f"camera {req.camera!r}: not in this run (cameras: {', '.join(self.cameras)})"
        if req.recipe is not None and path is None:
            known = ", ".join(sorted(self.recipes)) or "none configured"
            return f"recipe {req.recipe!r}: not in pipeline.recipes ({known})"
        if any(p.camera == camera for p in self.pending):
            return f"camera {req.camera}: a switch is already in progress"
        if path is not None:
            try:
                if not Path(path).is_file():
                    return f"{path}: bundle file does not exist"
            except OSError as exc:
                return f"{path}: cannot be read ({exc.strerror or exc})"
        return None

    def _input_size(self) -> tuple[int, int]:
        return next(iter(self.slot_bundles.values())).manifest.input_size

    def _refuse(
        self, req: SwitchRequest, requested_ns: int, current: str, to: str | None, path: str, why: str
    ) -> SwitchOutcome:
        log.warning("camera %s: switch refused, %s stays: %s", req.camera, current[:12] or "no shadow", why)
        if req.camera in self.cameras:
            self.record(self._switch(req, requested_ns, path, current, to, refused=why))
        return SwitchOutcome(req.camera, False, current or None, to, error=why, shadow=req.shadow)

    def _switch(
        self, req: SwitchRequest, requested_ns: int, path: str, current: str, to: str | None,
        switched_ns: int | None = None, refused: str | None = None,
    ) -> BundleSwitch:  # fmt: skip
        return BundleSwitch(
            run_id=self.run_id,
            camera_id=req.camera,
            requested_ns=requested_ns,
            requested_by=req.by[:128],
            bundle_path=path,
            from_bundle=current,
            to_bundle=to,
            recipe=req.recipe,
            switched_ns=switched_ns,
            refused=refused,
            shadow=req.shadow,
        )
