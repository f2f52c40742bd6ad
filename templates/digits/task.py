"""The digits task: a small CNN learns handwritten digits, trained across federated clients.

This file is the whole machine-learning side of the project, in plain PyTorch. flctl imports
it on the coordinator and on every client and calls three functions:

- ``build_model(context)``: the architecture. flctl seeds torch with ``context.seed`` before
  calling it for the initial global model, so every run of a project starts from the same
  weights.
- ``client_fn(context)``: the client a data owner runs. It holds one slice (partition) of the
  training data and trains the global model on it in ``fit``.
- ``server_evaluate(parameters, context)``: the coordinator's evaluation of each new global
  model on held-out test images; its metrics are the round's metrics.

With ``[rounds] evaluate = "clients"`` (or ``"both"``) flctl also calls each client's
``evaluate``: it scores the new global model on that client's share of the held-out test
images, never on the images it trains on.

The data is scikit-learn's copy of the UCI handwritten digits (1,797 grey 8x8 images, shipped
inside scikit-learn, so nothing is downloaded). Real deployments would read each client's own
data instead; here every client loads the same file and keeps only its partition, which
simulates data owners with disjoint data sets on one machine.

The hyperparameters (``local_epochs``, ``batch_size``, ...) live in the ``[task]`` table of
flctl.toml. flctl sends that table to the clients as the ``config`` argument of ``fit`` and
``evaluate`` each round, so changing them needs no code change.

Reproducibility: two runs of a project with the same seed, clients, partitions and thread
count give the same models, bit for bit, and the same metrics. The data split comes from the
seed; each ``fit`` shuffles with a generator seeded by (seed, partition, round), never by the
global torch generator; flctl sums the updates in a fixed order whatever order they arrive in.
What can still change the last bits: the number of torch threads (``client.num_threads``,
``flctl join --threads``; kernels split their sums differently across threads), and the device.
On a GPU the client turns on ``torch.use_deterministic_algorithms``, which makes cuDNN and
cuBLAS pick reproducible kernels (and raises on an operation that has none); results still
differ between GPU models, and between a GPU and the CPU.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from flctl.client import Client, proximal_term
from flctl.core import TaskContext

# The split of the 1,797 images: the first 1,437 of the shuffled order train, the rest test.
NUM_TRAIN = 1437
NUM_CLASSES = 10

# Used when a key is missing from the round's config; flctl.toml's [task] table sets them.
DEFAULTS: dict[str, Any] = {
    "local_epochs": 2,
    "batch_size": 16,
    "lr": 0.05,
    "momentum": 0.9,
}

# Under Dirichlet partitioning, each client gets at least this many training images.
MIN_PARTITION_SIZE = 10


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as (pixels (1797, 64), targets (1797,)).

    ``sklearn.datasets.load_digits`` reads ``digits.csv.gz`` from inside the scikit-learn
    package; importing scikit-learn to do so costs seconds in every process. The same file is
    read here directly (located without importing the package), and ``load_digits`` is the
    fallback if the file is not where this version of scikit-learn keeps it.
    """
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as fh:
                data = np.loadtxt(fh, delimiter=",")
            if data.shape == (1797, 65):
                return data[:, :-1], data[:, -1]
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data, digits.target


@functools.lru_cache(maxsize=4)
def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)``, shuffled by ``seed``.

    Images are float32 arrays of shape (N, 1, 8, 8) with pixels in [0, 1]; labels are int64.
    The result is cached, so every call after the first is free; the arrays are read-only
    because they are shared between callers.
    """
    pixels, targets = _read_digits()
    images = (pixels.reshape(-1, 8, 8) / 16.0).astype(np.float32)[:, None, :, :]  # + channel
    labels = targets.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    arrays = (images[:NUM_TRAIN], labels[:NUM_TRAIN], images[NUM_TRAIN:], labels[NUM_TRAIN:])
    for array in arrays:
        array.setflags(write=False)
    return arrays


def partition_indices(
    labels: np.ndarray,
    *,
    num_partitions: int,
    partition_id: int,
    partitioning: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Return the (sorted) indices into ``labels`` that partition ``partition_id`` holds.

    Every client computes the same split from the same seed and keeps its own slice, so the
    partitions are disjoint and together cover the whole training set.

    - ``"iid"``: a random permutation cut into ``num_partitions`` equal shards.
    - ``"dirichlet"``: for each class, the share of each client is drawn from
      Dirichlet(``alpha``); smaller ``alpha`` gives more skewed (non-IID) clients.

    Raises:
        ValueError: ``partition_id`` or ``num_partitions`` is out of range, or ``partitioning``
            is unknown.
    """
    n = len(labels)
    if not 1 <= num_partitions <= n:
        raise ValueError(f"num_partitions must be between 1 and {n}, not {num_partitions!r}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id must be between 0 and {num_partitions - 1}, not {partition_id!r}"
        )
    # A generator of its own (not the one that shuffled the data) so the split is independent.
    rng = np.random.default_rng([seed, 1])
    if partitioning == "iid":
        shards = np.array_split(rng.permutation(n), num_partitions)
    elif partitioning == "dirichlet":
        shards = _dirichlet_shards(labels, num_partitions, alpha, rng)
    else:
        raise ValueError(f"partitioning must be 'iid' or 'dirichlet', not {partitioning!r}")
    return np.sort(shards[partition_id])


def _dirichlet_shards(
    labels: np.ndarray, num_partitions: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split indices per class by Dirichlet proportions; every shard gets a few samples."""
    min_size = min(MIN_PARTITION_SIZE, len(labels) // num_partitions)
    for _attempt in range(10):  # redraw while some client gets (almost) nothing
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for part, piece in zip(parts, np.split(members, cuts), strict=True):
                part.append(piece)
        shards = [np.concatenate(part) for part in parts]
        if min(len(shard) for shard in shards) >= min_size:
            return shards
    # Many clients and little data: top up the smallest shards from the largest.
    sizes = [len(shard) for shard in shards]
    while min(sizes) < min_size:
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        shards[small] = np.append(shards[small], shards[large][-1])
        shards[large] = shards[large][:-1]
        sizes[small] += 1
        sizes[large] -= 1
    return shards


def use_deterministic_kernels(device: torch.device) -> None:
    """On a GPU, make torch use reproducible kernels (raising where an operation has none).

    On the CPU every operation this model uses is deterministic for a given thread count, and
    the setting would only slow flctl's own tensor code in this process, so it is left off.
    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first matrix product to be reproducible.
    """
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def load_partition(context: TaskContext) -> tuple[np.ndarray, np.ndarray]:
    """Return the training images and labels of this client's partition."""
    x_train, y_train, _, _ = load_data(context.seed)
    indices = partition_indices(
        y_train,
        num_partitions=context.num_partitions,
        partition_id=context.partition_id,
        partitioning=context.partitioning,
        alpha=context.alpha,
        seed=context.seed,
    )
    return x_train[indices], y_train[indices]


def load_test_partition(context: TaskContext) -> tuple[np.ndarray, np.ndarray]:
    """Return this client's share of the held-out test images (an IID shard of them).

    A stand-in for a data owner's own held-out data: disjoint from every client's training
    partition, so ``evaluate`` measures the model on images no client trained on.
    """
    _, _, x_test, y_test = load_data(context.seed)
    shards = min(context.num_partitions, len(y_test))
    indices = partition_indices(
        y_test,
        num_partitions=shards,
        partition_id=context.partition_id % shards,
        seed=context.seed,
    )
    return x_test[indices], y_test[indices]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, one 2x2 max-pool and two linear layers (about 38k parameters).

    Small on purpose: the whole state dict (about 150 kB) travels to every client and back
    each round.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)  # 1x8x8 -> 16x8x8
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)  # -> 32x8x8
        self.pool = nn.MaxPool2d(2)  # -> 32x4x4
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)  # logits


def build_model(context: TaskContext) -> nn.Module:
    """Return a fresh, untrained model (flctl seeds torch before calling this)."""
    return DigitsCNN()


# ---------------------------------------------------------------------------------------------
# Training and evaluation helpers
# ---------------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    generator: torch.Generator,
    progress: Callable[[int, int], None] | None = None,
    proximal_mu: float = 0.0,
) -> tuple[float, float]:
    """Train ``model`` in place with SGD; return (mean loss, accuracy) of the last epoch.

    ``progress``, when given, is called after each batch with (batches done, batches in all).
    With ``proximal_mu > 0`` (the fedprox strategy sends it), each batch's loss also has
    FedProx's term ``proximal_mu / 2 * ||w - w_start||^2``, which keeps the model near the
    global model it started from; the reported loss is the data's loss alone.
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    global_params = (
        {n: t.detach().clone() for n, t in model.named_parameters()} if proximal_mu > 0 else {}
    )
    n = len(y)
    total_batches = epochs * math.ceil(n / batch_size)
    done_batches = 0
    loss_sum, correct = 0.0, 0
    for _epoch in range(epochs):
        loss_sum, correct = 0.0, 0
        # The shuffle is drawn on the CPU (the generator lives there), then moved to x's device.
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            logits = model(x[batch])
            loss = loss_fn(logits, y[batch])
            optimizer.zero_grad()
            if proximal_mu > 0:
                (loss + proximal_term(model, global_params, proximal_mu)).backward()
            else:
                loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            correct += int((logits.argmax(1) == y[batch]).sum().item())
            done_batches += 1
            if progress is not None:
                progress(done_batches, total_batches)
    mean_loss = loss_sum / n
    if not math.isfinite(mean_loss):
        raise ValueError(f"training diverged (loss {mean_loss!r}): lower `task.lr`")
    return mean_loss, correct / n


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on ``(x, y)``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        labels = y[start : start + batch_size]
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum().item())
    return loss_sum / len(y), correct / len(y)


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a detached copy of the model's state dict on the CPU."""
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class DigitsClient(Client):
    """A data owner: its partition of the training images, and a model to train on them."""

    def __init__(self, context: TaskContext) -> None:
        self.context = context
        self.device = torch.device(context.device)  # already resolved from "auto" by flctl
        use_deterministic_kernels(self.device)
        x, y = load_partition(context)
        # torch.tensor copies, so the cached read-only arrays are never written to.
        self.x = torch.tensor(x, device=self.device)
        self.y = torch.tensor(y, device=self.device)
        self.model = build_model(context).to(self.device)
        self.held_out: tuple[torch.Tensor, torch.Tensor] | None = None

    def get_parameters(self) -> dict[str, torch.Tensor]:
        return cpu_state_dict(self.model)

    def fit(
        self, parameters: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        """Train the global model on the local partition; return it with the FedAvg weight."""
        self.model.load_state_dict(parameters)
        # Deterministic: the same seed, partition and round always shuffle the same way (a
        # generator of its own: the global one would depend on what ran before in the process).
        server_round = int(config.get("server_round", 0))
        generator = torch.Generator().manual_seed(
            self.context.seed + self.context.partition_id + 1000 * server_round
        )
        loss, accuracy = train(
            self.model,
            self.x,
            self.y,
            epochs=int(config.get("local_epochs", DEFAULTS["local_epochs"])),
            batch_size=int(config.get("batch_size", DEFAULTS["batch_size"])),
            lr=float(config.get("lr", DEFAULTS["lr"])),
            momentum=float(config.get("momentum", DEFAULTS["momentum"])),
            generator=generator,
            # flctl shows it on the coordinator's panel ("training 40%")
            progress=self.context.report_progress,
            # sent by the fedprox strategy; 0 (or absent) trains as under FedAvg
            proximal_mu=float(config.get("proximal_mu", 0.0)),
        )
        metrics = {"train_loss": float(loss), "train_accuracy": float(accuracy)}
        return cpu_state_dict(self.model), len(self.y), metrics

    def evaluate(
        self, parameters: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, float]]:
        """Evaluate the global model on this client's held-out images (``load_test_partition``)."""
        if self.held_out is None:  # read once, on the first evaluation
            x, y = load_test_partition(self.context)
            self.held_out = (
                torch.tensor(x, device=self.device),
                torch.tensor(y, device=self.device),
            )
        x_test, y_test = self.held_out
        self.model.load_state_dict(parameters)
        loss, accuracy = evaluate(self.model, x_test, y_test)
        return float(loss), len(y_test), {"accuracy": float(accuracy)}


def client_fn(context: TaskContext) -> Client:
    """Return the client for ``context.partition_id`` (called once when a client joins)."""
    return DigitsClient(context)


# ---------------------------------------------------------------------------------------------
# The coordinator's evaluation
# ---------------------------------------------------------------------------------------------


def server_evaluate(
    parameters: dict[str, torch.Tensor], context: TaskContext
) -> tuple[float, dict[str, float]]:
    """Evaluate a global model on the 360 held-out test images."""
    _, _, x_test, y_test = load_data(context.seed)
    device = torch.device(context.device)
    model = build_model(context).to(device)
    model.load_state_dict(parameters)
    x = torch.tensor(x_test, device=device)
    y = torch.tensor(y_test, device=device)
    loss, accuracy = evaluate(model, x, y)
    return float(loss), {"accuracy": float(accuracy), "loss": float(loss)}


# ---------------------------------------------------------------------------------------------
# Your own strategy (optional)
# ---------------------------------------------------------------------------------------------
# flctl.toml's [strategy] table picks a built-in (`flctl strategies ls`). To aggregate your own
# way, define strategy_fn: the coordinator then uses the strategy it returns instead (and
# refuses a [strategy] table that sets anything but name = "fedavg"). Uncomment this example,
# FedAvg with a server learning rate (new = base + server_lr * (mean - base)), to try it; try it
# offline first with `flctl aggregate --task task.py --base ... --update ... -o ...`.
#
# from flctl.aggregation import FedAvg, Strategy
# from flctl.tensors import load_parameters, save_parameters
#
# class ServerLrFedAvg(Strategy):
#     name = "server-lr-fedavg"
#
#     def __init__(self, server_lr: float) -> None:
#         self.server_lr = server_lr
#
#     def aggregate(self, base, updates, out):
#         FedAvg().aggregate(base, updates, out)  # the weighted mean, written to out
#         old, mean = load_parameters(base), load_parameters(out)
#         step = {k: (v + self.server_lr * (mean[k] - v)).to(v.dtype) for k, v in old.items()}
#         save_parameters(step, out)
#
# def strategy_fn(context: TaskContext) -> Strategy:
#     return ServerLrFedAvg(float(context.config.get("server_lr", 1.0)))
