"""The operator page: a Starlette app over the verdict store, the image archive and the live feed.

- `/`: live view per camera (parts as they are stored, rejects with their overlay, counts and reject rate
  over `ui.window_min` against the calibrated bound, pipeline health), pushed as server-sent events;
- `/history`: a search of the store (time, camera, verdict, score), paged; `/history.csv` and
  `/history.zip` export the same search (rows, and rows with images);
- `/part/RUN/SEQ`: one part (frame, overlay, score, threshold, bundle, times) with its reviews, and the
  review form for a logged-in user;
- `/model`: the bundle in use and its calibration report.

It reads the store and the archive and writes only labels; it is never on the verdict path.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from pipeline.station import access
from pipeline.station.health import HealthSource
from pipeline.station.history import (
    EXPORT_ROWS,
    PAGE_ROWS,
    VERDICTS,
    QueryError,
    history_filter,
    iso,
    write_zip,
)
from pipeline.station.live import LiveHub
from pipeline.station.settings import BundleSummary, StationSettings
from pipeline.store.feed import feed_item
from pipeline.store.keys import image_path
from pipeline.store.records import write_csv
from pipeline.store.reviews import LABELS, ReviewError, Reviews
from pipeline.store.selftests import SelfTestLog
from pipeline.store.switches import BundleSwitch, SwitchLog
from pipeline.store.verdicts import HistoryFilter, StoreError, VerdictStore

HERE = Path(__file__).parent
STATS_EVERY_S = 2.0  # live view: counts, rate and health refreshed this often
SESSION_MAX_AGE_S = 12 * 3600  # one shift
SWITCH_TIMEOUT_S = 120.0  # a changeover asked from the page: loading a bundle may take that long on a GPU box
_REPORT_FILE = re.compile(r"[A-Za-z0-9_.-]+\.(png|html)")

Handler = Callable[[Request], Awaitable[Response]]


class Station:
    """The page's handlers and what they read."""

    def __init__(
        self, settings: StationSettings, store: VerdictStore, hub: LiveHub | None, health: HealthSource
    ) -> None:
        self.settings, self.store, self.hub, self.health = settings, store, hub, health
        self.reviews = Reviews(store)
        self.archive = Path(settings.archive)
        self.login_to_read = not access.is_loopback(settings.host)
        self.closing = asyncio.Event()  # set when the page stops: live views end their streams themselves
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self.templates.env.filters["iso"] = iso

    # -- guards ------------------------------------------------------------------------------------------

    def readable(self, handler: Handler) -> Handler:
        """`handler`, behind a login when the page is reachable from other machines."""

        async def guarded(request: Request) -> Response:
            if self.login_to_read and access.user_of(request) is None:
                if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                    return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
                return PlainTextResponse("log in first", status_code=401)
            return await handler(request)

        return guarded

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context |= {
            "user": access.user_of(request),
            "csrf": access.csrf_token(request),
            "bundle": self.settings.bundle,
            "login_to_read": self.login_to_read,
        }
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def error(self, request: Request, status: int, message: str) -> Response:
        return self.page(request, "message.html", status, title="Not possible", message=message)

    def stale_form(self, request: Request) -> Response:
        return self.error(request, 403, "the form is out of date (CSRF token missing or wrong): reload the page")

    # -- live view ---------------------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return self.page(request, "live.html", cameras=self.settings.cameras, window_min=self.settings.window_min)

    def stats(self) -> dict[str, Any]:
        """Per camera, the verdicts of the last window_min from the store; the pipeline's health; the bound."""
        now = time.time_ns()
        since = now - int(self.settings.window_min * 60e9)
        cameras = self.settings.cameras or tuple(sorted({str(i["camera_id"]) for i in self._recent()}))
        counts = {}
        for camera in cameras:
            found = self.store.verdict_counts(HistoryFilter(since_ns=since, camera=camera))
            total = sum(found.values())
            rejects = found.get("reject", 0)
            counts[camera] = {**{v: found.get(v, 0) for v in VERDICTS}, "total": total,
                              "reject_rate": rejects / total if total else None}  # fmt: skip
        bundle = self.settings.bundle
        age = self.hub.heartbeat_age_s() if self.hub else None
        beat = self.hub.heartbeat if self.hub else None
        return {
            "window_min": self.settings.window_min,
            "counts": counts,
            "target_fpr": bundle.target_fpr if bundle else None,
            "confidence": bundle.confidence if bundle else None,
            "health": self.health.snapshot(),
            "heartbeat": None
            if beat is None
            else {"age_s": age, "health": beat.health, "problems": beat.problems, "seq": beat.seq},  # fmt: skip
        }

    def _recent(self) -> list[dict[str, Any]]:
        """The latest parts: the live feed's memory, or the store's newest rows when the feed has none yet."""
        if self.hub is not None and (parts := self.hub.snapshot()):
            return parts
        rows = self.store.search(HistoryFilter(limit=60 * max(1, len(self.settings.cameras))))
        return [feed_item(r) for r in reversed(rows)]

    async def events(self, request: Request) -> Response:
        queue = self.hub.subscribe() if self.hub else None

        async def stream() -> AsyncIterator[str]:
            try:
                recent = await run_in_threadpool(self._recent)
                yield _event("snapshot", {"parts": recent, "stats": await run_in_threadpool(self.stats)})
                next_stats = time.monotonic() + STATS_EVERY_S
                while True:
                    wait = max(0.0, next_stats - time.monotonic())
                    items = await _next_batch(queue, wait, self.closing)
                    if items is None:
                        return  # the page is stopping: the browser reconnects to the next one
                    if items:
                        yield _event("parts", items)
                    if time.monotonic() >= next_stats:
                        yield _event("stats", await run_in_threadpool(self.stats))
                        next_stats = time.monotonic() + STATS_EVERY_S
            finally:
                if queue is not None and self.hub is not None:
                    self.hub.unsubscribe(queue)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def status(self, request: Request) -> Response:
        return Response(json.dumps(await run_in_threadpool(self.stats)), media_type="application/json")

    # -- history -----------------------------------------------------------------------------------------

    async def history(self, request: Request) -> Response:
        try:
            f, page = history_filter(request.query_params)
        except QueryError as exc:
            return self.error(request, 400, str(exc))
        rows, counts = await run_in_threadpool(lambda: (self.store.search(f), self.store.verdict_counts(f)))
        total = sum(counts.values())
        query = {k: v for k, v in request.query_params.items() if k != "page"}
        return self.page(
            request, "history.html", rows=rows, counts=counts, total=total, page=page,
            pages=max(1, -(-total // PAGE_ROWS)), query=query, params=request.query_params,
            cameras=self.settings.cameras, verdicts=VERDICTS,
        )  # fmt: skip

    async def export_csv(self, request: Request) -> Response:
        f = _export_filter(request)
        if isinstance(f, Response):
            return f
        rows = await run_in_threadpool(self.store.search, f)
        out = io.StringIO()
        write_csv(rows, out)
        headers = {"Content-Disposition": 'attachment; filename="linewatch-verdicts.csv"'}
        return Response(out.getvalue(), media_type="text/csv", headers=headers)

    async def export_zip(self, request: Request) -> Response:
        f = _export_filter(request)
        if isinstance(f, Response):
            return f

        def build() -> bytes:
            with tempfile.SpooledTemporaryFile(max_size=64 << 20) as out:
                write_zip(self.store.search(f), self.archive, out)
                out.seek(0)
                return out.read()

        headers = {"Content-Disposition": 'attachment; filename="linewatch-verdicts.zip"'}
        return Response(await run_in_threadpool(build), media_type="application/zip", headers=headers)

    # -- one part and its review -------------------------------------------------------------------------

    async def part(self, request: Request) -> Response:
        run, seq = request.path_params["run"], request.path_params["seq"]
        found = await run_in_threadpool(self.store.range, run, seq, seq)
        if not found:
            return self.error(request, 404, f"no verdict {run}/{seq} in the store")
        row = found[0]
        labels = await run_in_threadpool(self.reviews.labels_of, run, seq)
        choices = [name for name, kind in LABELS.items() if kind == row.verdict.verdict]
        return self.page(request, "part.html", row=row, labels=labels, choices=choices)

    async def label(self, request: Request) -> Response:
        run, seq = request.path_params["run"], request.path_params["seq"]
        posted = await self.user_form(request, "reviewing")
        if isinstance(posted, Response):
            return posted
        form, user = posted
        try:
            await run_in_threadpool(
                self.reviews.add_label, run, seq, str(form.get("label", "")), str(form.get("note", "")), user,
                time.time_ns(),
            )  # fmt: skip
        except ReviewError as exc:
            return self.error(request, 400, str(exc))
        return RedirectResponse(f"/part/{run}/{seq}", status_code=303)

    async def user_form(self, request: Request, what: str) -> tuple[Any, str] | Response:
        """(form, user) of a form a logged-in user posted; else the page that says why not (a stale form, or
        `what` needs a user)."""
        form = await request.form()
        if not access.csrf_ok(request, form.get("csrf")):
            return self.stale_form(request)
        user = access.user_of(request)
        if user is None:
            return self.error(request, 403, f"{what} needs a user: log in first")
        return form, user

    async def image(self, request: Request) -> Response:
        kind = request.query_params.get("kind", "frame")
        try:
            path = image_path(self.archive, request.path_params["key"], kind)  # type: ignore[arg-type]
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=404)
        resolved = path.resolve()
        if not resolved.is_relative_to(self.archive.resolve()) or not resolved.is_file():
            return PlainTextResponse("no such image (expired, or never kept)", status_code=404)
        return FileResponse(resolved, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    # -- model -------------------------------------------------------------------------------------------

    async def model(self, request: Request) -> Response:
        switches = await run_in_threadpool(SwitchLog(self.store).recent, 50)
        selftests = await run_in_threadpool(SelfTestLog(self.store).recent, 20)
        st = self.settings
        switchable = bool(st.recipes) and st.control_address is not None and access.user_of(request) is not None
        return self.page(request, "model.html", run=st.run, cameras=self.deciding(switches), switches=switches,
                         selftests=selftests, switchable=switchable, recipes=st.recipes)  # fmt: skip

    async def switch(self, request: Request) -> Response:
        """A logged-in user puts a camera on a recipe: the same request `linewatch switch` sends."""
        from pipeline.changeover import SwitchRequest, ask_switch

        posted = await self.user_form(request, "a changeover")
        if isinstance(posted, Response):
            return posted
        form, user = posted
        address = self.settings.control_address
        if address is None or self.settings.run is None:
            return self.error(request, 409, "no run on this box takes changeover requests")
        camera, recipe = str(form.get("camera", "")), str(form.get("recipe", ""))
        want = SwitchRequest(camera, recipe=recipe, by=f"operator:{user}")
        try:
            outcome = await run_in_threadpool(ask_switch, address, want, SWITCH_TIMEOUT_S)
        except (OSError, ValueError) as exc:
            return self.error(request, 503, str(exc))
        if not outcome.switched:
            return self.error(request, 409, f"switch refused: {outcome.error}")
        return RedirectResponse("/model", status_code=303)

    def deciding(self, switches: list[BundleSwitch]) -> list[tuple[str, str, BundleSummary | None]]:
        """(camera, hash, the bundle's summary when it is the one it started with) of each camera of the run: its
        last switch made in this run, else the bundle it started with."""
        out = []
        for camera, start in self.settings.camera_bundles.items():
            made = [
                w
                for w in switches
                if w.made and not w.shadow and w.run_id == self.settings.run and w.camera_id == camera
            ]
            now = made[0].to_bundle if made and made[0].to_bundle else start.hash
            out.append((camera, now, start if now == start.hash else None))
        return out

    async def report(self, request: Request) -> Response:
        bundle = self.settings.bundle
        name = request.path_params.get("name", "report.html")
        if bundle is None or bundle.report is None or not _REPORT_FILE.fullmatch(name):
            return PlainTextResponse("no calibration report beside the bundle", status_code=404)
        path = Path(bundle.report).parent / name
        if not path.is_file():
            return PlainTextResponse(f"{name}: not in the calibration report's folder", status_code=404)
        return FileResponse(path)

    # -- login -------------------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return self.page(request, "login.html", next=access.local_path(request.query_params.get("next")))

    async def login(self, request: Request) -> Response:
        form = await request.form()
        target = access.local_path(str(form.get("next", "/")))
        if not access.csrf_ok(request, form.get("csrf")):
            return self.stale_form(request)
        name, password = str(form.get("user", "")), str(form.get("password", ""))
        if not await run_in_threadpool(self.reviews.authenticate, name, password):
            return self.page(request, "login.html", 401, next=target, failed=True)
        access.log_in(request, name)
        return RedirectResponse(target, status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not access.csrf_ok(request, form.get("csrf")):
            return self.stale_form(request)
        request.session.clear()
        return RedirectResponse("/", status_code=303)


def _export_filter(request: Request) -> HistoryFilter | Response:
    """The whole search an export URL asks for (no page), or the 400 naming the bad parameter."""
    try:
        return history_filter({**request.query_params, "page": "1"}, limit=EXPORT_ROWS)[0]
    except QueryError as exc:
        return PlainTextResponse(str(exc), status_code=400)


async def _next_batch(
    queue: asyncio.Queue[list[dict[str, Any]]] | None, wait_s: float, closing: asyncio.Event
) -> list[dict[str, Any]] | None:
    """Everything the live feed has queued, waiting up to `wait_s` for the first batch; None once `closing`."""
    waits = {asyncio.ensure_future(closing.wait())}
    getter = asyncio.ensure_future(queue.get()) if queue is not None else None
    if getter is not None:
        waits.add(getter)
    done, pending = await asyncio.wait(waits, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if closing.is_set():
        return None
    if getter is None or getter not in done:
        return []
    items = list(getter.result())
    while queue is not None and not queue.empty():
        items += queue.get_nowait()
    return items


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(settings: StationSettings, store: VerdictStore, hub: LiveHub | None, health: HealthSource) -> Starlette:
    s = Station(settings, store, hub, health)
    read = s.readable
    routes = [
        Route("/", read(s.live)),
        Route("/live/events", read(s.events)),
        Route("/api/status", read(s.status)),
        Route("/history", read(s.history)),
        Route("/history.csv", read(s.export_csv)),
        Route("/history.zip", read(s.export_zip)),
        Route("/part/{run}/{seq:int}", read(s.part)),
        Route("/part/{run}/{seq:int}/label", s.label, methods=["POST"]),
        Route("/image/{key:path}", read(s.image)),
        Route("/model", read(s.model)),
        Route("/model/switch", s.switch, methods=["POST"]),
        Route("/model/report/", read(s.report)),
        Route("/model/report/{name}", read(s.report)),
        Route("/login", s.login_form, methods=["GET"]),
        Route("/login", s.login, methods=["POST"]),
        Route("/logout", s.logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    secret = access.session_secret(Path(settings.data))
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=secret,
            session_cookie=access.SESSION_COOKIE,
            max_age=SESSION_MAX_AGE_S,
            same_site="strict",
        )  # fmt: skip
    ]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={StoreError: _store_error})
    app.state.station = s
    return app


async def _store_error(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"the verdict store cannot be read now: {exc}", status_code=503)
