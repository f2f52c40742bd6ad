"""A task's exception, told in the user's terms."""

from __future__ import annotations

from pathlib import Path

from flctl.core import load_task
from flctl.core.usercode import MAX_REASON_CHARS, describe_failure


def _raise_from_task(tmp_path: Path, body: str) -> BaseException:
    path = tmp_path / "task.py"
    path.write_text(
        "def build_model(context):\n    return None\n\n"
        "def client_fn(context):\n    return None\n\n"
        f"def fit():\n    {body}\n"
    )
    module = load_task(path)
    try:
        module.fit()
    except Exception as exc:  # noqa: BLE001 - the exception under test
        return exc
    raise AssertionError("fit did not raise")


def test_the_reason_names_the_users_file_and_line(tmp_path: Path) -> None:
    exc = _raise_from_task(tmp_path, "return paramters")
    failure = describe_failure(exc, "fit")
    assert failure.reason == "fit raised NameError: name 'paramters' is not defined (task.py:8)"
    assert failure.traceback.startswith("Traceback (most recent call last):\n")
    assert 'task.py", line 8, in fit' in failure.traceback
    assert "flctl" not in failure.traceback.replace(str(tmp_path), "")  # flctl's frames trimmed


def test_a_long_or_multiline_message_becomes_one_bounded_line(tmp_path: Path) -> None:
    exc = _raise_from_task(tmp_path, "raise ValueError('bad\\n' * 500)")
    reason = describe_failure(exc, "fit").reason
    assert "\n" not in reason and len(reason) <= MAX_REASON_CHARS
    assert reason.startswith("fit raised ValueError: bad bad") and reason.endswith("(task.py:8)")


def test_an_exception_from_a_library_points_at_the_users_call(tmp_path: Path) -> None:
    exc = _raise_from_task(tmp_path, "import json; json.loads('{')")
    failure = describe_failure(exc, "fit")
    assert failure.reason.startswith("fit raised JSONDecodeError: ")
    assert failure.reason.endswith("(task.py:8)")  # the user's line, not json's
    assert "json" in failure.traceback  # the library's frames stay in the traceback
