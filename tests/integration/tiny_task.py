"""A tiny task for integration tests: a linear model on synthetic data, milliseconds per round.

Behaviour switches come from the [task] table, so tests can make a client misbehave:
``hang_client`` (this client id never finishes fit), ``nan_client`` (returns NaN),
``fit_sleep_s`` (every fit takes at least that long), ``flip_client`` (this client's change is
sign-flipped and scaled by 5), ``sabotage_from_round`` (from that round
on every client returns finite but bad weights, as ``sabotage`` says: ``"invert"``, the trained
weights times -1000, so the loss explodes; ``"overflow"``, every value 3e38, so the model's
outputs overflow and the evaluated loss is NaN).

``evaluate`` (``rounds.evaluate = "clients"``) scores the model on a held-out split of
``8 * (partition + 1)`` examples, so clients weigh differently; ``evaluate_raises`` names a
client id whose evaluate raises, ``evaluate_hang`` one whose evaluate never finishes.
"""

from __future__ import annotations

import threading

import torch

from flctl.client import Client

_HANG = threading.Event()


def _features(context) -> int:  # noqa: ANN001
    return int(context.config.get("in_features", 4))


def build_model(context):  # noqa: ANN001, ANN201
    return torch.nn.Linear(_features(context), 2)


def _data(seed: int, partition: int, features: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + partition)
    x = torch.randn(64, features, generator=gen)
    y = (x[:, 0] > 0).long()
    return x, y


class TinyClient(Client):
    def __init__(self, context) -> None:  # noqa: ANN001
        self.context = context
        self.model = build_model(context)
        self.x, self.y = _data(context.seed, context.partition_id, _features(context))
        self.received: list[dict[str, torch.Tensor]] = []

    def get_parameters(self):  # noqa: ANN201
        return self.model.state_dict()

    def fit(self, parameters, config):  # noqa: ANN001, ANN201
        self.received.append({k: v.clone() for k, v in parameters.items()})
        if config.get("hang_client") == self.context.client_id:
            _HANG.wait(60)
        _HANG.wait(float(config.get("fit_sleep_s", 0.0)))
        self.model.load_state_dict(parameters)
        opt = torch.optim.SGD(self.model.parameters(), lr=float(config.get("lr", 0.1)))
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = self.model.state_dict()
        if config.get("flip_client") == self.context.client_id:
            # a Byzantine client: its change to the model sign-flipped and scaled by 5
            state = {
                k: p - 5.0 * (v - p) if v.is_floating_point() else v
                for (k, v), p in zip(state.items(), parameters.values(), strict=True)
            }
        if config.get("nan_client") == self.context.client_id:
            state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        sabotage_from = int(config.get("sabotage_from_round", 0))
        if sabotage_from and int(config.get("server_round", 0)) >= sabotage_from:
            if config.get("sabotage", "invert") == "overflow":
                state = {k: torch.full_like(v, 3e38) for k, v in state.items()}
            else:
                state = {k: v * -1000.0 for k, v in state.items()}
        return state, len(self.x), {"train_loss": loss.item()}

    def evaluate(self, parameters, config):  # noqa: ANN001, ANN201
        if config.get("evaluate_raises") == self.context.client_id:
            raise RuntimeError("held-out split unreadable")
        if config.get("evaluate_hang") == self.context.client_id:
            _HANG.wait(60)
        model = build_model(self.context)
        model.load_state_dict(parameters)
        x, y = _data(self.context.seed, 500 + self.context.partition_id, _features(self.context))
        n = 8 * (self.context.partition_id + 1)
        with torch.no_grad():
            logits = model(x[:n])
            loss = float(torch.nn.functional.cross_entropy(logits, y[:n]))
            acc = float((logits.argmax(1) == y[:n]).float().mean())
        return loss, n, {"accuracy": acc, "examples": float(n)}


def client_fn(context):  # noqa: ANN001, ANN201
    return TinyClient(context)


def server_evaluate(parameters, context):  # noqa: ANN001, ANN201
    model = build_model(context)
    model.load_state_dict(parameters)
    x, y = _data(context.seed, 999, _features(context))
    with torch.no_grad():
        logits = model(x)
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
    return loss, {"accuracy": acc}


def release_hung_clients() -> None:
    _HANG.set()
