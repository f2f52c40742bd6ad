"""The dashboard's ASGI app: pages, their JSON, the live stream and the operator's actions.

Pages are static HTML shells; ``static/app.js`` fills them from ``/api/...`` and follows
``/api/stream`` (server-sent events fed by :class:`~flctl.dashboard.EventHub`). Every read goes
through :class:`~flctl.dashboard.AdminSource`, every action through the Admin service with the
dashboard's admin certificate, so the coordinator audits it under that identity.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flctl.core.errors import FlctlError, InvalidInputError
from flctl.core.events import PRIVACY_CHARGED
from flctl.dashboard._hub import EventHub
from flctl.dashboard._security import COOKIE, SECURITY_HEADERS, Access
from flctl.dashboard._source import READ_SEQS, AdminSource
from flctl.dashboard._views import (
    client_view,
    event_view,
    model_view,
    open_round_view,
    round_view,
)
from flctl.transport.grpc import AdminClient

__all__ = ["create_app"]

log = logging.getLogger("flctl.dashboard")


def _DEBUG() -> bool:  # noqa: N802
    """Tracebacks in the log only at DEBUG level (``--debug``)."""
    return log.isEnabledFor(logging.DEBUG)


audit = logging.getLogger("flctl.dashboard.audit")

#: Bounds on what a query string may ask for (ids as the Admin service bounds them).
#: A cached answer is read again after this long even without events (clients' live state and
#: transfer rates change without one).
MAX_AGE_S = 2.0

#: An answer is not read again sooner than this, however many events arrived since: a busy
#: round writes dozens of events a second, and the pages need not re-read the coordinator for
#: each. Pages know the answer is behind (its ``as_of_seq`` is older than the stream's) and
#: ask again.
MIN_AGE_S = 0.5

MAX_ID = 2**63 - 1
MAX_PAGE = 200
_TYPE = re.compile(r"^[a-z_.]{0,64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
_SERIAL = re.compile(r"^[0-9a-fA-F]{1,40}$")

PAGES = {
    "overview": "Overview",
    "rounds": "Rounds",
    "round": "Round",
    "clients": "Clients",
    "models": "Models",
    "diff": "Compare models",
    "events": "Events",
}
NAV = (
    ("/", "overview", "Overview"),
    ("/rounds", "rounds", "Rounds"),
    ("/clients", "clients", "Clients"),
    ("/models", "models", "Models"),
    ("/events", "events", "Events"),
)


_ACTIVE = ' class="active"'


def _is_active(key: str, page: str) -> bool:
    return key == page or (key, page) in (("rounds", "round"), ("models", "diff"))


def _static(name: str) -> str:
    return resources.files("flctl.dashboard").joinpath("static", name).read_text("utf-8")


def _int_param(
    request: Request, name: str, default: int, *, low: int = 0, high: int = MAX_ID
) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or len(text) > 19 or not low <= int(text) <= high:
        raise InvalidInputError(
            f"{name} must be a whole number from {low} to {high}, not {text[:40]!r}"
        )
    return int(text)


def _error(exc: FlctlError, status: int) -> JSONResponse:
    body: dict[str, Any] = {"error": exc.message}
    if exc.hint:
        body["hint"] = exc.hint
    return JSONResponse(body, status_code=status)


class _Guard:
    """ASGI middleware: security headers on every response, the login wall, the Host check."""

    def __init__(self, app: ASGIApp, access: Access, hosts: frozenset[str]) -> None:
        self._app = app
        self._access = access
        self._hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        request = Request(scope)
        host = request.headers.get("host", "")
        if self._hosts and host not in self._hosts:  # DNS rebinding: only our own names
            response: Response = Response("unknown host", status_code=421)
            await response(scope, receive, send_with_headers)
            return
        path = scope["path"]
        public = path in ("/login", "/static/app.css", "/static/favicon.svg", "/healthz")
        if self._access.login_required and not public:
            if not self._access.is_session(request.cookies.get(COOKIE, "")):
                if path.startswith("/api/"):
                    response = JSONResponse({"error": "log in first"}, status_code=401)
                else:
                    response = RedirectResponse("/login", status_code=303)
                await response(scope, receive, send_with_headers)
                return
        await self._app(scope, receive, send_with_headers)


def create_app(
    source: AdminSource,
    hub: EventHub,
    access: Access,
    *,
    hosts: frozenset[str] = frozenset(),
) -> ASGIApp:
    """The dashboard's ASGI app.

    Args:
        source: The Admin connection pages read through.
        hub: The event follower the live stream fans out.
        access: Login, CSRF and whether actions are allowed.
        hosts: ``Host`` headers accepted (empty: any).
    """
    template = string.Template(_static("page.html"))

    def page(name: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            nav = "".join(
                f'<a href="{href}"{_ACTIVE if _is_active(key, name) else ""}>{label}</a>'
                for href, key, label in NAV
            )
            body = template.substitute(
                title=html.escape(PAGES[name]),
                page=name,
                csrf=html.escape(access.csrf),
                actions="on" if access.allow_actions else "off",
                nav=nav,
            )
            return Response(body, media_type="text/html; charset=utf-8")

        return endpoint

    # the dashboard's one cache: answers as sent, by URL. Browsers asking the same between two
    # events (or within MIN_AGE_S) get the same bytes, read and serialized once
    answers: dict[str, tuple[int, float, bytes]] = {}

    def api(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            key = f"{request.url.path}?{request.url.query}"
            now = time.monotonic()
            seq = source.seq
            hit = answers.get(key)
            if hit is not None and (
                now - hit[1] < MIN_AGE_S or (hit[0] == seq and now - hit[1] < MAX_AGE_S)
            ):
                return Response(hit[2], media_type="application/json")
            seqs: list[int] = []
            token = READ_SEQS.set(seqs)
            try:
                body = await fn(request)
                # how recent the answer is: a page whose stream is further ahead asks again
                body["as_of_seq"] = min(seqs) if seqs else seq
                raw = json.dumps(body, separators=(",", ":")).encode()
                if len(answers) > 256:
                    answers.clear()
                answers[key] = (seq, now, raw)
                return Response(raw, media_type="application/json")
            except InvalidInputError as exc:
                return _error(exc, 400)
            except FlctlError as exc:
                return _error(exc, 502 if exc.exit_code in range(30, 40) else 409)
            except Exception as exc:  # a page shows a message, never a stack trace
                log.error("dashboard: %s failed: %s", request.url.path, exc, exc_info=_DEBUG())
                return JSONResponse({"error": f"unexpected error: {exc}"}, status_code=500)
            finally:
                READ_SEQS.reset(token)

        return endpoint

    async def overview(request: Request) -> Any:
        async def read(client: AdminClient) -> Any:
            status, clients, events, privacy = await asyncio.gather(
                client.status(limit=100, phases=False),
                client.list_clients(),
                client.list_events(limit=12),
                client.list_events(limit=1, type_filter=PRIVACY_CHARGED),
            )
            return status, clients, events, privacy

        status, clients, events, privacy = await source.read("overview", read)
        rounds = [round_view(r) for r in status.rounds]
        running = next(
            (r for r in reversed(rounds) if not r["done"] and r["status"] != "queued"), None
        )
        by_state: dict[str, int] = {}
        for c in clients.clients:
            by_state[c.state] = by_state.get(c.state, 0) + 1
        charged = event_view(privacy.events[0])["data"] if privacy.events else None
        return {
            "leader": source.leader,
            "head_version": int(status.head_version),
            "connected_clients": int(status.connected_clients),
            "rounds_total": int(status.rounds_total),
            "queued": sum(1 for r in rounds if r["status"] == "queued"),
            "running": running,
            "open_round": open_round_view(status.open_round)
            if status.HasField("open_round")
            else None,
            "clients_by_state": by_state,
            "chart": [
                {"round": r["round"], "metrics": r["metrics"]}
                for r in rounds
                if r["status"] == "committed"
            ],
            "privacy": None
            if charged is None
            else {k: charged.get(k) for k in ("epsilon", "budget", "delta", "accountant")},
            "events": [event_view(e) for e in events.events],
            "warnings": list(status.warnings),
            "now_unix": time.time(),
        }

    async def rounds(request: Request) -> Any:
        before = _int_param(request, "before", 0)
        limit = _int_param(request, "limit", 50, low=1, high=MAX_PAGE)
        reply = await source.read(
            f"rounds:{before}:{limit}", lambda c: c.status(limit=limit, before_round=before)
        )
        return {
            "rounds": [round_view(r) for r in reversed(reply.rounds)],
            "rounds_total": int(reply.rounds_total),
        }

    async def one_round(request: Request) -> Any:
        server_round = _path_id(request, "round_id")

        async def read(client: AdminClient) -> Any:
            return await asyncio.gather(
                client.status([server_round]),
                client.list_events(server_round=server_round, limit=500),
            )

        status, events = await source.read(f"round:{server_round}", read)
        if not status.rounds:
            raise InvalidInputError(f"there is no round {server_round}")
        timeline = [event_view(e) for e in reversed(events.events)]
        view = round_view(status.rounds[0])
        sizes = {
            e["client_id"]: e["data"]
            for e in timeline
            if e["type"] == "update.accepted" and isinstance(e["data"].get("size"), int)
        }
        for update in view.get("updates", []):
            accepted = sizes.get(update["client_id"])
            if accepted is not None and update["status"] == "accepted":
                update["size"] = accepted["size"]
                update["wire_bytes"] = accepted.get("wire_bytes", accepted["size"])
        return {
            "round": view,
            "events": timeline[-100:],
        }

    async def clients(request: Request) -> Any:
        async def read(client: AdminClient) -> Any:
            return await asyncio.gather(client.list_clients(), client.status(limit=1, phases=False))

        listed, status = await source.read("clients", read)
        live = {}
        if status.HasField("open_round"):
            live = {p.client_id: p for p in status.open_round.participants}
        out = []
        for info in listed.clients:
            view = client_view(info)
            participant = live.get(info.client_id)
            if participant is not None:
                view["round_state"] = participant.state
                view["progress"] = round(participant.progress, 3)
                view["bytes_per_s"] = round(participant.bytes_per_s)
            out.append(view)
        return {"clients": out}

    async def models(request: Request) -> Any:
        limit = _int_param(request, "limit", 100, low=1, high=MAX_PAGE)
        reply = await source.read(f"models:{limit}", lambda c: c.list_models(limit))
        return {
            "head": int(reply.head),
            "models": [model_view(m, int(reply.head)) for m in reply.models],
        }

    async def diff(request: Request) -> Any:
        a = _int_param(request, "a", 0, low=1)
        b = _int_param(request, "b", 0, low=1)
        if not a or not b:
            raise InvalidInputError("give two versions to compare: ?a=VERSION&b=VERSION")
        reply = await source.read(f"diff:{a}:{b}", lambda c: c.list_models(versions=[a, b]))
        found = {int(m.version): model_view(m, int(reply.head)) for m in reply.models}
        for version in (a, b):
            if version not in found:
                raise InvalidInputError(f"there is no model version {version}")
        left, right = found[a], found[b]
        keys = sorted(set(left["metrics"]) | set(right["metrics"]))
        return {
            "a": left,
            "b": right,
            "same_weights": left["digest"] == right["digest"],
            "metrics": [
                {
                    "name": k,
                    "a": left["metrics"].get(k),
                    "b": right["metrics"].get(k),
                    "change": _change(left["metrics"].get(k), right["metrics"].get(k)),
                }
                for k in keys
            ],
        }

    async def events(request: Request) -> Any:
        before = _int_param(request, "before", 0)
        limit = _int_param(request, "limit", 50, low=1, high=MAX_PAGE)
        type_filter = request.query_params.get("type", "")
        if not _TYPE.match(type_filter):
            raise InvalidInputError(f"not an event type: {type_filter[:64]!r}")
        reply = await source.read(
            f"events:{before}:{limit}:{type_filter}",
            lambda c: c.list_events(before_seq=before, limit=limit, type_filter=type_filter),
        )
        return {"events": [event_view(e) for e in reply.events], "last_seq": int(reply.last_seq)}

    async def stream(request: Request) -> Response:
        queue = hub.subscribe()

        async def messages() -> AsyncIterator[str]:
            try:
                while True:
                    try:
                        message = await asyncio.wait_for(queue.get(), timeout=15.0)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if message is None:
                        return  # fell behind: the browser reconnects and reloads
                    yield message
            finally:
                hub.unsubscribe(queue)

        return StreamingResponse(
            messages(),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
        )

    async def action(request: Request) -> Response:
        name = request.path_params["action"]
        who = request.client.host if request.client else "?"
        if not access.allow_actions:
            audit.warning("refused action %s from %s: actions are off", name, who)
            return JSONResponse(
                {"error": "actions are off: start the dashboard with --allow-actions"},
                status_code=403,
            )
        if not access.check_csrf(request.headers.get("x-csrf-token", "")):
            audit.warning("refused action %s from %s: no valid CSRF token", name, who)
            return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
        try:
            body = await _json_body(request)
            done = await _perform(source, name, body)
        except InvalidInputError as exc:
            audit.warning("refused action %s from %s: %s", name, who, exc.message)
            return _error(exc, 400)
        except FlctlError as exc:
            audit.warning("action %s from %s failed: %s", name, who, exc.message)
            return _error(exc, 502 if exc.exit_code in range(30, 40) else 409)
        audit.info("action %s from %s: %s", name, who, done)
        return JSONResponse({"ok": True, "done": done})

    async def login_page(request: Request) -> Response:
        if request.method == "POST":
            raw = (await request.body())[:4096].decode("utf-8", "replace")
            offered = parse_qs(raw).get("token", [""])[0]
            if access.check_token(offered):
                response = RedirectResponse("/", status_code=303)
                response.headers["set-cookie"] = access.cookie(access.new_session())
                return response
            audit.warning(
                "refused login from %s: wrong token", request.client.host if request.client else "?"
            )
            return Response(
                _static("login.html").replace("<!--error-->", '<p class="error">Wrong token.</p>'),
                media_type="text/html; charset=utf-8",
                status_code=403,
            )
        return Response(_static("login.html"), media_type="text/html; charset=utf-8")

    async def healthz(request: Request) -> Response:
        return JSONResponse(hub.link)

    routes = [
        Route("/", page("overview")),
        Route("/rounds", page("rounds")),
        Route("/rounds/{round_id}", page("round")),
        Route("/clients", page("clients")),
        Route("/models", page("models")),
        Route("/models/diff", page("diff")),
        Route("/events", page("events")),
        Route("/login", login_page, methods=["GET", "POST"]),
        Route("/healthz", healthz),
        Route("/api/overview", api(overview)),
        Route("/api/rounds", api(rounds)),
        Route("/api/rounds/{round_id}", api(one_round)),
        Route("/api/clients", api(clients)),
        Route("/api/models", api(models)),
        Route("/api/models/diff", api(diff)),
        Route("/api/events", api(events)),
        Route("/api/stream", stream),
        Route("/api/actions/{action}", action, methods=["POST"]),
        Mount(
            "/static",
            StaticFiles(directory=str(resources.files("flctl.dashboard").joinpath("static"))),
        ),
    ]
    app = Starlette(routes=routes)
    return _Guard(app, access, hosts)


def _path_id(request: Request, name: str) -> int:
    text = str(request.path_params[name])
    if not text.isdigit() or len(text) > 19 or not 1 <= int(text) <= MAX_ID:
        raise InvalidInputError(f"not a round id: {text[:40]!r}")
    return int(text)


def _change(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return round(float(b) - float(a), 6)
    return None


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > 4096:
        raise InvalidInputError("the request is too large")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise InvalidInputError("the request is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidInputError("the request must be a JSON object")
    return body


def _text(body: dict[str, Any], key: str, pattern: re.Pattern[str] = _NAME) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not pattern.match(value):
        raise InvalidInputError(f"{key} is missing or not valid")
    return value


def _version(body: dict[str, Any]) -> int:
    value = body.get("version")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise InvalidInputError("version must be a model version number")
    return value


async def _perform(source: AdminSource, name: str, body: dict[str, Any]) -> str:
    """Carry out one action through the Admin service; say what was done."""
    reason = str(body.get("reason") or "from the dashboard")[:200]
    if name == "rollback":
        version = _version(body)
        reply = await source.call(lambda c: c.rollback(str(version), reason=reason))
        if reply.deferred:
            return f"rollback to version {version}: deferred until the open round ends"
        return f"rolled back to version {version}'s weights: new head version {reply.version}"
    if name == "tag":
        version = _version(body)
        tag = _text(body, "name")
        force = body.get("force") is True
        await source.call(lambda c: c.tag(str(version), tag, force=force))
        return f"tagged version {version} as {tag}"
    if name == "cancel":
        value = body.get("round")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise InvalidInputError("round must be a round id")
        ids = [value] if value else None
        cancelled = await source.call(lambda c: c.cancel_round(ids, reason=reason))
        return cancelled.message or f"cancelled rounds {list(cancelled.cancelled)}"
    if name == "evict":
        client_id = _text(body, "client_id")
        await source.call(lambda c: c.evict(client_id, reason=reason))
        return f"evicted {client_id}"
    if name == "revoke":
        identity = _text(body, "identity")
        await source.call(lambda c: c.revoke(identity, reason=reason))
        return f"revoked {identity}"
    raise InvalidInputError(f"no such action: {name[:40]!r}")
