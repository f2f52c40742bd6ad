import pytest

from flctl.core.errors import FlctlError, all_error_classes


def test_exit_codes_and_codes_are_unique() -> None:
    classes = all_error_classes()
    codes = [c.exit_code for c in classes]
    names = [c.code for c in classes]
    assert len(codes) == len(set(codes)), codes
    assert len(names) == len(set(names)), names
    assert all(c.exit_code not in (0, 2) for c in classes)
    assert all(c.__name__.endswith("Error") for c in classes)


def test_subclass_without_exit_code_is_refused() -> None:
    with pytest.raises(TypeError, match="exit_code"):

        class Broken(FlctlError):  # noqa: F841
            code = "broken"


def test_docstring_tree_lists_every_class_with_its_code() -> None:
    from flctl.core import errors

    doc = errors.__doc__ or ""
    for cls in all_error_classes():
        line = next((ln for ln in doc.splitlines() if f" {cls.__name__} " in f" {ln} "), "")
        assert line, f"{cls.__name__} missing from the module docstring"
        assert line.rstrip().endswith(str(cls.exit_code)), line


def test_to_dict() -> None:
    from flctl.core.errors import ConfigError

    err = ConfigError("bad", hint="fix it", details={"key": "x"})
    assert err.to_dict() == {
        "code": "config",
        "exit_code": 10,
        "message": "bad",
        "hint": "fix it",
        "details": {"key": "x"},
    }


def test_every_exit_code_is_documented() -> None:
    from tests.conftest import REPO

    text = (REPO / "docs" / "cli.md").read_text()
    for cls in all_error_classes():
        assert f"| {cls.exit_code} | `{cls.code}` | `{cls.__name__}` |" in text, cls.__name__
