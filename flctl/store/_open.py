"""open_store: the project's state store, wherever ``[store]`` puts it."""

from __future__ import annotations

from flctl.core.config import Config
from flctl.core.errors import ConfigError
from flctl.store._leadership import hold_offline
from flctl.store._sql import SqlStore
from flctl.store._state import require_store

__all__ = ["open_store", "require_state", "store_location"]


def store_location(config: Config) -> str:
    """Where the state lives, as it may be shown: the database URL (password hidden) or file."""
    from flctl.store._backends import redact

    url = config.store_url
    return redact(url) if url else str(config.state_path / "state.db")


def open_store(
    config: Config,
    *,
    read_only: bool = False,
    new_state: bool = False,
    deep_check: bool = False,
    offline: str = "",
) -> SqlStore:
    """Open the project's store: the SQLite file in the state folder, or ``[store] url``.

    The SQLite file follows :meth:`SqlStore.open`'s rules (created only in a folder that never
    held a store; backed up before a migration). A database URL is opened as it is: its
    schema is created or migrated unless ``read_only``.

    ``offline`` names the command that writes the store without a coordinator: on a shared
    database it holds the leadership lock until the store closes, and is refused while a
    coordinator leads (:func:`flctl.store.hold_offline`).

    Raises:
        ConflictError: ``offline`` while a coordinator leads the shared store.
        ConfigError: ``new_state`` with a database URL (drop the database by its own tools).
        StoreUnavailableError: The database server cannot be reached.
        SchemaMismatchError: The schema is newer than this flctl's (or, ``read_only``, older).
    """
    url = config.store_url
    if not url:
        return SqlStore.open(
            config.state_path, read_only=read_only, new_state=new_state, deep_check=deep_check
        )
    if new_state:
        raise ConfigError(
            "--new-state starts a new SQLite store in the state folder; the state here is in "
            f"the database {store_location(config)}",
            hint="create a new database for a new store, and point [store] url at it",
        )
    store = SqlStore(url, read_only=read_only)
    if offline and not read_only:
        try:
            hold_offline(store, offline)
        except BaseException:
            store.close()
            raise
    return store


def require_state(config: Config) -> None:
    """Refuse a state folder that never held a store, or lost its database (SQLite only).

    A database URL names its store itself: opening it says whether it can be reached.

    Raises:
        NotFoundError: The state folder never held a store.
        StoreLostError: Its database is missing or empty although it held one.
    """
    if not config.store_url:
        require_store(config.state_path)
