"""The coordinator's state: a SQL database of rounds, models and events, and a blob store.

Callers get frozen records (:class:`ModelRecord`, :class:`RoundRecord`, ...) and plain values;
SQLModel and SQLAlchemy never leave this package. The model registry (tags, lineage, rollback,
import) is part of :class:`SqlStore`; :func:`verify_models` and :func:`collect_garbage` check
the blobs against the versions that reference them. Revoked identities and certificates are
kept in the ``revocations`` table (:func:`revoke`, :func:`is_revoked`, :func:`list_revocations`);
rounds charged to the privacy budget in the ``dp_ledger`` table (:func:`charge`, :func:`ledger`).

:meth:`SqlStore.open` creates a store only in a state folder that never held one (its marker,
``store.json``, and its blobs say whether it did: :func:`require_store`); :func:`write_backup`
and :func:`restore_backup` copy the database with SQLite's online backup and check a manifest
of its blobs.

The database is SQLite by default, or PostgreSQL where ``[store] url`` says
(:func:`open_store` picks; the differences live in one backend module). Coordinators that share
a PostgreSQL store take turns with :class:`Leadership` (an advisory lock, an epoch that every
write is fenced on); :func:`list_coordinators` and :func:`list_leaders` say who led when, and
:func:`migrate_store` moves a SQLite store into a shared database.
"""

from flctl.store._backup import BackupReport, RestoreReport, restore_backup, write_backup
from flctl.store._blobs import BlobStore, WriteBehind, sha256_file
from flctl.store._leadership import (
    CoordinatorInfo,
    LeaderInfo,
    Leadership,
    list_coordinators,
    list_leaders,
)
from flctl.store._ledger import LedgerRecord, charge, ledger
from flctl.store._migrate import MigrationReport, migrate_store
from flctl.store._open import open_store, require_state, store_location
from flctl.store._records import (
    MODEL_KINDS,
    MODEL_STATUSES,
    ROUND_STATUSES,
    TERMINAL,
    UPDATE_STATUSES,
    ClientRecord,
    ModelRecord,
    PendingRollbackRecord,
    RoundRecord,
    TagRecord,
    UpdateRecord,
)
from flctl.store._registry import (
    BLOB_STATUSES,
    BlobCheck,
    GcReport,
    collect_garbage,
    verify_models,
)
from flctl.store._revocations import (
    LOCAL_AUTHOR,
    RevocationRecord,
    is_revoked,
    list_revocations,
    revoke,
    revoked_identities,
)
from flctl.store._sql import SqlStore
from flctl.store._state import require_store

__all__ = [
    "BLOB_STATUSES",
    "BackupReport",
    "BlobCheck",
    "BlobStore",
    "ClientRecord",
    "CoordinatorInfo",
    "GcReport",
    "LOCAL_AUTHOR",
    "LeaderInfo",
    "Leadership",
    "LedgerRecord",
    "MODEL_KINDS",
    "MODEL_STATUSES",
    "MigrationReport",
    "ModelRecord",
    "PendingRollbackRecord",
    "ROUND_STATUSES",
    "RestoreReport",
    "RevocationRecord",
    "RoundRecord",
    "SqlStore",
    "TERMINAL",
    "TagRecord",
    "UPDATE_STATUSES",
    "UpdateRecord",
    "WriteBehind",
    "charge",
    "collect_garbage",
    "is_revoked",
    "ledger",
    "list_coordinators",
    "list_leaders",
    "list_revocations",
    "migrate_store",
    "open_store",
    "require_state",
    "require_store",
    "restore_backup",
    "revoke",
    "revoked_identities",
    "sha256_file",
    "store_location",
    "verify_models",
    "write_backup",
]
