"""``flctl dashboard`` as a person uses it: a real coordinator, 3 clients, a headless Chromium.

The browser is Debian's ``chromium`` (installed by ``.ci/run``); Playwright drives it and never
downloads one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from .conftest import Processes, flctl, one_json, serve, wait_for

pytestmark = pytest.mark.timeout(300)

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"
# Debian's package; elsewhere point FLCTL_CHROMIUM at a Chromium or Chrome binary
CHROMIUM = os.environ.get("FLCTL_CHROMIUM", "/usr/bin/chromium")


def _project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text(
        '[project]\ntask = "tiny_task.py"\n[rounds]\nmin_clients = 3\n'
    )
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    flctl("certs", "gen", "--clients", "3", cwd=proj, check=True)
    return proj


def _dashboard(processes: Processes, proj: Path, *args: str) -> str:
    processes.start("dashboard", "dashboard", "--address", "127.0.0.1:0", *args, cwd=proj)

    def url() -> str | None:
        found = re.search(r"dashboard: (http://\S+)", processes.log("dashboard"))
        return found.group(1) if found else None

    return str(wait_for(url, timeout=60, what="the dashboard listening"))


def _points(page: Page) -> int:
    return page.locator("#chart circle.point[data-metric=accuracy]").count()


def test_a_round_started_from_the_cli_shows_live_and_an_action_is_audited(
    tmp_path: Path, processes: Processes
) -> None:
    proj = _project(tmp_path)
    _, address = serve(processes, "coordinator", proj)
    for client in ("c1", "c2", "c3"):
        processes.start(client, "join", "--client-id", client, "--server", address, cwd=proj)
    base = _dashboard(processes, proj, "--allow-actions")

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base)
            page.wait_for_selector("#link.up", timeout=30_000)
            expect(page.locator("#clients .value")).to_have_text("3 idle", timeout=60_000)
            assert _points(page) == 0
            navigations: list[str] = []
            page.on("framenavigated", lambda frame: navigations.append(frame.url))

            flctl("round", "start", "--rounds", "1", cwd=proj, check=True)
            # the round appears, runs and commits on the page, without a reload (the overview
            # lists only the last 12 events, which a busy round can scroll past between two
            # refreshes: the cards and the chart are what must move)
            expect(page.locator("#rounds-total .value")).to_contain_text("1 (", timeout=60_000)
            points = page.locator("#chart circle.point[data-metric=accuracy]")
            expect(points).to_have_count(1, timeout=120_000)
            expect(page.locator("#head .value")).to_have_text("v2", timeout=10_000)
            assert navigations == []  # all of it arrived without a reload

            # an action: confirmed in the page's dialog, performed through the Admin service
            page.goto(f"{base}models")
            row = page.locator("#models tr[data-version='1']")
            row.locator("button[data-action=tag]").click()
            page.fill("#confirm-input", "baseline")
            page.click("#confirm-yes")
            page.wait_for_selector("#banner.ok", timeout=10_000)
            assert "tagged version 1 as baseline" in page.inner_text("#banner")
            expect(row).to_contain_text("baseline", timeout=10_000)
            # cancelled in the dialog: nothing happens
            row.locator("button[data-action=rollback]").click()
            page.click("#confirm-no")

            # without the CSRF token: refused, and the refusal is logged
            refused = page.request.post(
                f"{base}api/actions/rollback", data=json.dumps({"version": 1})
            )
            assert refused.status == 403

            for path in ("rounds", "rounds/1", "clients", "models/diff?a=1&b=2", "events"):
                page.goto(f"{base}{path}")
                page.wait_for_selector("body[data-loaded]")
                if path == "events":  # the round's story, in the log's page
                    for kind in ("round.queued", "round.started", "round.committed"):
                        expect(page.locator(f"#events tr[data-type='{kind}']")).to_have_count(1)
                if path == "rounds/1":  # how long it trained, from its events
                    expect(page.locator("#phases")).to_contain_text("training")
            assert page.locator("#events tr").count() > 5
        finally:
            browser.close()
    assert errors == []

    audit = one_json(flctl("events", "--type", "admin", "--json", cwd=proj, check=True).stdout)
    tagged = [e for e in audit["events"] if e["type"] == "model.tagged"]
    assert tagged and tagged[-1]["actor"] == "admin"
    rollbacks = [e for e in audit["events"] if e["type"].startswith("model.rollback")]
    assert rollbacks == []  # the cancelled and the refused ones did nothing
    assert "refused action rollback" in processes.log("dashboard")


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_a_wrong_server_shows_a_clear_error_and_bad_input_is_refused(
    tmp_path: Path, processes: Processes
) -> None:
    proj = _project(tmp_path)
    base = _dashboard(processes, proj, "--server", "127.0.0.1:9")  # nothing listens there
    status, body = _get(f"{base}api/overview")
    assert status == 502 and "127.0.0.1:9" in body["error"]
    status, body = _get(f"{base}api/rounds?limit=100000")
    assert status == 400 and "limit" in body["error"]
    status, body = _get(f"{base}api/events?type=%3Cscript%3E")
    assert status == 400
    request = urllib.request.Request(f"{base}api/actions/evict", data=b"{}", method="POST")
    try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError("an action was accepted without --allow-actions")
    except urllib.error.HTTPError as exc:
        assert exc.code == 403 and "--allow-actions" in json.loads(exc.read())["error"]
    with urllib.request.urlopen(base, timeout=10) as response:
        headers = response.headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
    log = processes.log("dashboard")
    assert "Traceback" not in log and "refused action evict" in log

    # a certificate the project does not have: the page says which, in words
    processes.stop("dashboard")
    base = _dashboard(processes, proj, "--admin", "nobody", "--server", "127.0.0.1:9")
    status, body = _get(f"{base}api/overview")
    assert status >= 400 and "nobody.crt not found" in body["error"]
    assert processes.log("dashboard").count("nobody.crt not found") == 1  # said once

    refused = flctl("dashboard", "--address", "0.0.0.0:0", cwd=proj)
    assert refused.returncode != 0 and "HTTPS" in refused.stderr
    assert "Traceback" not in refused.stderr
