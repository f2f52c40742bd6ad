"""The dashboard's login wall, cookies and Host check, on a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import socket
from typing import Any

import uvicorn

from flctl.core.errors import ConnectError
from flctl.dashboard import Access, AdminSource, EventHub, create_app
from flctl.transport.grpc import AdminClient


async def _nowhere() -> tuple[AdminClient, str]:
    raise ConnectError("no coordinator at 127.0.0.1:9 (made by the test)")


def _request(
    port: int, method: str, path: str, *, body: str = "", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read().decode(),
        )
    finally:
        conn.close()


def test_off_loopback_every_page_needs_the_login_token_and_the_cookie_it_sets() -> None:
    access = Access(login_required=True, secure_cookies=False, allow_actions=True)

    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        source = AdminSource(_nowhere)
        app = create_app(source, EventHub(source), access, hosts=frozenset({f"127.0.0.1:{port}"}))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                await asyncio.sleep(0.02)

            def call(*args: Any, **kwargs: Any) -> Any:
                return asyncio.to_thread(_request, port, *args, **kwargs)

            status, headers, _ = await call("GET", "/")
            assert status == 303 and headers["location"] == "/login"
            status, _, body = await call("GET", "/api/overview")
            assert status == 401 and "log in" in body
            status, headers, body = await call("GET", "/login")
            assert status == 200 and 'name="token"' in body
            assert "frame-ancestors 'none'" in headers["content-security-policy"]

            form = {"content-type": "application/x-www-form-urlencoded"}
            status, headers, body = await call("POST", "/login", body="token=wrong", headers=form)
            assert status == 403 and "Wrong token" in body and "set-cookie" not in headers

            status, headers, _ = await call(
                "POST", "/login", body=f"token={access.token}", headers=form
            )
            assert status == 303
            cookie = headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            session = {"cookie": cookie.split(";", 1)[0]}
            status, _, body = await call("GET", "/api/overview", headers=session)
            assert status == 502 and "127.0.0.1:9" in body  # in: the coordinator's error, in words
            status, _, body = await call("GET", "/", headers=session)
            assert status == 200 and access.csrf in body

            # a forged session and another Host are refused
            forged = {"cookie": "flctl_session=" + "x" * 43}
            assert (await call("GET", "/api/overview", headers=forged))[0] == 401
            rebound = {**session, "host": f"evil.example:{port}"}
            assert (await call("GET", "/", headers=rebound))[0] == 421

            # actions: the CSRF token is required even with a session
            status, _, body = await call(
                "POST", "/api/actions/evict", body='{"client_id": "c1"}', headers=session
            )
            assert status == 403 and "CSRF" in body
            status, _, body = await call(
                "POST",
                "/api/actions/evict",
                body='{"client_id": "c1; rm"}',
                headers={**session, "x-csrf-token": access.csrf},
            )
            assert status == 400 and "client_id" in body
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)

    asyncio.run(main())
