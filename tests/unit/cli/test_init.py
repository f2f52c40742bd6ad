from pathlib import Path

import pytest
from typer.testing import CliRunner

from flctl.cli import app
from flctl.cli._init import available_templates, init_project
from flctl.core import TaskContext, load_config, load_task
from flctl.core.errors import ConfigError, ProjectExistsError

runner = CliRunner()


@pytest.mark.parametrize("template", available_templates())
def test_every_template_renders_and_loads(tmp_path: Path, template: str) -> None:
    result = init_project(tmp_path / "p", template=template, seed=7, variables={"params": "20000"})
    assert {"flctl.toml", "task.py", ".gitignore"} <= set(result.files)
    config = load_config(tmp_path / "p" / "flctl.toml")
    assert config.project.seed == 7
    assert config.project.name == "p"
    task = load_task(config.task_path)
    model = task.build_model(TaskContext(role="coordinator", config=dict(config.task)))
    assert sum(p.numel() for p in model.parameters()) > 0
    ignored = (tmp_path / "p" / ".gitignore").read_text()
    for entry in (".flctl", "certs"):
        assert entry in ignored


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    init_project(tmp_path / "p")
    (tmp_path / "p" / "task.py").write_text("# mine")
    with pytest.raises(ProjectExistsError):
        init_project(tmp_path / "p")
    assert (tmp_path / "p" / "task.py").read_text() == "# mine"
    init_project(tmp_path / "p", force=True)
    assert (tmp_path / "p" / "task.py").read_text() != "# mine"
    with pytest.raises(ConfigError, match="unknown template"):
        init_project(tmp_path / "q", template="nope")
    assert not (tmp_path / "q").exists()


def test_init_command_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["init", "proj", "--json"])
    assert result.exit_code == 0, result.output
    assert '"template": "digits"' in result.stdout
    again = runner.invoke(app, ["init", "proj", "--json"])
    assert again.exit_code == 12
    assert '"code": "project_exists"' in again.stdout
