"""The coordinator's state: a SQL database of rounds, models and events, and a blob store.

Callers get frozen records (:class:`ModelRecord`, :class:`RoundRecord`, ...) and plain values;
SQLModel and SQLAlchemy never leave this package.
"""

from flctl.store._blobs import BlobStore, sha256_file
from flctl.store._records import (
    MODEL_KINDS,
    ROUND_STATUSES,
    TERMINAL,
    UPDATE_STATUSES,
    ClientRecord,
    ModelRecord,
    RoundRecord,
    UpdateRecord,
)
from flctl.store._sql import SqlStore

__all__ = [
    "BlobStore",
    "ClientRecord",
    "MODEL_KINDS",
    "ModelRecord",
    "ROUND_STATUSES",
    "RoundRecord",
    "SqlStore",
    "TERMINAL",
    "UPDATE_STATUSES",
    "UpdateRecord",
    "sha256_file",
]
