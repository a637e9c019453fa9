"""systemd's notify protocol: READY=1, WATCHDOG=1, STATUS= and STOPPING=1 on $NOTIFY_SOCKET.

Outside a `Type=notify` unit there is no socket and every call does nothing. The watchdog is pinged
from the supervisor loop itself, never from a thread: a loop that stalls stops the pings, and systemd
restarts the service after `WatchdogSec`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class ServiceNotifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        # An abstract socket is given as "@name" and addressed with a leading NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None
        mine = environ.get("WATCHDOG_PID") in (None, str(os.getpid()))
        usec = environ.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else 0.0
        self._last_ping = 0.0
        self._status = ""

    def send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError:
            pass  # systemd gone or the socket unreachable: the line must not care

    def ready(self) -> None:
        self.send("READY=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        """STATUS= for `systemctl status`, sent only when it changes."""
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    def watchdog(self, now_s: float | None = None) -> None:
        """Ping the watchdog, at most four times per `WatchdogSec`."""
        now_s = time.monotonic() if now_s is None else now_s
        if self.watchdog_s and now_s - self._last_ping >= self.watchdog_s / 4:
            self._last_ping = now_s
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
