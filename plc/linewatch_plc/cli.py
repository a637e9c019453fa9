"""`linewatch-plc`: follow a linewatch line and hand its verdicts to the PLC.

    linewatch-plc log     --state bridge.json                  rejects as log lines (the reference bridge)
    linewatch-plc opcua   --endpoint opc.tcp://0.0.0.0:4840/linewatch --state opcua.json
    linewatch-plc modbus  --port 502 --camera top --camera side --state modbus.json
    linewatch-plc add-user users.txt NAME                      a login for the OPC UA gateway (password on stdin)

Every one recovers missed verdicts from linewatch's replay endpoint and goes fail-safe when its heartbeats
stop (`linewatch_plc.follower`). The protocol libraries are imported only by their own command.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from linewatch_plc.follower import FAILSAFE_ACTIONS, FollowSettings, StateFile, emit, follow, prepare
from linewatch_plc.gateway import LineView, run_gateway

ENDPOINT = "opc.tcp://127.0.0.1:4840/linewatch"


def follow_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="tcp://127.0.0.1:5556", help="linewatch's publisher")
    parser.add_argument(
        "--replay-address",
        default="tcp://127.0.0.1:5557",
        help="linewatch's replay endpoint; empty: missed messages are only logged",
    )
    parser.add_argument("--state", type=Path, help="file keeping the follower's position across restarts")
    parser.add_argument("--duration", type=float, help="exit after this many seconds")
    parser.add_argument(
        "--failsafe-after", type=int, default=5, help="missed heartbeats before going fail-safe (default 5)"
    )
    parser.add_argument(
        "--failsafe",
        choices=sorted(FAILSAFE_ACTIONS),
        default="hold",
        help="fail-safe action: hold the gate, or treat every part as a reject (default hold)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linewatch-plc", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    log = commands.add_parser("log", help="log rejects, recover missed ones, fail safe on silence")
    follow_options(log)
    log.add_argument("--all", action="store_true", help="follow every verdict, not only reject/error")
    opcua = commands.add_parser("opcua", help="serve the line over OPC UA")
    follow_options(opcua)
    opcua.add_argument("--endpoint", default=ENDPOINT, help=f"where to listen (default {ENDPOINT})")
    opcua.add_argument("--camera", action="append", default=[], help="a camera's nodes, made at start (repeat)")
    opcua.add_argument("--certificate", type=Path, help="server certificate (DER or PEM): Basic256Sha256 only")
    opcua.add_argument("--private-key", type=Path, help="the certificate's private key (PEM)")
    opcua.add_argument("--trusted-clients", type=Path, help="folder of client (or CA) certificates admitted")
    opcua.add_argument("--users", type=Path, help="logins file (linewatch-plc add-user): anonymous refused")
    opcua.add_argument(
        "--event-history", type=int, default=10_000, help="reject events kept for HistoryRead (default 10000)"
    )
    modbus = commands.add_parser("modbus", help="serve the line over Modbus TCP")
    follow_options(modbus)
    modbus.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    modbus.add_argument("--port", type=int, default=502, help="TCP port (default 502)")
    modbus.add_argument("--device-id", type=int, default=1, help="Modbus unit id (default 1; 0: answer every unit id)")
    modbus.add_argument("--camera", action="append", default=[], help="camera k's register block, in order (repeat)")
    modbus.add_argument("--pulse-ms", type=float, default=50.0, help="reject coil pulse length (default 50 ms)")
    add_user = commands.add_parser("add-user", help="add an OPC UA login (password read from stdin or a prompt)")
    add_user.add_argument("file", type=Path)
    add_user.add_argument("name")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "failsafe_after", 1) < 1:
        parser.error("--failsafe-after must be at least 1")
    if args.command == "opcua" and (args.certificate is None) != (args.private_key is None):
        parser.error("--certificate and --private-key go together")
    if args.command == "opcua" and args.certificate is None and (args.users or args.trusted_clients):
        parser.error("--users and --trusted-clients need --certificate: without it passwords travel in clear")
    if args.command == "modbus" and not 0 <= args.device_id <= 255:
        parser.error(f"--device-id {args.device_id}: expected a Modbus unit id, 0 to 255")
    if args.command == "opcua" and args.event_history < 0:
        parser.error("--event-history must be 0 or more")
    if args.command == "modbus" and args.pulse_ms <= 0:
        parser.error("--pulse-ms must be above 0")
    return args


def settings_of(args: argparse.Namespace) -> FollowSettings:
    state = StateFile(args.state)
    return FollowSettings(args.address, args.replay_address, state, args.failsafe_after, args.failsafe, args.duration)


def run_log(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    follower, end = prepare(settings, follow_all=args.all)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    follow(follower, args.address, args.replay_address, settings.state, stop, end)
    return 0


async def serve_opcua(args: argparse.Namespace) -> None:
    from linewatch_plc.opcua import OpcUaSettings, OpcUaView, start_server
    from linewatch_plc.users import load_users

    users = None if args.users is None else load_users(args.users)
    settings = OpcUaSettings(
        args.endpoint, args.certificate, args.private_key, args.trusted_clients, users, args.event_history
    )
    view = OpcUaView(args.camera)
    server = await start_server(view, settings)
    emit([f"OPC UA on {args.endpoint} ({'Basic256Sha256' if args.certificate else 'no security'})"])
    await follow_into(view, args, server.stop)


async def serve_modbus(args: argparse.Namespace) -> None:
    from linewatch_plc.modbus import ModbusView, start_server

    view = ModbusView(args.camera, args.pulse_ms / 1000, args.failsafe)
    server = await start_server(view, args.host, args.port, args.device_id)
    emit([f"Modbus TCP on {args.host}:{args.port}, device {args.device_id}"])
    await follow_into(view, args, server.shutdown)


async def follow_into(view: LineView, args: argparse.Namespace, close: Callable[[], Awaitable[Any]]) -> None:
    try:
        await run_gateway(view, settings_of(args))
    finally:
        await close()


def run_add_user(args: argparse.Namespace) -> int:
    from linewatch_plc.users import add_user

    password = getpass.getpass(f"password for {args.name}: ") if sys.stdin.isatty() else sys.stdin.readline()
    password = password.rstrip("\n")
    if not password:
        raise ValueError("an empty password")
    add_user(args.file, args.name, password)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "log":
            return run_log(args)
        if args.command == "add-user":
            return run_add_user(args)
        asyncio.run(serve_opcua(args) if args.command == "opcua" else serve_modbus(args))
        return 0
    except (OSError, ValueError) as exc:
        print(f"linewatch-plc: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
