"""The simulation worker's core, in this process: the same checks as a deployed client."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from flctl.core import Config, ProjectConfig
from flctl.core.errors import ConfigError
from flctl.simulation import CLIENT_DIR_KEY, WorkerCore, WorkerSetup
from flctl.simulation._ray import RayBackend
from flctl.tensors import load_parameters, save_parameters

TASK = Path(__file__).parents[2] / "integration" / "tiny_task.py"


def UPDATES(root: Path) -> Path:  # noqa: N802 - reads as the folder's name
    return root / ".flctl" / "simulation" / "updates"


def _setup(tmp_path: Path, task: Path = TASK, **settings: object) -> WorkerSetup:
    """The setup ``flctl simulate`` gives its workers, for a project in ``tmp_path``."""
    config = Config(project=ProjectConfig(task=str(task)), task=dict(settings), root=tmp_path)
    return WorkerSetup.from_config(config, 4)


def _model(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    torch.manual_seed(0)
    save_parameters(dict(torch.nn.Linear(4, 2).state_dict()), path)
    return path


def _job(model: Path, client: str = "sim-00001", **config: object) -> dict[str, object]:
    return {
        "op": "fit",
        "job": 7,
        "client_id": client,
        "partition_id": 1,
        "model": str(model),
        "model_digest": "0" * 64,
        "config": {"server_round": 1, **config},
    }


def test_a_fit_job_writes_a_checked_update_and_says_how_to_take_it(tmp_path: Path) -> None:
    core = WorkerCore(_setup(tmp_path))
    answer = core.run(_job(_model(tmp_path)))
    assert answer["ok"] and answer["job"] == 7, answer
    update = Path(answer["path"])
    assert update.parent == UPDATES(tmp_path) and update.stat().st_size == answer["size"]
    assert answer["encoding"] == "full" and answer["num_examples"] > 0
    import hashlib

    assert hashlib.sha256(update.read_bytes()).hexdigest() == answer["digest"]
    assert set(load_parameters(update)) == {"weight", "bias"}
    assert core.stats()["jobs"] == 1 and core.stats()["peak_rss"] > 0


def test_a_client_that_raises_fails_its_job_only(tmp_path: Path) -> None:
    task = tmp_path / "task.py"
    task.write_text(
        TASK.read_text()
        + "\n_original = client_fn\n\n"
        + "def client_fn(context):\n"
        + "    if context.client_id == 'sim-00002':\n"
        + "        raise RuntimeError('no data here')\n"
        + "    return _original(context)\n"
    )
    core = WorkerCore(_setup(tmp_path, task))
    model = _model(tmp_path)
    bad = core.run(_job(model, "sim-00002"))
    assert not bad["ok"] and "client_fn raised RuntimeError: no data here" in bad["reason"], bad
    assert not list(UPDATES(tmp_path).iterdir())
    good = core.run(_job(model, "sim-00003"))
    assert good["ok"], good


def test_each_client_is_told_its_own_folder(tmp_path: Path) -> None:
    task = tmp_path / "task.py"
    task.write_text(
        TASK.read_text()
        + "\n\ndef _seen(context):\n"
        + "    import pathlib\n"
        + f"    pathlib.Path(context.config[{CLIENT_DIR_KEY!r}]).mkdir(parents=True)\n"
        + "\n_original = client_fn\n\n"
        + "def client_fn(context):\n    _seen(context)\n    return _original(context)\n"
    )
    core = WorkerCore(_setup(tmp_path, task))
    assert core.run(_job(_model(tmp_path), "sim-00004"))["ok"]
    assert (tmp_path / ".flctl" / "simulation" / "clients" / "sim-00004").is_dir()


def test_the_ray_backend_without_ray_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    backend = RayBackend(_setup(tmp_path), 1)
    with pytest.raises(ConfigError, match="needs Ray") as caught:
        asyncio.run(backend.start())
    assert caught.value.hint is not None and "flctl[ray]" in caught.value.hint
