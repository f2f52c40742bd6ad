"""The base of the event log's typed payloads: :class:`EventPayload` and its field helpers.

Each event type has one frozen dataclass (``_service_payloads``, ``_round_payloads``,
``_model_payloads``); the coordinator builds each event from one and the event log stores
:meth:`EventPayload.to_data`. Readers (``round watch``, the panels, ``--json``) read the stored
``Event.data`` dict, whose keys each class documents. That dict is the wire and JSON contract:
a field's name may differ from its key (booleans are ``is_*`` here, plain in the data) and
some keys are written only when they carry something, as each class says.

:mod:`flctl.core.events` re-exports every payload class, with a constant per type
(``ROUND_COMMITTED = RoundCommitted.type``); import them from there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["EventPayload", "flag_field", "optional_field", "renamed"]

# Field metadata read by EventPayload.to_data.
_KEY = "flctl.key"  # the data key, when it is not the field's name
_OMIT = "flctl.omit"  # omit the key when the value is None (or False, for a flag)


def optional_field() -> Any:
    """A field whose key is written only when its value is not None."""
    return field(default=None, metadata={_OMIT: True})


def flag_field(key: str) -> Any:
    """A boolean field, False by default, written under ``key`` and only when it is True."""
    return field(default=False, metadata={_KEY: key, _OMIT: True})


def renamed(key: str) -> dict[str, str]:
    """A field's metadata that writes it under ``key``: ``field(metadata=renamed("head"))``."""
    return {_KEY: key}


def _plain(value: Any) -> Any:
    """``value`` in its JSON shape: a mapping as a dict, a sequence (not a str) as a list."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return value


@dataclass(frozen=True)
class EventPayload:
    """The details of one event type; subclasses set :attr:`type` and declare the fields.

    Example:
        A new event type is one more subclass here (with a docstring for each field), and
        its constant in :mod:`flctl.core.events`::

            @dataclass(frozen=True)
            class ModelPinned(EventPayload):
                type: ClassVar[str] = "model.pinned"
                version: int
                author: str

            MODEL_PINNED = ModelPinned.type  # in flctl/core/events.py
            events.emit(ModelPinned(version=3, author="admin"), server_round=0)
    """

    #: The event's type string (``round.committed``, ...), as stored in the log.
    type: ClassVar[str]

    def to_data(self) -> dict[str, Any]:
        """The event's ``data``: each field under its key, in declaration order.

        A field declared optional is left out while None, a flag declared so while False;
        mappings and sequences become dicts and lists (JSON's shapes).
        """
        data: dict[str, Any] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.metadata.get(_OMIT) and (value is None or value is False):
                continue
            data[spec.metadata.get(_KEY, spec.name)] = _plain(value)
        return data
