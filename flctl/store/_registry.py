"""The registry's checks over both halves of the store: blobs against the versions that name them.

``verify_models`` re-hashes every blob a model version references; ``collect_garbage`` deletes
the blobs that nothing references. Both read the references from :class:`SqlStore` and touch
files only through :class:`BlobStore`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flctl.core.errors import InvalidInputError
from flctl.store._blobs import BlobStore
from flctl.store._sql import SqlStore

__all__ = ["BLOB_STATUSES", "BlobCheck", "GcReport", "collect_garbage", "verify_models"]

#: What :func:`verify_models` finds for one blob.
BLOB_STATUSES = frozenset({"ok", "missing", "corrupt"})


@dataclass(frozen=True)
class BlobCheck:
    """The state of one blob that model versions reference.

    Attributes:
        digest: The blob's SHA-256 (its name).
        versions: The model versions that reference it, ascending.
        status: ``ok``, ``missing`` (no file) or ``corrupt`` (its content hashes otherwise).
        size: Its size in bytes, or None when missing.
    """

    digest: str
    versions: tuple[int, ...]
    status: str
    size: int | None

    @property
    def is_ok(self) -> bool:
        """Whether the blob is present and intact."""
        return self.status == "ok"


@dataclass(frozen=True)
class GcReport:
    """What :func:`collect_garbage` removed (or would remove, on a dry run).

    Attributes:
        removed: ``(digest, size)`` of each unreferenced blob, by digest.
        kept: How many blobs are referenced and were kept.
        dry_run: Whether nothing was actually deleted.
    """

    removed: tuple[tuple[str, int], ...]
    kept: int
    dry_run: bool

    @property
    def bytes_freed(self) -> int:
        """Bytes the removed blobs took (or would free, on a dry run)."""
        return sum(size for _, size in self.removed)


def verify_models(sql: SqlStore, blobs: BlobStore) -> list[BlobCheck]:
    """Re-hash every blob a model version references.

    Each distinct digest is read once, whole, from disk (in 1 MiB pieces).

    Args:
        sql: The store's database.
        blobs: Its blob store.

    Returns:
        One check per distinct digest, by the lowest version that references it.
    """
    by_digest: dict[str, list[int]] = {}
    for model in sql.list_models():
        by_digest.setdefault(model.digest, []).append(model.version)
    checks = []
    for digest, versions in by_digest.items():
        try:
            if not blobs.has(digest):
                status, size = "missing", None
            else:
                size = blobs.size(digest)
                status = "ok" if blobs.verify(digest) else "corrupt"
        except InvalidInputError:
            # A malformed digest in the database names no file: nothing can be verified.
            status, size = "missing", None
        checks.append(BlobCheck(digest, tuple(sorted(versions)), status, size))
    return sorted(checks, key=lambda c: c.versions[0])


def collect_garbage(sql: SqlStore, blobs: BlobStore, *, dry_run: bool = False) -> GcReport:
    """Delete the blobs that no model version and no open round's accepted update references.

    Temp files (uploads and imports in progress) live outside the blob namespace and are never
    touched. The references are read first, then the blob folder, so a blob written between
    the two is not a candidate; run it without a coordinator (the CLI holds the state lock).

    Args:
        sql: The store's database.
        blobs: Its blob store.
        dry_run: Only report what would be removed.

    Returns:
        What was removed and how many blobs were kept.
    """
    keep = sql.referenced_digests()
    removed: list[tuple[str, int]] = []
    kept = 0
    for digest in blobs.digests():
        if digest in keep:
            kept += 1
            continue
        if dry_run:
            removed.append((digest, blobs.size(digest)))
        else:
            removed.append((digest, blobs.remove(digest)))
    return GcReport(tuple(removed), kept, dry_run)
