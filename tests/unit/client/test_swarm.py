"""The swarm's pieces without a coordinator: the simulated training step, reports, failures."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flctl.client._swarm import (
    ClientReport,
    RoundTiming,
    SwarmOptions,
    SwarmReport,
    load_spec,
    main,
    perturb,
    run_swarm,
)
from flctl.core.errors import InvalidInputError
from flctl.security import generate_project_certs
from flctl.tensors import read_spec_bytes
from tests.conftest import REPO


def _model(tensors: dict[str, tuple[str, np.ndarray]]) -> bytes:
    """Hand-built safetensors bytes."""
    header: dict[str, object] = {}
    data = b""
    for name, (dtype, array) in tensors.items():
        raw = array.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


WEIGHT = np.arange(12, dtype="<f4").reshape(3, 4)
STEPS = np.array([7, 8], dtype="<i8")
HALF = np.ones(4, dtype="<f2")
MODEL = _model({"w": ("F32", WEIGHT), "steps": ("I64", STEPS), "h": ("F16", HALF)})


def _tensor(blob: bytes | bytearray, name: str, dtype: str) -> np.ndarray:
    start = 8 + struct.unpack("<Q", bytes(blob[:8]))[0]
    spec = read_spec_bytes(bytes(blob[:start]), data_size=len(blob) - start)[name]
    return np.frombuffer(bytes(blob[start + spec.begin : start + spec.end]), dtype=dtype)


def test_perturb_moves_float32_values_a_little_and_keeps_the_rest() -> None:
    update = perturb(MODEL, np.random.default_rng(0))
    assert len(update) == len(MODEL)
    header_end = 8 + struct.unpack("<Q", MODEL[:8])[0]
    assert update[:header_end] == MODEL[:header_end]  # same header: a valid update
    moved = _tensor(update, "w", "<f4") - WEIGHT.ravel()
    assert np.all(moved != 0) and np.all(np.abs(moved) < 0.01)
    assert list(_tensor(update, "steps", "<i8")) == [7, 8]
    assert list(_tensor(update, "h", "<f2")) == [1.0] * 4


def test_perturb_is_seeded() -> None:
    first = perturb(MODEL, np.random.default_rng(3))
    assert perturb(MODEL, np.random.default_rng(3)) == first
    assert perturb(MODEL, np.random.default_rng(4)) != first


@pytest.mark.parametrize("blob", [b"", b"\x01\x00", struct.pack("<Q", 99) + b"{}", b"x" * 40])
def test_perturb_refuses_what_is_not_safetensors(blob: bytes) -> None:
    with pytest.raises(InvalidInputError):
        perturb(blob, np.random.default_rng(0))


def test_load_spec_reads_the_header_and_names_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(MODEL)
    spec = load_spec(path)
    assert {n: (s.dtype, s.shape) for n, s in spec.items()} == {
        "w": ("F32", (3, 4)),
        "steps": ("I64", (2,)),
        "h": ("F16", (4,)),
    }
    with pytest.raises(InvalidInputError, match="cannot read model spec"):
        load_spec(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("rounds", 0, "rounds"), ("client_ids", (), "client id"), ("timeout_s", 0.0, "timeout_s")],
)
def test_options_refuse_bad_values(field: str, value: object, match: str) -> None:
    kwargs: dict[str, object] = {
        "server": "127.0.0.1:1",
        "certs_dir": Path("certs"),
        "client_ids": ("c1",),
        "spec": {},
        field: value,
    }
    with pytest.raises(ValueError, match=match):
        SwarmOptions(**kwargs)  # type: ignore[arg-type]


def test_report_counts_errors_and_completed_clients() -> None:
    ok = ClientReport("c1", rounds=[RoundTiming(1, accepted=True, bytes_up=10, bytes_down=12)])
    refused = ClientReport(
        "c2", rounds=[RoundTiming(1, reason="late")], errors=["TaskError: refused"]
    )
    report = SwarmReport([ok, refused], rounds=1, wall_s=1.0)
    document = report.to_dict()
    assert (document["errors"], document["completed"]) == (1, 1)
    assert (document["bytes_up"], document["bytes_down"]) == (10, 12)
    [row] = document["per_round"]
    assert (row["server_round"], row["clients"], row["accepted"]) == (1, 2, 1)
    assert document["per_client"][1]["errors"] == ["TaskError: refused"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_client_that_cannot_connect_is_an_error_not_a_crash(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    generate_project_certs(certs, ["c1", "c2"])
    options = SwarmOptions(
        server=f"127.0.0.1:{_closed_port()}",
        certs_dir=certs,
        client_ids=("c1", "c2"),
        spec=read_spec_bytes(MODEL),
        timeout_s=30.0,
        connect_timeout_s=5.0,
    )
    report = asyncio.run(run_swarm(options))
    assert report.error_count == 2
    assert all(len(c.errors) == 1 and c.errors[0].startswith("Connect") for c in report.clients)
    assert report.to_dict()["completed"] == 0


def test_main_without_a_project_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(MODEL)
    assert main(["--project", str(tmp_path), "--spec", str(path)]) == 2
    assert capsys.readouterr().err.startswith("swarm: ")


def test_importing_the_swarm_does_not_import_torch() -> None:
    code = "import sys, flctl.client._swarm; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
