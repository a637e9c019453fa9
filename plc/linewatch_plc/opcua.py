"""OPC UA gateway (asyncua): linewatch's verdicts as typed nodes and a reject event.

Address space, namespace `urn:linewatch:plc` (browse names):

    Objects/Linewatch                      the source of a RejectEvent for every reject and error (live and
                                           replayed), emitted by the Server object (ns=0;i=2253)
        LinewatchOk      Boolean           heartbeats arrive in time (false before the first one, and in fail-safe)
        FailSafe         Boolean           no heartbeat for --failsafe-after intervals: hold the line or reject all
        Health           String            ok | degraded (linewatch's own view)
        Problems         String            why degraded, "; "-separated
        Run              String            the run id (changes when linewatch restarts)
        Seq              UInt64            last seq published
        Passed, Rejected, Errors  UInt64   parts of the run per verdict (errors: not scored, treat as rejects)
        HeartbeatTime    DateTime          when linewatch sent its last heartbeat
        Cameras/<camera id>                one object per camera, made when --camera names it or it is first seen
            Verdict      String            pass | reject | error
            Score        Double            NaN when not scored
            Threshold    Double            reject when Score > Threshold
            Seq, FrameId UInt64            of the newest verdict (a recovered older one does not replace it)
            Trigger      Int64             the part's trigger / encoder value, -1 when the source has none
            CaptureTime, DecisionTime  DateTime
            Bundle       String            content hash of the bundle that decided
            Rejects      UInt64            rejects and errors since the gateway started

    RejectEventType (subtype of BaseEventType): Run, Camera, Verdict, Bundle String; Seq, FrameId UInt64;
    Trigger Int64; Score, Threshold Double; CaptureTime DateTime; Replayed Boolean (recovered from the
    replay endpoint: its part has likely passed the gate). Severity 900 live, 700 replayed. The last
    --event-history events are kept (in memory, Historical Access), so a client that subscribes late, or
    reconnects, reads the rejects it missed with HistoryRead (`read_event_history`) and merges them by Seq.

Security: without a certificate the endpoint is NoSecurity; with `--certificate`/`--private-key` it is
Basic256Sha256 Sign & Encrypt only, and `--trusted-clients DIR` admits only client certificates signed by
(or equal to) one there. `--users FILE` requires a user name and password (anonymous is refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncua import Node, Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator
from asyncua.crypto.validator import CertificateValidatorOptions as Check
from asyncua.server.event_generator import EventGenerator

from linewatch_plc.gateway import Beat, Event, FailSafe, Part, score_or_nan, shows_newer, trigger_or
from linewatch_plc.users import verify_password

NAMESPACE = "urn:linewatch:plc"
SEVERITY_LIVE, SEVERITY_REPLAYED = 900, 700
V = ua.VariantType
LINE_NODES = {
    "LinewatchOk": (False, V.Boolean),
    "FailSafe": (False, V.Boolean),
    "Health": ("", V.String),
    "Problems": ("", V.String),
    "Run": ("", V.String),
    "Seq": (0, V.UInt64),
    "Passed": (0, V.UInt64),
    "Rejected": (0, V.UInt64),
    "Errors": (0, V.UInt64),
    "HeartbeatTime": (datetime.fromtimestamp(0, UTC), V.DateTime),
}
CAMERA_NODES = {
    "Verdict": ("", V.String),
    "Score": (float("nan"), V.Double),
    "Threshold": (float("nan"), V.Double),
    "Seq": (0, V.UInt64),
    "FrameId": (0, V.UInt64),
    "Trigger": (-1, V.Int64),
    "CaptureTime": (datetime.fromtimestamp(0, UTC), V.DateTime),
    "DecisionTime": (datetime.fromtimestamp(0, UTC), V.DateTime),
    "Bundle": ("", V.String),
    "Rejects": (0, V.UInt64),
}
EVENT_FIELDS = [
    ("Run", V.String),
    ("Camera", V.String),
    ("Verdict", V.String),
    ("Bundle", V.String),
    ("Seq", V.UInt64),
    ("FrameId", V.UInt64),
    ("Trigger", V.Int64),
    ("Score", V.Double),
    ("Threshold", V.Double),
    ("CaptureTime", V.DateTime),
    ("Replayed", V.Boolean),
]


@dataclass(frozen=True)
class OpcUaSettings:
    endpoint: str  # opc.tcp://HOST:PORT/PATH
    certificate: Path | None = None
    private_key: Path | None = None
    trusted_clients: Path | None = None
    users: dict[str, str] | None = None  # name -> stored hash (users.load_users)
    event_history: int = 10_000  # reject events kept for HistoryRead; 0: none


class PasswordUsers:
    """asyncua's user manager: a name and password from the users file, or no session."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None):
        stored = self.users.get(username or "")
        if stored is None or password is None or not verify_password(password, stored):
            return None
        return User(role=UserRole.User, name=username)


def utc(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


class Nodes:
    """Typed variables under one object, written by name."""

    def __init__(self, kinds: dict[str, tuple[Any, ua.VariantType]]) -> None:
        self.kinds = kinds
        self.nodes: dict[str, Node] = {}

    async def make(self, parent: Node, idx: int) -> Nodes:
        for name, (value, kind) in self.kinds.items():
            self.nodes[name] = await parent.add_variable(idx, name, ua.Variant(value, kind))
        return self

    async def write(self, **values: Any) -> None:
        for name, value in values.items():
            await self.nodes[name].write_value(ua.Variant(value, self.kinds[name][1]))


class OpcUaView:
    """The line as the address space above; `build` before the server starts, then `apply` per event."""

    def __init__(self, cameras: Sequence[str]) -> None:
        self.initial_cameras = list(cameras)
        self.cameras: dict[str, Nodes] = {}
        self.rejects: dict[str, int] = {}
        self.shown: dict[str, tuple[str, int]] = {}  # camera -> (run, seq) of the verdict its nodes show
        self.run: str | None = None  # the run linewatch's last heartbeat named

    async def build(self, server: Server, idx: int) -> None:
        self.idx = idx
        self.line_object = await server.nodes.objects.add_object(idx, "Linewatch")
        self.line = await Nodes(LINE_NODES).make(self.line_object, idx)
        self.cameras_folder = await self.line_object.add_folder(idx, "Cameras")
        base = ua.ObjectIds.BaseEventType
        event_type = await server.create_custom_event_type(idx, "RejectEventType", base, EVENT_FIELDS)
        # Emitted by the Server object, where OPC UA clients subscribe to a server's events, with Linewatch as
        # the source; the Server object also keeps them for HistoryRead.
        self.events: EventGenerator = await server.get_event_generator(event_type, ua.ObjectIds.Server)
        self.events.event.SourceNode = self.line_object.nodeid
        self.events.event.SourceName = "Linewatch"
        for camera in self.initial_cameras:
            await self.camera(camera)

    async def camera(self, name: str) -> Nodes:
        if name not in self.cameras:
            folder = await self.cameras_folder.add_object(self.idx, name)
            self.cameras[name] = await Nodes(CAMERA_NODES).make(folder, self.idx)
            self.rejects[name] = 0
        return self.cameras[name]

    async def apply(self, event: Event) -> None:
        if isinstance(event, Part):
            await self._part(event.message, event.replayed)
        elif isinstance(event, Beat):
            await self._heartbeat(event)
        elif isinstance(event, FailSafe):
            await self.line.write(FailSafe=event.active, **({"LinewatchOk": False} if event.active else {}))

    async def tick(self, now: float) -> None:
        pass

    def mark(self) -> None:
        return None

    def reached(self, mark: None) -> bool:
        return True  # events go out as they are applied

    async def _part(self, m: dict[str, Any], replayed: bool) -> None:
        name, run, seq = str(m["camera_id"]), m["run"], int(m["seq"])
        nodes = await self.camera(name)
        rejected = m["verdict"] != "pass"
        self.rejects[name] += rejected
        if shows_newer(self.shown.get(name), m, replayed, self.run):  # a recovered older one stays behind
            self.shown[name] = (run, seq)
            await nodes.write(
                Verdict=m["verdict"],
                Score=score_or_nan(m),
                Threshold=float(m["threshold"]),
                Seq=seq,
                FrameId=int(m["frame_id"]),
                Trigger=trigger_or(m, -1),
                CaptureTime=utc(m["t_capture_ns"]),
                DecisionTime=utc(m["t_decision_ns"]),
                Bundle=str(m["bundle"]),
            )
        await nodes.write(Rejects=self.rejects[name])
        if rejected:
            await self._reject_event(m, replayed)

    async def _reject_event(self, m: dict[str, Any], replayed: bool) -> None:
        event = self.events.event
        for name, value in {
            "Run": m["run"],
            "Camera": str(m["camera_id"]),
            "Verdict": m["verdict"],
            "Bundle": str(m["bundle"]),
            "Seq": int(m["seq"]),
            "FrameId": int(m["frame_id"]),
            "Trigger": trigger_or(m, -1),
            "Score": score_or_nan(m),
            "Threshold": float(m["threshold"]),
            "CaptureTime": utc(m["t_capture_ns"]),
            "Replayed": replayed,
        }.items():
            setattr(event, name, value)
        event.Severity = SEVERITY_REPLAYED if replayed else SEVERITY_LIVE
        late = " (replayed)" if replayed else ""
        await self.events.trigger(message=f"{m['verdict'].upper()} camera {m['camera_id']} seq {m['seq']}{late}")

    async def _heartbeat(self, beat: Beat) -> None:
        hb = beat.heartbeat
        self.run = hb.run
        await self.line.write(
            LinewatchOk=True,
            Health=hb.health,
            Problems="; ".join(hb.problems),
            Run=hb.run,
            Seq=hb.seq,
            Passed=hb.topic_seqs.get("pass", 0),
            Rejected=hb.topic_seqs.get("reject", 0),
            Errors=hb.topic_seqs.get("error", 0),
            HeartbeatTime=utc(hb.t_ns),
        )


async def start_server(view: OpcUaView, settings: OpcUaSettings) -> Server:
    """Build the address space and start serving; OSError / ValueError naming what is wrong otherwise."""
    server = Server(user_manager=None if settings.users is None else PasswordUsers(settings.users))
    await server.init()
    server.set_endpoint(settings.endpoint)
    server.set_server_name("linewatch")
    await _secure(server, settings)
    idx = await server.register_namespace(NAMESPACE)
    await view.build(server, idx)
    await server.start()
    if settings.event_history:
        await server.historize_node_event(server.nodes.server, timedelta(days=7), settings.event_history)
    return server


async def _secure(server: Server, settings: OpcUaSettings) -> None:
    tokens = [ua.UserNameIdentityToken] if settings.users is not None else [ua.AnonymousIdentityToken]
    server.set_identity_tokens(tokens)
    if settings.certificate is None:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        return
    server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    await server.load_certificate(str(settings.certificate))
    await server.load_private_key(str(settings.private_key))
    if settings.trusted_clients is None:  # any client certificate in its validity and matching its URI
        server.set_certificate_validator(CertificateValidator(Check.BASIC_VALIDATION | Check.PEER_CLIENT))
        return
    store = TrustStore([settings.trusted_clients], [])
    await store.load()
    server.set_certificate_validator(CertificateValidator(Check.TRUSTED_VALIDATION | Check.PEER_CLIENT, store))
