"""The schema of ``flctl.toml``: one frozen dataclass per table, validated at load.

Every key of the file mirrors a field here (snake_case). Unknown keys, wrong types and values
out of range are a :class:`ConfigError` naming the file, the key and what is wrong, so a typo
never silently falls back to a default. ``flctl.toml.example`` at the top of the repository
documents every key; a test loads it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import unquote, urlsplit

from flctl.core.errors import ConfigError, ProjectNotFoundError

__all__ = [
    "CONFIG_FILE",
    "ClientConfig",
    "Config",
    "DEFAULT_PORT",
    "DataConfig",
    "GateConfig",
    "OUTLIER_MODES",
    "PrivacyConfig",
    "ProjectConfig",
    "RoundsConfig",
    "SECAGG_MAX_QUANTIZATION_BITS",
    "STORE_URL_ENV",
    "SecAggConfig",
    "ServerConfig",
    "SimulationConfig",
    "StoreConfig",
    "StrategyConfig",
    "TrackingConfig",
    "TransportConfig",
    "find_project",
    "load_config",
    "parse_config",
    "resolve_tracking_uri",
]

log = logging.getLogger("flctl.config")

CONFIG_FILE = "flctl.toml"
DEFAULT_PORT = 7070

ConfigValue = bool | int | float | str

#: The values ``[strategy] exclude_outliers`` may take.
OUTLIER_MODES = ("off", "flag", "drop")


@dataclass(frozen=True)
class ProjectConfig:
    """``[project]``: what the project is and where its files live (relative to flctl.toml)."""

    name: str = "flctl-project"
    task: str = "task.py"
    seed: int = 0
    state_dir: str = ".flctl"
    certs_dir: str = "certs"


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: the coordinator's listening address and session settings."""

    address: str = f"127.0.0.1:{DEFAULT_PORT}"
    #: The address clients reach the coordinator at where it differs from ``address`` (NAT,
    #: port mapping); coordinators sharing a store name it to each other's clients.
    advertise: str = ""
    insecure: bool = False
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 30.0
    #: calls per second each identity may make (token bucket); 0 turns the limit off
    rate_limit_per_s: float = 20.0
    rate_limit_burst: int = 40
    #: let admin certificates call the Coordinator service (run a client as an operator)
    allow_admin_clients: bool = False
    token_ttl_s: float = 3600.0
    #: a connection whose TLS handshake has not finished by then is closed
    handshake_timeout_s: float = 5.0
    #: connections at once, in total and from one IP address (more are closed or refused)
    max_connections: int = 4096
    max_connections_per_peer: int = 256
    #: an upload is refused (storage full, clients retry later) when it would leave less free
    #: space than this on the state folder's file system: room for the database and events
    min_free_mb: float = 64.0
    #: HOST:PORT where ``serve`` serves Prometheus metrics at /metrics ("" = off); a loopback
    #: address unless ``metrics_allow_remote`` (the endpoint has no TLS and no login)
    metrics_address: str = ""
    metrics_allow_remote: bool = False


@dataclass(frozen=True)
class RoundsConfig:
    """``[rounds]``: how the coordinator runs a round.

    ``max_examples_per_update`` and ``max_weight_share`` bound how much one update weighs in
    the aggregate, whatever ``num_examples`` its client claims: a claim above the first is
    counted as ``max_examples_per_update``, then no update keeps more than ``max_weight_share``
    of the round's total weight (the excess is taken off it; the others keep their claims).
    With N updates a share below 1/N cannot be reached: they then weigh the same. Both defaults
    change nothing for honest clients (10^9 examples, no share cap); with clients you do not
    trust, set ``max_weight_share`` (docs/security.md).
    """

    min_clients: int = 2
    #: select this many of the connected clients; 0, or more than are connected: all of them
    clients_per_round: int = 0
    #: select this fraction of the connected clients (rounded up); 0: clients_per_round decides
    fraction_per_round: float = 0.0
    #: select this many more than the round needs and commit with the first to report
    over_selection: int = 0
    deadline_s: float = 120.0
    #: how long a round waits for min_clients connected clients; 0: not at all (it starts with
    #: the clients connected then, or fails at once)
    quorum_timeout_s: float = 60.0
    #: a failed round is queued again this many times (not cancelled or budget-refused ones)
    retries: int = 0
    #: how long the open round waits for a selected client that disconnected to come back
    rejoin_grace_s: float = 15.0
    #: who evaluates each round's new model: the task's server_evaluate ("server"), the round's
    #: clients with their evaluate ("clients"), both, or nobody ("none"); docs/task.md
    evaluate: Literal["server", "clients", "both", "none"] = "server"
    #: how long a round waits for its clients' evaluations ("clients", "both"); it goes on
    #: with those that arrived
    evaluate_timeout_s: float = 60.0
    #: an update claiming more examples weighs as this many (clamped, with an event)
    max_examples_per_update: int = 1_000_000_000
    #: the largest share of a round's total weight one update may have; 1.0: no cap
    max_weight_share: float = 1.0


@dataclass(frozen=True)
class TransportConfig:
    """``[transport]``: chunking, message bounds and compression on both ends of every channel.

    ``compression`` is the coordinator's policy, announced at Join and applied to both
    directions: "auto" compresses a blob only when a sample of it shows that compressing
    beats sending raw over the measured link (never float32 weights on loopback), "zstd"
    always compresses, "none" never does. ``compression_level`` is the zstd level (1..19).
    """

    max_chunk_bytes: int = 1 << 20
    max_update_bytes: int = 0
    compression: Literal["auto", "zstd", "none"] = "auto"
    compression_level: int = 1


@dataclass(frozen=True)
class ClientConfig:
    """``[client]``: settings a data owner controls on its own machine.

    ``update_encoding`` and ``update_dtype`` choose how a trained model travels back: the whole
    model (``"full"``) or its difference from the round's base model (``"delta"``), in the
    model's own dtype (``"float32"``: lossless) or cast to ``"float16"`` / ``"bfloat16"`` (half
    the bytes, with the rounding error docs/benchmarks.md measures). The coordinator rebuilds
    the model's dtype before aggregating.

    ``cache_models`` bounds the client's model cache (``<cache_dir>/<client id>``): the most
    recently used models it keeps on disk; older ones are removed before a new one is fetched.
    """

    device: str = "auto"
    num_threads: int = 1
    cache_dir: str = ".flctl-client"
    cache_models: int = 2
    update_encoding: Literal["full", "delta"] = "full"
    update_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: how the template's data set is split across clients (simulation)."""

    num_partitions: int = 3
    partitioning: Literal["iid", "dirichlet"] = "iid"
    alpha: float = 0.5


@dataclass(frozen=True)
class GateConfig:
    """``[gate]``: the validation gate a round's aggregate passes before it becomes head.

    ``mode = "finite"``, the default, refuses an aggregate holding NaN or Inf (in a tensor or a
    metric), so a non-finite model never becomes head; ``mode = "off"`` lets any aggregate through;
    ``mode = "metric"`` also refuses one whose ``metric`` is worse than the reference version's
    (``against``: the best version so far, or the head) by more than ``max_regression``
    (absolute). A refused aggregate is stored with status ``rejected`` and its reason; the head
    does not move. After ``rollback_after`` rejected rounds in a row (0: never) the coordinator
    rolls back to the best version by ``metric``, with author ``policy``. Its own table, not
    ``[rounds]``: the gate does not change how a model is trained, so it stays out of each
    version's config hash. docs/registry.md explains each key.
    """

    mode: Literal["off", "finite", "metric"] = "finite"
    metric: str = "accuracy"
    better: Literal["higher", "lower"] = "higher"
    max_regression: float = 0.0
    against: Literal["best", "head"] = "best"
    rollback_after: int = 0


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: client-level differential privacy (DP-FedAvg) and its budget.

    With ``mode = "off"`` nothing below is used. Otherwise every key is checked against the
    others at load (see :func:`parse_config`): the accountant must be able to account for the
    combination, or the file is refused with the key named. docs/privacy.md explains each one.
    """

    mode: Literal["off", "central", "local"] = "off"
    clip_norm: float = 1.0
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clip_count_stddev: float = 0.0
    noise_multiplier: float = 0.0
    target_delta: float = 1e-5
    epsilon_budget: float = 0.0
    accountant: Literal["rdp", "pld"] = "rdp"
    sampling: Literal["poisson", "fixed"] = "poisson"
    sampling_rate: float = 1.0
    sample_size: int = 0
    population: int = 0


#: The widest quantization ``[secagg] quantization_bits`` may ask (``flctl.tensors.Quantizer``).
SECAGG_MAX_QUANTIZATION_BITS = 32


@dataclass(frozen=True)
class SecAggConfig:
    """``[secagg]``: secure aggregation, SecAgg+ (docs/secagg.md).

    With ``enabled`` the coordinator learns the sum of a round's updates and nothing about any
    one of them: each client uploads its update quantized and masked, and the masks cancel
    only in the sum of the clients that took part. ``threshold`` is the fraction of a client's
    share holders (itself and its neighbours) needed to unmask, in ``(0.5, 1]``;
    ``num_shares`` the neighbours each client shares with (SecAgg+; 0: every other client).
    Each client sends ``r * (new - base)`` with ``r = min(num_examples, max_weight) /
    max_weight``, clipped to ``[-clip_range, clip_range]`` and quantized to
    ``quantization_bits``, and ``r`` itself as one more element: the coordinator divides the
    one by the other (FedAvg's weighted mean). ``stage_timeout_s`` bounds each key stage and
    the unmasking; the masked input waits for ``rounds.deadline_s``.

    Strategies and settings that need individual updates are refused with it (a robust rule,
    outlier scores, local DP, adaptive clipping, ``max_weight_share``); central DP adds its
    noise to the unmasked sum (docs/privacy.md).
    """

    enabled: bool = False
    threshold: float = 0.6
    num_shares: int = 0
    clip_range: float = 1.0
    quantization_bits: int = 24
    max_weight: float = 1000.0
    stage_timeout_s: float = 60.0


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: the aggregation strategy and its parameters.

    ``name`` picks a built-in strategy (``flctl strategies ls``); every other key of the table
    is one of that strategy's parameters. Here they are only checked to be booleans, numbers
    or strings: ``flctl.core`` knows no strategies, so the project loader (and the
    coordinator, before it writes anything) checks them against the strategy's own
    parameters (:func:`flctl.coordinator.build_strategy`).

    ``rounds.strategy`` is a deprecated alias of ``name``, read when ``[strategy]`` does not
    set it.

    ``incremental`` is the coordinator's, not the strategy's: a mean-based strategy adds each
    update to the round's sum as it is accepted (true), or reads every update once the round's
    wait ends, in a fixed order (false, the default: bit-for-bit repeatable whatever the
    arrival order; on the machines measured, docs/benchmarks.md, it also commits sooner).

    ``streaming`` is the coordinator's too: for a strategy whose model is FedAvg's, the round's
    model is computed while the updates upload, and used when it is the round's (true, the
    default; the same bits as reading them at the end), or only once the wait ends (false).

    ``exclude_outliers`` and ``outlier_threshold`` belong to the coordinator, not to the
    strategy (Byzantine detection, docs/strategies.md): every accepted update is scored, and
    the outlier rule, with ``outlier_threshold`` on the modified z-score (> 0), marks a
    round's outliers; ``"off"`` does not apply the rule, ``"flag"`` records and reports what
    it marks, ``"drop"`` also leaves those updates out of the aggregate.
    """

    name: str = "fedavg"
    params: dict[str, ConfigValue] = field(default_factory=dict)
    incremental: bool = False
    streaming: bool = True
    exclude_outliers: Literal["off", "flag", "drop"] = "off"
    outlier_threshold: float = 3.5


@dataclass(frozen=True)
class SimulationConfig:
    """``[simulation]``: how ``flctl simulate`` runs its virtual clients (docs/simulation.md).

    ``workers`` is how many worker processes (or Ray actors) run the clients; 0: one per
    ``client_cpus`` cores. ``client_cpus`` and
    ``client_gpus`` are what one virtual client's ``fit`` needs (a fraction of a GPU lets
    several clients share one): the Ray backend asks Ray for that much per worker. A selected client
    drops out (reports its task failed, as a deployed client whose training fails) with
    probability ``dropout_rate``; a fraction ``straggler_fraction`` of the others report
    ``straggler_delay_s`` seconds late (their update arrives late; past ``rounds.deadline_s``
    it is refused as late). Which clients drop out or straggle follows from the project's
    seed, the round and the client, so a run repeats.
    """

    workers: int = 0
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    dropout_rate: float = 0.0
    straggler_fraction: float = 0.0
    straggler_delay_s: float = 0.0
    backend: Literal["local", "ray"] = "local"
    ray_address: str = ""


#: Overrides ``[store] url`` (so that a password need not sit in flctl.toml).
STORE_URL_ENV = "FLCTL_STORE_URL"


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: where the coordinator keeps its state (docs/deployment.md).

    ``url`` is a SQLAlchemy database URL; "" is the SQLite file under ``project.state_dir``.
    A PostgreSQL URL (``postgresql+psycopg://user@host/db``) lets several coordinators share
    one state, one of them leading and the others standing by. ``blobs`` is the folder of the
    content-addressed models and update files ("" = ``state_dir/blobs``); coordinators that
    share a database must share it too. The environment variable ``FLCTL_STORE_URL``
    overrides ``url``.
    """

    url: str = ""
    blobs: str = ""


@dataclass(frozen=True)
class TrackingConfig:
    """``[tracking]``: each run's metrics, parameters and final model, to MLflow and TensorBoard.

    ``mlflow_uri`` is an MLflow tracking URI: a local file store (``file:./mlruns``, a path
    relative to the project folder) or a tracking server (``http://host:5000``); ``""`` turns
    MLflow off. ``tensorboard_dir`` is the folder TensorBoard reads, each run in a folder of its
    own under it (relative to the project folder); ``""`` turns TensorBoard off. ``experiment``
    is the MLflow experiment the runs go to (created when missing). ``flctl serve`` and
    ``flctl simulate`` log every committed round's metrics (step = the round), the strategy,
    privacy and round settings as parameters once, and the head model as an artifact when they
    end; ``flctl export-metrics`` does the same for a past run (docs/operations.md).
    """

    mlflow_uri: str = ""
    tensorboard_dir: str = ""
    experiment: str = "flctl"


@dataclass(frozen=True)
class Config:
    """A whole ``flctl.toml``.

    ``task`` is free-form: its keys reach the task's ``fit`` and ``evaluate`` as the round's
    config (a typed map of bool, int, float and str).
    """

    project: ProjectConfig = field(default_factory=ProjectConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    task: dict[str, ConfigValue] = field(default_factory=dict)
    root: Path = field(default=Path("."), compare=False)

    @property
    def state_path(self) -> Path:
        """The coordinator's state folder, absolute."""
        return (self.root / self.project.state_dir).resolve()

    @property
    def store_url(self) -> str:
        """The database URL: ``FLCTL_STORE_URL``, else ``[store] url`` ("" = SQLite in state)."""
        return os.environ.get(STORE_URL_ENV, "").strip() or self.store.url

    @property
    def blobs_path(self) -> Path:
        """The blob folder, absolute (``[store] blobs``, default ``state_dir/blobs``)."""
        if self.store.blobs:
            return (self.root / self.store.blobs).resolve()
        return self.state_path / "blobs"

    @property
    def uploads_path(self) -> Path:
        """Where interrupted uploads wait to be resumed: beside shared blobs, else in state."""
        if self.store.blobs:
            return self.blobs_path / "uploads"
        return self.state_path / "uploads"

    @property
    def certs_path(self) -> Path:
        """The certificates folder, absolute."""
        return (self.root / self.project.certs_dir).resolve()

    @property
    def task_path(self) -> Path:
        """The task module, absolute."""
        return (self.root / self.project.task).resolve()

    @property
    def client_cache_path(self) -> Path:
        """The client's content-addressed download cache, absolute."""
        return (self.root / self.client.cache_dir).resolve()

    @property
    def mlflow_uri(self) -> str:
        """``[tracking] mlflow_uri`` with a local path made absolute ("" = MLflow off)."""
        return resolve_tracking_uri(self.tracking.mlflow_uri, self.root)

    @property
    def tensorboard_path(self) -> Path | None:
        """``[tracking] tensorboard_dir``, absolute, or None when TensorBoard is off."""
        if not self.tracking.tensorboard_dir:
            return None
        return (self.root / self.tracking.tensorboard_dir).resolve()


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """An MLflow tracking URI with a local store's relative path resolved against ``root``.

    ``file:./mlruns``, ``file:mlruns`` and a bare path (``mlruns``) become ``file:///.../mlruns``;
    an absolute ``file:`` URI stays as it is, as does any other scheme (``http://host:5000``).
    """
    uri = uri.strip()
    if not uri:
        return ""
    parsed = urlsplit(uri)
    # a one-letter scheme is a Windows drive ("C:/runs"), not a scheme
    if len(parsed.scheme) > 1 and (parsed.scheme != "file" or parsed.netloc):
        return uri
    path = unquote(parsed.path) if parsed.scheme == "file" else uri
    return (root / path).resolve().as_uri()


_SECTIONS: dict[str, type[Any]] = {
    "project": ProjectConfig,
    "server": ServerConfig,
    "rounds": RoundsConfig,
    "transport": TransportConfig,
    "client": ClientConfig,
    "data": DataConfig,
    "privacy": PrivacyConfig,
    "secagg": SecAggConfig,
    "gate": GateConfig,
    "simulation": SimulationConfig,
    "store": StoreConfig,
    "tracking": TrackingConfig,
}

# (section, key) -> (lowest allowed, highest allowed); None means unbounded on that side.
_RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("server", "heartbeat_interval_s"): (0.1, 3600),
    ("server", "heartbeat_timeout_s"): (0.5, 86400),
    ("server", "token_ttl_s"): (10, 86400 * 7),
    ("server", "rate_limit_per_s"): (0, 1e6),
    ("server", "rate_limit_burst"): (1, 1_000_000),
    ("server", "handshake_timeout_s"): (0.1, 600),
    ("server", "max_connections"): (16, 1_000_000),
    ("server", "max_connections_per_peer"): (1, 1_000_000),
    ("server", "min_free_mb"): (0, None),
    ("rounds", "min_clients"): (1, None),
    ("rounds", "clients_per_round"): (0, None),
    ("rounds", "fraction_per_round"): (0, 1),
    ("rounds", "over_selection"): (0, None),
    ("rounds", "deadline_s"): (0.5, 86400 * 7),
    ("rounds", "quorum_timeout_s"): (0, 86400 * 7),
    ("rounds", "rejoin_grace_s"): (0, 86400),
    ("rounds", "evaluate_timeout_s"): (0.1, 86400),
    ("rounds", "retries"): (0, 100),
    ("rounds", "max_examples_per_update"): (1, 1 << 40),
    ("rounds", "max_weight_share"): (0.01, 1),
    ("transport", "max_chunk_bytes"): (4096, 4 << 20),
    ("transport", "max_update_bytes"): (0, None),
    ("transport", "compression_level"): (1, 19),
    ("client", "num_threads"): (1, 256),
    ("client", "cache_models"): (1, 10000),
    ("data", "num_partitions"): (1, 100000),
    ("data", "alpha"): (1e-6, None),
    ("privacy", "clip_norm"): (0, None),
    ("privacy", "target_quantile"): (0, 1),
    ("privacy", "clip_learning_rate"): (0, None),
    ("privacy", "clip_count_stddev"): (0, None),
    ("privacy", "noise_multiplier"): (0, None),
    ("privacy", "target_delta"): (0, 1),
    ("privacy", "epsilon_budget"): (0, None),
    ("privacy", "sampling_rate"): (0, 1),
    ("privacy", "sample_size"): (0, None),
    ("privacy", "population"): (0, None),
    ("secagg", "num_shares"): (0, 65534),
    ("secagg", "clip_range"): (1e-12, 1e12),
    ("secagg", "quantization_bits"): (1, SECAGG_MAX_QUANTIZATION_BITS),
    ("secagg", "max_weight"): (1, 1 << 40),
    ("secagg", "stage_timeout_s"): (0.1, 86400),
    ("gate", "max_regression"): (0, None),
    ("gate", "rollback_after"): (0, 1000),
    ("simulation", "workers"): (0, 4096),
    ("simulation", "client_cpus"): (0.01, 1024),
    ("simulation", "client_gpus"): (0, 64),
    ("simulation", "dropout_rate"): (0, 1),
    ("simulation", "straggler_fraction"): (0, 1),
    ("simulation", "straggler_delay_s"): (0, 86400),
}


def _check_value(where: str, key: str, value: Any, tp: Any) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{where}: `{key}` must be one of {choices}, not {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: `{key}` must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: `{key}` must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: `{key}` must be a number, not {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: `{key}` must be finite, not {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: `{key}` must be a string, not {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp!r}")  # pragma: no cover


def _parse_section(path: Path, name: str, cls: type[Any], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [{name}] must be a table, not {raw!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{path}: unknown key `{name}.{key}`",
                hint=f"known keys in [{name}]: {', '.join(sorted(known))}",
            )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = str(path)
        full = f"{name}.{key}"
        checked = _check_value(where, full, value, hints[key])
        bounds = _RANGES.get((name, key))
        if bounds is not None:
            lo, hi = bounds
            if (lo is not None and checked < lo) or (hi is not None and checked > hi):
                span = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
                raise ConfigError(f"{where}: `{full}` must be {span}, not {checked!r}")
        values[key] = checked
    return cls(**values)


def _parse_task(path: Path, raw: Any, table: str = "task") -> dict[str, ConfigValue]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [{table}] must be a table, not {raw!r}")
    out: dict[str, ConfigValue] = {}
    for key, value in raw.items():
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(
                f"{path}: `{table}.{key}` must be a boolean, number or string, not {value!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: `{table}.{key}` must be finite, not {value!r}")
        out[key] = value
    return out


def _parse_strategy(path: Path, raw: Any, alias: Any) -> StrategyConfig:
    """``[strategy]``, with the deprecated ``rounds.strategy`` standing in for its name."""
    params = _parse_task(path, {} if raw is None else raw, "strategy")
    name = params.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{path}: `strategy.name` must be a string, not {name!r}")
    if alias is not None:
        if not isinstance(alias, str):
            raise ConfigError(f"{path}: `rounds.strategy` must be a string, not {alias!r}")
        if name is not None and name != alias:
            raise ConfigError(
                f"{path}: `rounds.strategy` ({alias!r}) and `strategy.name` ({name!r}) disagree",
                hint="`rounds.strategy` is deprecated: remove it and keep [strategy] name",
            )
        log.warning(
            "%s: `rounds.strategy` is deprecated; use `name = %r` in a [strategy] table",
            path,
            alias,
        )
        name = alias
    if name is not None and not name:
        raise ConfigError(f"{path}: `strategy.name` must name a strategy, not {name!r}")
    switches: dict[str, bool] = {}
    for key, default in (("incremental", False), ("streaming", True)):
        value = params.pop(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: `strategy.{key}` must be true or false, not {value!r}")
        switches[key] = value
    outliers = _parse_outliers(path, params)
    return StrategyConfig(
        name=name or StrategyConfig.name,
        params=params,
        incremental=switches["incremental"],
        streaming=switches["streaming"],
        **outliers,
    )


def _parse_outliers(path: Path, params: dict[str, ConfigValue]) -> dict[str, Any]:
    """Take ``exclude_outliers`` and ``outlier_threshold`` out of the strategy's parameters."""
    hints = get_type_hints(StrategyConfig)
    found: dict[str, Any] = {}
    for key in ("exclude_outliers", "outlier_threshold"):
        if key in params:
            found[key] = _check_value(str(path), f"strategy.{key}", params.pop(key), hints[key])
    threshold = found.get("outlier_threshold")
    if threshold is None:
        return found
    if threshold <= 0:
        raise ConfigError(
            f"{path}: `strategy.outlier_threshold` must be greater than 0, not {threshold!r}"
        )
    if found.get("exclude_outliers", "off") == "off":
        raise ConfigError(
            f"{path}: `strategy.outlier_threshold` ({threshold:g}) needs "
            '`strategy.exclude_outliers` "flag" or "drop": with "off" the outlier rule is not '
            "applied",
        )
    return found


def parse_config(data: dict[str, Any], *, path: Path, root: Path | None = None) -> Config:
    """Validate an already-parsed TOML mapping into a :class:`Config`.

    Args:
        data: The mapping ``tomllib`` returned.
        path: The file it came from, named in every error.
        root: The folder relative paths resolve against (defaults to the file's folder).

    Raises:
        ConfigError: A key is unknown, has the wrong type or is out of range, or keys contradict
            each other (a ``[privacy]`` combination the accountant cannot account for).
    """
    sections: dict[str, Any] = {}
    alias = None
    if isinstance(data.get("rounds"), dict) and "strategy" in data["rounds"]:
        data = {**data, "rounds": dict(data["rounds"])}
        alias = data["rounds"].pop("strategy")  # deprecated: [strategy] name
    sections["strategy"] = _parse_strategy(path, data.get("strategy"), alias)
    for key, raw in data.items():
        if key == "task":
            sections["task"] = _parse_task(path, raw)
        elif key == "strategy":
            continue
        elif key in _SECTIONS:
            sections[key] = _parse_section(path, key, _SECTIONS[key], raw)
        else:
            known = ", ".join(sorted([*_SECTIONS, "strategy", "task"]))
            raise ConfigError(f"{path}: unknown table [{key}]", hint=f"known tables: {known}")
    config = Config(**sections, root=(root or path.parent).resolve())
    if config.rounds.clients_per_round and config.rounds.clients_per_round < (
        config.rounds.min_clients
    ):
        raise ConfigError(
            f"{path}: `rounds.clients_per_round` ({config.rounds.clients_per_round}) is below "
            f"`rounds.min_clients` ({config.rounds.min_clients}): no round could reach its quorum"
        )
    if config.rounds.clients_per_round and config.rounds.fraction_per_round:
        raise ConfigError(
            f"{path}: `rounds.clients_per_round` and `rounds.fraction_per_round` both select: "
            "set one of them"
        )
    if config.rounds.over_selection and config.privacy.mode != "off":
        raise ConfigError(
            f"{path}: `rounds.over_selection` cannot be used with privacy: the accountant "
            "models the sampling, and over-selection would change it"
        )
    _check_heartbeat(path, config)
    _check_privacy(path, config)
    _check_secagg(path, config)
    _check_outliers(path, config)
    _check_gate(path, config)
    _check_tracking(path, config)
    return config


def _check_heartbeat(path: Path, config: Config) -> None:
    """Refuse a heartbeat timeout that a client sending every interval could still miss."""
    s = config.server
    if s.heartbeat_timeout_s < 2 * s.heartbeat_interval_s:
        raise ConfigError(
            f"{path}: `server.heartbeat_timeout_s` ({s.heartbeat_timeout_s:g}) must be at least "
            f"twice `server.heartbeat_interval_s` ({s.heartbeat_interval_s:g}): a client is "
            "dropped after heartbeat_timeout_s without a heartbeat, so one late heartbeat "
            "would drop a healthy client",
            hint=f"set heartbeat_timeout_s to {2 * s.heartbeat_interval_s:g} or more, or "
            "lower heartbeat_interval_s",
        )


def _check_gate(path: Path, config: Config) -> None:
    """Refuse a ``[gate]`` table whose keys contradict each other."""
    g = config.gate
    if not g.metric.strip():
        raise ConfigError(f"{path}: `gate.metric` must name a metric, not {g.metric!r}")
    if g.rollback_after and g.mode == "off":
        raise ConfigError(
            f'{path}: `gate.rollback_after` ({g.rollback_after}) needs `gate.mode` "finite" or '
            '"metric": with the gate off no round is ever rejected',
        )


def _check_tracking(path: Path, config: Config) -> None:
    """Refuse MLflow tracking without an experiment (whether the URI works is checked at start)."""
    t = config.tracking
    if t.mlflow_uri.strip() and not t.experiment.strip():
        raise ConfigError(
            f"{path}: `tracking.experiment` must name an MLflow experiment, not {t.experiment!r}"
        )


def _check_outliers(path: Path, config: Config) -> None:
    """Refuse dropping outliers under differential privacy, whose accounting it would void."""
    mode = config.privacy.mode
    if config.strategy.exclude_outliers == "drop" and mode != "off":
        raise ConfigError(
            f'{path}: `strategy.exclude_outliers = "drop"` cannot be combined with '
            f'`privacy.mode = "{mode}"`: which updates are dropped depends on all of them, so one '
            "client can change the aggregate by more than the clipping norm the accountant "
            "counts on",
            hint='use exclude_outliers = "flag" (the scores are recorded, nothing is dropped), '
            'or privacy.mode = "off"',
        )


def _check_secagg(path: Path, config: Config) -> None:
    """Refuse a ``[secagg]`` table out of range, or combined with what needs each update.

    With secure aggregation the coordinator holds the sum of a round's updates only; whatever
    reads one update on its own cannot run. The strategy itself (a robust rule needs each
    update too) is checked where strategies are known (``flctl.coordinator.build_strategy``).
    """
    s = config.secagg
    if not 0.5 < s.threshold <= 1:
        raise ConfigError(
            f"{path}: `secagg.threshold` must be above 0.5 and at most 1, not {s.threshold!r}",
            hint="above one half, no two disjoint groups of clients can each rebuild one of a "
            "client's two secrets (docs/secagg.md, threat model)",
        )
    if not s.enabled:
        return
    if config.rounds.min_clients < 2:
        raise ConfigError(
            f"{path}: `rounds.min_clients` ({config.rounds.min_clients}) must be at least 2 with "
            "secure aggregation: the sum of one update is that update",
        )
    why = "with `secagg.enabled` the coordinator sees only the sum of a round's updates"
    if config.strategy.exclude_outliers != "off":
        raise ConfigError(
            f'{path}: `strategy.exclude_outliers = "{config.strategy.exclude_outliers}"` cannot '
            f"be combined with secure aggregation: {why}, and anomaly scores are computed on "
            "each update",
            hint='set exclude_outliers = "off", or secagg.enabled = false',
        )
    if config.privacy.mode == "local":
        raise ConfigError(
            f'{path}: `privacy.mode = "local"` cannot be combined with secure aggregation: '
            "each client's noise is sized to hide it alone; with SecAgg use central DP, whose "
            "noise the coordinator adds to the unmasked sum (docs/privacy.md)",
            hint='set privacy.mode = "central", or secagg.enabled = false',
        )
    if config.privacy.mode == "central" and config.privacy.adaptive_clip:
        raise ConfigError(
            f"{path}: `privacy.adaptive_clip` cannot be combined with secure aggregation: {why}, "
            "and adaptive clipping counts the updates whose norm is under the clip norm",
            hint="set adaptive_clip = false (each client clips to privacy.clip_norm)",
        )
    if config.rounds.max_weight_share < 1:
        raise ConfigError(
            f"{path}: `rounds.max_weight_share` ({config.rounds.max_weight_share:g}) cannot be "
            f"combined with secure aggregation: {why}, and capping a share needs each "
            "update's weight",
            hint="bound the weights with secagg.max_weight instead (each client's weight is "
            "min(num_examples, max_weight))",
        )


def _check_privacy(path: Path, config: Config) -> None:
    """Refuse a ``[privacy]`` table the accountant cannot account for, naming the key."""
    p = config.privacy
    if p.mode == "off":
        return

    def fail(key: str, why: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{path}: `privacy.{key}` {why}", hint=hint)

    on = f"when `privacy.mode` is {p.mode!r}"
    if p.noise_multiplier <= 0:
        raise fail("noise_multiplier", f"must be greater than 0 {on}, not {p.noise_multiplier!r}")
    if p.clip_norm <= 0:
        what = "the initial clipping norm" if p.adaptive_clip else "the clipping norm"
        raise fail("clip_norm", f"({what}) must be greater than 0 {on}, not {p.clip_norm!r}")
    if not 0 < p.target_delta < 1:
        raise fail("target_delta", f"must be strictly between 0 and 1 {on}, not {p.target_delta!r}")
    if p.epsilon_budget <= 0:
        raise fail("epsilon_budget", f"must be greater than 0 {on}, not {p.epsilon_budget!r}")
    if p.adaptive_clip:
        if p.mode == "local":
            raise fail(
                "adaptive_clip",
                'is only available with `privacy.mode = "central"`: the clipping-norm '
                "estimate is computed and noised by the coordinator",
            )
        if not 0 < p.target_quantile < 1:
            raise fail(
                "target_quantile",
                f"must be strictly between 0 and 1 with adaptive clipping, not "
                f"{p.target_quantile!r}",
            )
        if p.clip_learning_rate <= 0:
            raise fail(
                "clip_learning_rate",
                f"must be greater than 0 with adaptive clipping, not {p.clip_learning_rate!r}",
            )
        _check_count_stddev(p, fail)
    if p.sampling == "poisson":
        if not 0 < p.sampling_rate <= 1:
            raise fail(
                "sampling_rate",
                f'must be in (0, 1] with `privacy.sampling = "poisson"`, not {p.sampling_rate!r}',
            )
        return
    if p.sample_size < 1:
        raise fail(
            "sample_size",
            f'must be at least 1 with `privacy.sampling = "fixed"`, not {p.sample_size!r}',
        )
    if p.population < p.sample_size:
        raise fail(
            "population",
            f"({p.population}) must be at least `privacy.sample_size` ({p.sample_size}) with "
            '`privacy.sampling = "fixed"`',
            hint="population is the number of clients that may ever take part",
        )
    if p.sample_size < config.rounds.min_clients:
        raise fail(
            "sample_size",
            f"({p.sample_size}) is below `rounds.min_clients` ({config.rounds.min_clients}): "
            "no round could reach its quorum",
        )
    if p.accountant == "pld":
        raise fail(
            "accountant",
            'must be "rdp" with `privacy.sampling = "fixed"`, not "pld": dp-accounting '
            "accounts fixed-size sampling only with RDP, under replace-one adjacency",
            hint='set accountant = "rdp", or sampling = "poisson" with a sampling_rate',
        )


def _check_count_stddev(p: PrivacyConfig, fail: Callable[..., ConfigError]) -> None:
    """Adaptive clipping splits ``noise_multiplier``: the count's share must leave some over.

    The deltas get ``z_delta = (z^-2 - (2 * sigma_b)^-2)^-1/2``, which needs ``2 * sigma_b > z``.
    With ``clip_count_stddev = 0`` (expected clients per round / 20) the check waits for the
    round when the expected number of clients is not known yet (Poisson, no population).
    """
    expected = None
    if p.sampling == "fixed":
        expected = float(p.sample_size)
    elif p.population:
        expected = p.sampling_rate * p.population
    stddev = p.clip_count_stddev or (expected / 20 if expected else None)
    if stddev is None or 2 * stddev > p.noise_multiplier:
        return
    what = (
        f"({p.clip_count_stddev:g})"
        if p.clip_count_stddev
        else f"(0: the expected clients per round / 20 = {stddev:g})"
    )
    raise fail(
        "clip_count_stddev",
        f"{what} must be more than half of `privacy.noise_multiplier` ({p.noise_multiplier:g}) "
        "with adaptive clipping: the count of unclipped updates takes its share of the noise "
        "from it, and would take all of it",
        hint="set clip_count_stddev above noise_multiplier / 2 (docs/privacy.md, adaptive "
        "clipping)",
    )


def load_config(path: Path) -> Config:
    """Read and validate ``flctl.toml`` at ``path``.

    Raises:
        ConfigError: The file is missing, is not valid TOML, or fails validation.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProjectNotFoundError(
            f"{path}: no such file", hint="run `flctl init NAME` to create a project"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, path=path)


def find_project(start: Path | None = None) -> Path:
    """Return the path of the nearest ``flctl.toml`` in ``start`` or a parent folder.

    Raises:
        ProjectNotFoundError: There is none up to the file-system root.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_FILE
        if candidate.is_file():
            return candidate
    raise ProjectNotFoundError(
        f"no {CONFIG_FILE} in {here} or any parent folder",
        hint="run `flctl init NAME` to create a project, or cd into one",
    )
