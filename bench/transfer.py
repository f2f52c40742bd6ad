"""Transfer speed: flctl's Download and Upload against the raw gRPC ceiling, over mutual TLS.

In one run, on 127.0.0.1 with the project's certificates:

- raw ceiling: a bare grpc.aio server in its own process; a client-stream and a
  server-stream of 1 MiB byte chunks (identity serializers, no hashing);
- flctl: `flctl serve` in its own process with a model of the same size; this process joins
  as a client and times Download (first byte to last byte hashed; the client's fsync is
  printed on its own line) and Upload (BeginUpload, then first byte sent to the
  coordinator's "accepted": streamed to its part file, hashed, every tensor checked against
  the model, fsynced and renamed into the blob store). The coordinator's fsync+rename time is
  printed on its own line. Each run uploads a different update (its own digest), as rounds
  do, and the page cache is written back before each run.

    python bench/transfer.py [--size-mb 500] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20

RAW_SERVER = r"""
import asyncio, sys
import grpc
cert, key, ca, size = open(sys.argv[1],'rb').read(), open(sys.argv[2],'rb').read(), open(sys.argv[3],'rb').read(), int(sys.argv[4])
CHUNK = 1 << 20
payload = bytes(CHUNK)
async def up(it, ctx):
    n = 0
    async for b in it:
        n += len(b)
    return n.to_bytes(8, 'little')
async def down(req, ctx):
    for _ in range(size // CHUNK):
        yield payload
async def main():
    opts = [("grpc.max_send_message_length", CHUNK + 65536), ("grpc.max_receive_message_length", CHUNK + 65536)]
    server = grpc.aio.server(options=opts)
    ident = lambda b: b
    handler = grpc.method_handlers_generic_handler("raw.Raw", {
        "Up": grpc.stream_unary_rpc_method_handler(up, request_deserializer=ident, response_serializer=ident),
        "Down": grpc.unary_stream_rpc_method_handler(down, request_deserializer=ident, response_serializer=ident),
    })
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


async def raw_ceiling(certs: Path, size: int, repeat: int) -> dict[str, list[float]]:
    import grpc

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RAW_SERVER,
            str(certs / "server.crt"),
            str(certs / "server.key"),
            str(certs / "ca.crt"),
            str(size),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        creds = grpc.ssl_channel_credentials(
            root_certificates=(certs / "ca.crt").read_bytes(),
            private_key=(certs / "c1.key").read_bytes(),
            certificate_chain=(certs / "c1.crt").read_bytes(),
        )
        opts = [
            ("grpc.max_send_message_length", MiB + 65536),
            ("grpc.max_receive_message_length", MiB + 65536),
        ]
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts) as channel:
            ident = lambda b: b  # noqa: E731
            up = channel.stream_unary(
                "/raw.Raw/Up", request_serializer=ident, response_deserializer=ident
            )
            down = channel.unary_stream(
                "/raw.Raw/Down", request_serializer=ident, response_deserializer=ident
            )
            payload = bytes(MiB)

            async def chunks():  # noqa: ANN202
                for _ in range(size // MiB):
                    yield payload

            out: dict[str, list[float]] = {}
            for _ in range(repeat):
                for key in ("upload", "download"):
                    server, client = cpu_s(proc.pid), time.process_time()
                    start = time.perf_counter()
                    if key == "upload":
                        await up(chunks())
                    else:
                        async for _ in down(b""):
                            pass
                    out.setdefault(key, []).append(time.perf_counter() - start)
                    out.setdefault(f"{key}_server_cpu", []).append(cpu_s(proc.pid) - server)
                    out.setdefault(f"{key}_client_cpu", []).append(time.process_time() - client)
            return out
    finally:
        proc.terminate()
        proc.wait()


def make_update(base: Path, out: Path, step: float = 1e-3) -> None:
    """A valid update of the model: every float tensor nudged, written tensor by tensor."""
    from flctl.tensors import TensorReader, TensorWriter

    with (
        TensorReader(base) as reader,
        TensorWriter(out, {n: (s.dtype, s.shape) for n, s in reader.specs.items()}) as writer,
    ):
        for name, tensor in reader:
            writer.write(name, tensor.add_(step) if tensor.is_floating_point() else tensor)


async def flctl_transfers(
    project: Path, address: str, repeat: int, serve_pid: int
) -> dict[str, Any]:
    from flctl.client import ClientCache, fetch_blob
    from flctl.core import load_config
    from flctl.core._memory import return_large_buffers
    from flctl.security import load_credentials
    from flctl.store import BlobStore
    from flctl.tensors import fingerprint, read_spec, sha256_file
    from flctl.transport.grpc import (
        PROTOCOL_VERSION,
        AdminClient,
        CoordinatorClient,
        pb,
        secure_channel,
    )

    return_large_buffers()  # as `flctl join` does at start (the raw ceiling has run by now)
    config = load_config(project / "flctl.toml")
    cert, key, ca = load_credentials(config.certs_path, "c1")
    acert, akey, _ = load_credentials(config.certs_path, "admin")
    api = CoordinatorClient(secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca))
    admin = AdminClient(secure_channel(address, cert_pem=acert, key_pem=akey, ca_pem=ca))
    blobs = BlobStore(config.state_path / "blobs")
    head = (await admin.list_models()).models[0]
    spec = read_spec(blobs.path(head.digest))
    await api.join(
        pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_fingerprint=fingerprint(spec))
    )
    tasks = api.tasks()
    first_task = asyncio.ensure_future(anext(tasks))
    await asyncio.sleep(0.2)  # let the Tasks stream open before the round selects clients

    # One update per run, each with its own digest, as in real rounds: every accepted upload
    # is then fsynced (a digest already in the blob store would skip that). The page cache is
    # written back (os.sync) before each timed run, outside the timings.
    updates = [project / f"update-{i}.safetensors" for i in range(repeat)]
    for i, path in enumerate(updates):
        make_update(blobs.path(head.digest), path, 1e-3 * (i + 1))
    digests = [sha256_file(path) for path in updates]
    size = updates[0].stat().st_size
    result: dict[str, Any] = {"size": size, "download": [], "upload": [], "commit": []}
    # one cache across the runs, as a client joined for many rounds has: it keeps the last two
    # models (client.cache_models) and removes the older one before fetching the next
    cache = ClientCache(project / ".bench-cache")
    try:
        for i in range(repeat):
            update, update_digest = updates[i], digests[i]
            os.sync()
            reply = await admin.start_round(1)
            task = await first_task if i == 0 else await anext(tasks)
            timings: dict[str, float] = {}
            server, client = cpu_s(serve_pid), time.process_time()
            await fetch_blob(api, cache, task.model_digest, timings=timings)
            result.setdefault("download_server_cpu", []).append(cpu_s(serve_pid) - server)
            result.setdefault("download_client_cpu", []).append(time.process_time() - client)
            result["download"].append(timings["transfer_s"])
            result.setdefault("download_fsync", []).append(timings["fsync_s"])

            async def chunks(update: Path = update):  # noqa: ANN202
                with update.open("rb") as fh:
                    while block := fh.read(MiB):
                        yield block

            header = pb.UploadHeader(
                server_round=task.server_round,
                task_id=task.task_id,
                num_examples=1,
                digest=update_digest,
                size=size,
            )
            # as `flctl join` sends an update: BeginUpload (the upload's id, the offset the
            # coordinator holds: 0 here), then Upload from that offset
            server, client = cpu_s(serve_pid), time.process_time()
            start = time.perf_counter()
            begun = await api.begin_upload(header)
            if not begun.accepted:
                raise SystemExit(f"upload refused: {begun.reason}")
            header.upload_id = begun.upload_id
            header.offset = begun.committed_offset
            answer = await api.upload(header, chunks())
            result["upload"].append(time.perf_counter() - start)
            result.setdefault("upload_server_cpu", []).append(cpu_s(serve_pid) - server)
            result.setdefault("upload_client_cpu", []).append(time.process_time() - client)
            if not answer.accepted:
                raise SystemExit(f"upload refused: {answer.reason}")
            async for event in admin.watch(0, follow=False):
                if event.type == "update.accepted" and event.server_round == reply.round_ids[0]:
                    details = json.loads(event.data_json)
                    result["commit"].append(details["commit_s"])
                    result.setdefault("receive", []).append(details["receive_s"])
            # wait for the round to end before the next one
            while (await admin.status(list(reply.round_ids))).rounds[0].status not in (
                "committed",
                "failed",
            ):
                await asyncio.sleep(0.1)
    finally:
        await api.close()
        await admin.close()
    return result


def cpu_s(pid: int) -> float:
    """utime + stime of process ``pid``, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    params = args.size_mb * 1_000_000 // 4

    with tempfile.TemporaryDirectory(dir=os.environ.get("FLCTL_BENCH_TMP")) as tmp:
        project = Path(tmp) / "p"
        flctl = [sys.executable, "-m", "flctl"]
        subprocess.run(
            [*flctl, "init", str(project), "--template", "large", "--params", str(params)],
            check=True,
            capture_output=True,
        )
        text = (project / "flctl.toml").read_text().replace("min_clients = 2", "min_clients = 1")
        text = text.replace("depth = 8", "depth = 5")
        # the goal compares uncompressed transfers ("auto" could pick zstd for a slow link)
        assert "[transport]" not in text
        (project / "flctl.toml").write_text(text + '\n[transport]\ncompression = "none"\n')
        subprocess.run(
            [*flctl, "certs", "gen", "--clients", "1"], cwd=project, check=True, capture_output=True
        )
        raw = asyncio.run(raw_ceiling(project / "certs", params * 4 // MiB * MiB, args.repeat))
        log = (project / "serve.log").open("w")
        serve = subprocess.Popen(
            [*flctl, "serve", "--address", "127.0.0.1:0", "--no-tui"],
            cwd=project,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            serve_file = project / ".flctl" / "serve.json"
            deadline = time.monotonic() + 300
            while not serve_file.exists():
                if serve.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((project / "serve.log").read_text()[-3000:])
                time.sleep(0.2)
            address = json.loads(serve_file.read_text())["address"]
            ours = asyncio.run(flctl_transfers(project, address, args.repeat, serve.pid))
            coordinator_rss = peak_rss_mib(serve.pid)
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
            log.close()

    raw_size = params * 4 // MiB * MiB

    def rate(size: int, seconds: list[float]) -> dict[str, float]:
        rates = [size / MiB / s for s in seconds]
        return {"best": max(rates), "median": statistics.median(rates)}

    size = ours["size"]
    up_no_fsync = [u - c for u, c in zip(ours["upload"], ours["commit"], strict=True)]
    report = {
        "size_mib": size / MiB,
        "raw_upload_mib_s": rate(raw_size, raw["upload"]),
        "raw_download_mib_s": rate(raw_size, raw["download"]),
        "flctl_download_mib_s": rate(size, ours["download"]),
        "flctl_upload_mib_s": rate(size, ours["upload"]),
        "flctl_upload_before_fsync_mib_s": rate(size, up_no_fsync),
        "coordinator_fsync_rename_s": statistics.median(ours["commit"]),
        "client_download_fsync_s": statistics.median(ours["download_fsync"]),
        "coordinator_receive_s": statistics.median(ours["receive"]),
        "client_upload_s": statistics.median(ours["upload"]),
        "client_download_s": statistics.median(ours["download"]),
        "coordinator_peak_rss_mib": coordinator_rss,
        # CPU seconds per transfer (median), receiver and sender: the 2 cores are shared
        "cpu_s": {
            f"{who}_{key}_{end}": statistics.median(runs[f"{key}_{end}_cpu"])
            for who, runs in (("raw", raw), ("flctl", ours))
            for key in ("upload", "download")
            for end in ("server", "client")
        },
        "repeat": args.repeat,
        # every run's seconds, in order (load on a shared machine shows up as outliers)
        "runs": {
            key: ours.get(key, [])
            for key in ("upload", "commit", "receive", "download", "download_fsync")
        }
        | {"raw_upload": raw["upload"], "raw_download": raw["download"]},
    }
    report["upload_ratio"] = (
        report["flctl_upload_mib_s"]["median"] / report["raw_upload_mib_s"]["median"]
    )
    report["upload_ratio_before_fsync"] = (
        report["flctl_upload_before_fsync_mib_s"]["median"] / report["raw_upload_mib_s"]["median"]
    )
    report["download_ratio"] = (
        report["flctl_download_mib_s"]["median"] / report["raw_download_mib_s"]["median"]
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{size / MiB:.0f} MiB over mutual TLS on 127.0.0.1, 1 MiB chunks, {args.repeat} runs (best / median MiB/s)"
    )
    for label, key in [
        ("raw gRPC upload (ceiling)", "raw_upload_mib_s"),
        ("flctl Upload (to accepted)", "flctl_upload_mib_s"),
        ("flctl Upload (before fsync)", "flctl_upload_before_fsync_mib_s"),
        ("raw gRPC download (ceiling)", "raw_download_mib_s"),
        ("flctl Download (hashed, before fsync)", "flctl_download_mib_s"),
    ]:
        print(f"  {label:<38} {report[key]['best']:7.0f} / {report[key]['median']:7.0f}")
    cpu = report["cpu_s"]
    for who in ("raw", "flctl"):
        print(
            f"  {who} CPU s (median): upload server {cpu[f'{who}_upload_server']:.2f}"
            f" client {cpu[f'{who}_upload_client']:.2f}; download server"
            f" {cpu[f'{who}_download_server']:.2f} client {cpu[f'{who}_download_client']:.2f}"
        )
    print(f"  coordinator fsync + rename     {report['coordinator_fsync_rename_s']:.3f} s (median)")
    print(f"  client download fsync          {report['client_download_fsync_s']:.3f} s (median)")
    print(
        f"  upload ratio {report['upload_ratio']:.2f} (before fsync {report['upload_ratio_before_fsync']:.2f}),"
        f" download ratio {report['download_ratio']:.2f}"
    )
    print(f"  coordinator peak RSS (VmHWM)   {coordinator_rss:.0f} MiB")


if __name__ == "__main__":
    main()
