"""What a user's task raised, told in the user's terms: their file and line, flctl trimmed.

A ``fit`` that raises shows the data owner the traceback of *their* code (``task.py``, and the
libraries it called), without the frames of flctl's own machinery around it, and gives the
coordinator one line: ``fit raised NameError: name 'paramters' is not defined (task.py:57)``.
"""

from __future__ import annotations

import sys
import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_REASON_CHARS", "UserCodeFailure", "describe_failure"]

#: A failure's one-line reason is cut to this many characters (it travels in a heartbeat and
#: lands in the event log and the round's reason).
MAX_REASON_CHARS = 300

_FLCTL = Path(__file__).resolve().parents[1]


def _library_roots() -> tuple[Path, ...]:
    roots = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(name)
        if path:
            roots.add(Path(path).resolve())
    return tuple(roots)


_LIBRARIES = _library_roots()


def _is_flctl(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(_FLCTL)


def _is_user(filename: str) -> bool:
    """A frame of the project's own code: not flctl, not an installed library, not Python."""
    if filename.startswith("<"):
        return False
    path = Path(filename).resolve()
    return not path.is_relative_to(_FLCTL) and not any(
        path.is_relative_to(root) for root in _LIBRARIES
    )


@dataclass(frozen=True)
class UserCodeFailure:
    """An exception from a task's code.

    Attributes:
        reason: One line: ``<call> raised <Type>: <message> (<file>:<line>)``.
        traceback: The traceback without flctl's frames, as Python prints it.
    """

    reason: str
    traceback: str


def describe_failure(exc: BaseException, call: str) -> UserCodeFailure:
    """Describe ``exc``, raised by the task's ``call`` (``"fit"``, ``"client_fn"``, ...)."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not _is_flctl(f.filename) and not f.filename.startswith("<frozen")
    ]
    where = ""
    for frame in reversed(frames):
        if _is_user(frame.filename):
            where = f" ({Path(frame.filename).name}:{frame.lineno})"
            break
    text = str(exc)
    if isinstance(exc, SyntaxError):  # the file did not compile: its own line, not a frame
        text = exc.msg or text
        if exc.filename and exc.lineno:
            where = f" ({Path(exc.filename).name}:{exc.lineno})"
    message = " ".join(text.split())  # one line, whatever the exception's text
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    limit = MAX_REASON_CHARS - len(where) - len(call) - 8
    if len(text) > limit:
        text = text[: max(0, limit - 3)] + "..."
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines += traceback.format_exception_only(type(exc), exc)
    return UserCodeFailure(reason=f"{call} raised {text}{where}", traceback="".join(lines))
