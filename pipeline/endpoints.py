"""The supervisor's HTTP endpoints: /metrics for Prometheus, /healthz and /readyz for the service manager.

They are served by a thread of the supervisor process, so they would go on answering while the
supervisor's own loop is stuck. /healthz therefore answers from the loop's last pass: older than the
bound, it fails (and `linewatch_up` reads 0), and systemd, Docker or Kubernetes restart the box
process. /readyz answers 200 only while the run can inspect parts: every model-side stage ready and
beating, every source connected (or finished) and the store writing; otherwise 503 with the reasons.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


class RunProbe:
    """The loop's last pass and the run's readiness problems, as the supervisor last saw them."""

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s, self._clock = stall_s, clock
        self._last_pass = clock()
        self._problems: tuple[str, ...] = ("starting: the model-side stages are loading",)

    def passed(self) -> None:
        """Called by the supervisor loop on every pass."""
        self._last_pass = self._clock()

    def set_problems(self, problems: Iterable[str]) -> None:
        self._problems = tuple(problems)

    def loop_age_s(self) -> float:
        return self._clock() - self._last_pass

    def live(self) -> tuple[bool, str]:
        age = self.loop_age_s()
        if age > self.stall_s:
            return False, f"supervisor loop stalled: last pass {age:.1f} s ago (bound {self.stall_s:g} s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        if not live:
            return False, why
        problems = self._problems
        return (False, "; ".join(problems)) if problems else (True, "ok")


class EndpointServer:
    """/metrics, /healthz and /readyz on one port, in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, probe: RunProbe) -> None:
        self.registry, self.probe = registry, probe
        self._server: ThreadingHTTPServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        server = ThreadingHTTPServer((host, port), self._handler())
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="endpoints", daemon=True).start()
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry, probe = self.registry, self.probe

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._send(200, encoder(registry), content_type)
                elif path in ("/healthz", "/readyz"):
                    ok, why = probe.live() if path == "/healthz" else probe.ready()
                    self._send(200 if ok else 503, f"{why}\n".encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: /metrics, /healthz, /readyz\n", "text/plain; charset=utf-8")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a scrape every few seconds is not worth a log line

        return Handler
