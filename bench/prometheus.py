"""A real Prometheus server scraping ``flctl serve``'s /metrics during a demo-like run.

The run is ``flctl demo``'s, by hand (``demo`` starts its own ``serve`` and takes no metrics
option): a digits project (``flctl init``, ``[data] num_partitions`` and ``[rounds]
min_clients`` set to the clients, ``[server] metrics_address`` set to a free loopback port),
``flctl certs gen``, one ``flctl serve`` and N ``flctl join`` processes, and rounds queued one
after the other (``flctl round start --wait``) for ``--seconds``. Prometheus (Debian's
``prometheus`` package, ``/usr/bin/prometheus``; ``--prometheus`` names another binary) runs
with a configuration of its own in a temporary folder, scraping the coordinator every
``--scrape-interval`` seconds. When the time is up the script waits two scrape intervals,
asks Prometheus' HTTP API for ``flctl_rounds_total`` (``/api/v1/query``), prints what it
answered and compares it with the rounds that ``round start`` saw commit. It exits 1 when
they differ, or when Prometheus never scraped the target.

    python bench/prometheus.py [--seconds 60] [--clients 3] [--scrape-interval 2]
        [--prometheus /usr/bin/prometheus] [--root DIR] [--keep] [--json]

Every process it starts is stopped, by pid, at the end; the temporary folder is removed
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

FLCTL = [sys.executable, "-m", "flctl"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env()
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class Processes:
    """Background processes, each stopped by its pid at the end (SIGTERM, then SIGKILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                args,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(),
            )
        self.procs[name] = proc
        return proc

    def check(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"{name} exited {proc.returncode}:\n{tail}")

    def stop_all(self) -> None:
        # clients first, then the coordinator, then Prometheus
        order = sorted(self.procs, key=lambda n: (n == "prometheus", n == "coordinator"))
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_until(what: str, check: Any, timeout: float, step: float = 0.2) -> Any:  # noqa: ANN401
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise SystemExit(f"{what}: not within {timeout:g} s")


def http_get(url: str, timeout: float = 10) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return bytes(reply.read())
    except (urllib.error.URLError, ConnectionError):
        return None


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    """An instant query through Prometheus' HTTP API: its result vector."""
    body = http_get(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    if body is None:
        raise SystemExit(f"Prometheus did not answer the query {expr!r}")
    answer = json.loads(body)
    if answer.get("status") != "success":
        raise SystemExit(f"Prometheus refused {expr!r}: {answer}")
    return list(answer["data"]["result"])


def set_key(text: str, table: str, key: str, value: str) -> str:
    """``key = value`` in ``[table]`` of a flctl.toml: replaced where it is, else added."""
    lines = text.splitlines()
    start = lines.index(f"[{table}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    for i in range(start + 1, end):
        if lines[i].split("=", 1)[0].strip() == key:
            lines[i] = f"{key} = {value}"
            break
    else:
        lines.insert(start + 1, f"{key} = {value}")
    return "\n".join(lines) + "\n"


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    logs = root / "logs"
    logs.mkdir()
    procs = Processes(logs)
    metrics_port, web_port = free_port(), free_port()
    try:
        run([*FLCTL, "init", "proj", "--template", "digits"], cwd=root)
        proj = root / "proj"
        toml = proj / "flctl.toml"
        text = toml.read_text()
        text = set_key(text, "data", "num_partitions", str(args.clients))
        text = set_key(text, "rounds", "min_clients", str(args.clients))
        text = set_key(text, "server", "metrics_address", f'"127.0.0.1:{metrics_port}"')
        toml.write_text(text)
        run([*FLCTL, "certs", "gen", "--clients", str(args.clients)], cwd=proj)

        serve = procs.start(
            "coordinator",
            [*FLCTL, "serve", "--address", "127.0.0.1:0", "--no-tui", "--drain-timeout", "0"],
            proj,
        )

        def listening() -> str | None:
            procs.check("coordinator")
            try:
                info = json.loads((proj / ".flctl" / "serve.json").read_text())
            except (OSError, ValueError):
                return None
            return str(info["address"]) if info.get("pid") == serve.pid else None

        address = wait_until("the coordinator listening", listening, 180)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_until("/metrics answering", lambda: http_get(metrics_url), 30)
        for i in range(1, args.clients + 1):
            procs.start(
                f"c{i}",
                [
                    *FLCTL,
                    "join",
                    "--server",
                    address,
                    "--client-id",
                    f"c{i}",
                    "--partition",
                    str(i - 1),
                    "--num-partitions",
                    str(args.clients),
                    "--threads",
                    "1",
                ],
                proj,
            )

        config = root / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {args.scrape_interval}s\n"
            f"  evaluation_interval: {args.scrape_interval}s\n"
            "scrape_configs:\n"
            "  - job_name: flctl\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{metrics_port}']\n"
        )
        procs.start(
            "prometheus",
            [
                args.prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
                "--log.level=warn",
            ],
            root,
        )
        prometheus = f"http://127.0.0.1:{web_port}"
        wait_until("Prometheus ready", lambda: http_get(f"{prometheus}/-/ready"), 60)
        version = json.loads(http_get(f"{prometheus}/api/v1/status/buildinfo") or b"{}")

        started = time.monotonic()
        committed = failed = 0
        while time.monotonic() - started < args.seconds:
            procs.check("coordinator")
            result = subprocess.run(
                [*FLCTL, "round", "start", "--wait", "--json", "--server", address],
                cwd=proj,
                capture_output=True,
                text=True,
                timeout=600,
                env=_env(),
            )
            try:
                rounds = json.loads(result.stdout)["rounds"]
            except (ValueError, KeyError):
                raise SystemExit(f"round start: {result.stdout}{result.stderr}") from None
            committed += sum(r["status"] == "committed" for r in rounds)
            failed += sum(r["status"] != "committed" for r in rounds)
            print(
                f"{time.monotonic() - started:6.1f} s  round {rounds[0]['round']}: "
                f"{rounds[0]['status']}",
                flush=True,
            )
        run_s = time.monotonic() - started
        time.sleep(2 * args.scrape_interval + 1)  # the last round reaches a scrape

        expr = "flctl_rounds_total"
        answer = query(prometheus, expr)
        by_status = {r["metric"].get("status", ""): float(r["value"][1]) for r in answer}
        scrapes = query(prometheus, f"count_over_time(up{{job='flctl'}}[{int(run_s) + 120}s])")
        up = query(prometheus, "up{job='flctl'}")
        return {
            "prometheus": version.get("data", {}).get("version"),
            "seconds": round(run_s, 1),
            "clients": args.clients,
            "scrape_interval_s": args.scrape_interval,
            "rounds_committed_flctl": committed,
            "rounds_not_committed_flctl": failed,
            "query": expr,
            "answer": answer,
            "rounds_total_by_status": by_status,
            "scrapes": int(float(scrapes[0]["value"][1])) if scrapes else 0,
            "up": float(up[0]["value"][1]) if up else 0.0,
        }
    finally:
        procs.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long rounds run")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--scrape-interval", type=int, default=2, help="seconds")
    parser.add_argument("--prometheus", default="/usr/bin/prometheus")
    parser.add_argument("--root", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    if shutil.which(args.prometheus) is None:
        raise SystemExit(
            f"no Prometheus at {args.prometheus}: apt-get install prometheus (or --prometheus)"
        )
    root = Path(args.root or tempfile.mkdtemp(prefix="flctl-prometheus-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        summary = bench(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print()
        print(f"Prometheus {summary['prometheus']} scraped /metrics {summary['scrapes']} times")
        print(f"GET /api/v1/query?query={summary['query']} ->")
        for item in summary["answer"]:
            print(f"  {json.dumps(item['metric'], sort_keys=True)} {item['value'][1]}")
        print(
            f"rounds committed in {summary['seconds']} s with {summary['clients']} clients: "
            f"flctl {summary['rounds_committed_flctl']}, Prometheus "
            f"{summary['rounds_total_by_status'].get('committed', 0):g}"
        )
    same = summary["rounds_total_by_status"].get("committed") == summary["rounds_committed_flctl"]
    if not same or summary["scrapes"] == 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
