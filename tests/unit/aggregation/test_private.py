"""Privacy around a strategy: the private mean is released, a mean-based strategy steps on it.

- with FedAvg or FedProx the model is DP-FedAvg's (central) or LocalDpFedAvg's (local) file,
  byte for byte, for the same seeded noise generator;
- a server optimizer steps on the noised mean as if it were the round's one update, and its
  state round-trips through the wrapper;
- everything but aggregation is the inner strategy's;
- robust strategies, and custom ones that do not declare themselves mean-based, are refused
  in both modes with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from flctl.aggregation import (
    BUILTIN_STRATEGIES,
    DpFedAvg,
    EvaluateResult,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    LocalDpFedAvg,
    PrivateStrategy,
    Strategy,
    WeightedUpdate,
    check_private,
    make_strategy,
)
from flctl.aggregation._private import MEAN_UPDATE_ID
from flctl.aggregation._strategy import ParamValue
from flctl.core.errors import (
    ConfigError,
    InconsistentUpdatesError,
    NotEnoughUpdatesError,
    PrivacyError,
)
from flctl.privacy import AdaptiveClipping, privatize_update
from flctl.tensors import encode_update, load_parameters, save_parameters

ROBUST = ["bulyan", "fedmedian", "fedtrimmedavg", "krum", "multikrum"]
MEAN_BASED = ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedprox", "fedyogi"]
CLIP, Z, DENOMINATOR = 1.0, 1.1, 4.0


def seeded(seed: int = 7) -> torch.Generator:
    """A noise generator seeded in tests only (the coordinator's is seeded by the OS)."""
    return torch.Generator().manual_seed(seed)


def model(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": scale * torch.randn(4, 3, 3, generator=gen),
        "half": (scale * torch.randn(5, generator=gen)).to(torch.float16),
        "wide": (scale * torch.randn(2, 3, generator=gen)).to(torch.float64),
        "bn.num_batches_tracked": torch.tensor(3, dtype=torch.int64),
    }


def federation(folder: Path, seed: int = 0, encoding: str = "full") -> list[WeightedUpdate]:
    """``folder/base`` and four updates (two clipped at CLIP, two not), their counters moved."""
    gen = torch.Generator().manual_seed(seed)
    base = model(gen)
    save_parameters(base, folder / "base")
    updates = []
    for i, scale in enumerate((0.01, 0.05, 2.0, 5.0)):
        trained = {
            n: (t.double() + scale * torch.randn(t.shape, generator=gen, dtype=torch.float64)).to(
                t.dtype
            )
            if t.is_floating_point()
            else torch.tensor(100 + i, dtype=t.dtype)
            for n, t in base.items()
        }
        path = folder / f"u{i}"
        encode_update(folder / "base", trained, path, encoding=encoding, dtype="float32")
        updates.append(WeightedUpdate(path, 10 * (i + 1), f"c{i}"))
    return updates


def noised_updates(folder: Path, seed: int = 0) -> list[WeightedUpdate]:
    """``folder/base`` and three updates clipped and noised as local DP's clients do."""
    gen = torch.Generator().manual_seed(seed)
    base = model(gen)
    save_parameters(base, folder / "base")
    updates = []
    for i in range(3):
        trained = {
            n: t + 0.3 * torch.randn(t.shape, generator=gen).to(t.dtype)
            if t.is_floating_point()
            else torch.tensor(50 + i, dtype=t.dtype)
            for n, t in base.items()
        }
        path = folder / f"u{i}"
        privatize_update(
            folder / "base", trained, path, clip_norm=CLIP, noise_multiplier=Z, generator=gen
        )
        updates.append(WeightedUpdate(path, 10 ** (i + 1), f"c{i}"))
    return updates


@pytest.mark.parametrize("inner", [FedAvg, FedProx])
@pytest.mark.parametrize("encoding", ["full", "delta"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_central_with_fedavg_is_dpfedavg_byte_for_byte(
    tmp_path: Path, inner: type[FedAvg], encoding: str, adaptive: bool
) -> None:
    updates = federation(tmp_path, encoding=encoding)
    clipping = AdaptiveClipping(0.5, 0.2, 1.5) if adaptive else None
    alone = DpFedAvg(CLIP, Z, DENOMINATOR, generator=seeded(), adaptive=clipping)
    alone.aggregate(tmp_path / "base", updates, tmp_path / "alone")
    release = DpFedAvg(CLIP, Z, DENOMINATOR, generator=seeded(), adaptive=clipping)
    wrapped = PrivateStrategy(inner(), release)
    wrapped.aggregate(tmp_path / "base", updates, tmp_path / "wrapped")
    assert (tmp_path / "wrapped").read_bytes() == (tmp_path / "alone").read_bytes()
    assert wrapped.mode == "central" and wrapped.has_released
    # what the engine reads after the round, as from DpFedAvg
    assert wrapped.last_unclipped_fraction == alone.last_unclipped_fraction
    assert (wrapped.last_unclipped_fraction is None) is (not adaptive)
    assert release.last_clip_factors == alone.last_clip_factors
    # integer tensors come from the base, never from a client
    assert int(load_parameters(tmp_path / "wrapped")["bn.num_batches_tracked"]) == 3
    # the release's file is gone: only the inputs and the two outputs are left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["base", "alone", "wrapped", *(u.path.name for u in updates)]
    )


def test_local_with_fedavg_is_localdpfedavg_byte_for_byte(tmp_path: Path) -> None:
    updates = noised_updates(tmp_path)
    LocalDpFedAvg().aggregate(tmp_path / "base", updates, tmp_path / "alone")
    wrapped = PrivateStrategy(FedAvg(), LocalDpFedAvg())
    wrapped.aggregate(tmp_path / "base", updates, tmp_path / "wrapped")
    assert (tmp_path / "wrapped").read_bytes() == (tmp_path / "alone").read_bytes()
    assert wrapped.mode == "local" and wrapped.last_unclipped_fraction is None
    # local DP's convention holds: equal weights (num_examples 10, 100, 1000 are not used)
    assert int(load_parameters(tmp_path / "wrapped")["bn.num_batches_tracked"]) == 3


def test_local_refuses_a_full_model_as_localdpfedavg_does(tmp_path: Path) -> None:
    updates = federation(tmp_path, encoding="full")
    wrapped = PrivateStrategy(FedAvg(), LocalDpFedAvg())
    with pytest.raises(InconsistentUpdatesError, match="full model"):
        wrapped.aggregate(tmp_path / "base", updates, tmp_path / "out")
    assert not wrapped.has_released


@pytest.mark.parametrize("mode", ["central", "local"])
def test_fedadam_steps_on_the_private_mean(tmp_path: Path, mode: str) -> None:
    """FedAdam under privacy == FedAdam given one update equal to the private mean."""
    updates = noised_updates(tmp_path) if mode == "local" else federation(tmp_path)
    base = tmp_path / "base"

    def release() -> DpFedAvg | LocalDpFedAvg:
        return LocalDpFedAvg() if mode == "local" else DpFedAvg(CLIP, Z, DENOMINATOR, seeded())

    wrapped = PrivateStrategy(FedAdam(eta=0.05), release())
    reference, reference_release = FedAdam(eta=0.05), release()  # the same noise, drawn apart
    for r in range(2):  # the second round steps with the moments of the first
        reference_release.aggregate(base, updates, tmp_path / f"mean{r}")
        one = [WeightedUpdate(tmp_path / f"mean{r}", 1, MEAN_UPDATE_ID)]
        reference.aggregate(base, one, tmp_path / f"reference{r}")
        wrapped.aggregate(base, updates, tmp_path / f"wrapped{r}")
        want = (tmp_path / f"reference{r}").read_bytes()
        assert (tmp_path / f"wrapped{r}").read_bytes() == want
    assert wrapped.state_dict().keys() == reference.state_dict().keys()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(wrapped.state_dict()[key], tensor), key
    # and that is not FedAdam over the raw updates, which privacy must never release
    FedAdam(eta=0.05).aggregate(base, updates, tmp_path / "raw")
    assert (tmp_path / "raw").read_bytes() != (tmp_path / "wrapped0").read_bytes()


def test_the_state_round_trips_through_the_wrapper(tmp_path: Path) -> None:
    updates = federation(tmp_path)
    base = tmp_path / "base"
    first = PrivateStrategy(FedAdam(), DpFedAvg(CLIP, Z, DENOMINATOR, seeded(1)))
    first.aggregate(base, updates, tmp_path / "r1")
    state = first.state_dict()
    assert state and int(state["step"]) == 1
    save_parameters(state, tmp_path / "state")  # as the coordinator stores it
    # a new coordinator: a fresh inner strategy, a new wrapper for the round, the state loaded
    second = PrivateStrategy(FedAdam(), DpFedAvg(CLIP, Z, DENOMINATOR, seeded(2)))
    second.load_state_dict(load_parameters(tmp_path / "state"))
    first.release = DpFedAvg(CLIP, Z, DENOMINATOR, seeded(2))
    first.aggregate(base, updates, tmp_path / "uninterrupted")
    second.aggregate(base, updates, tmp_path / "restarted")
    assert (tmp_path / "restarted").read_bytes() == (tmp_path / "uninterrupted").read_bytes()
    assert int(second.inner.state_dict()["step"]) == 2
    # another strategy's state is refused as the inner strategy refuses it
    with pytest.raises(ConfigError):
        PrivateStrategy(FedAvg(), LocalDpFedAvg()).load_state_dict(state)
    PrivateStrategy(FedAvg(), LocalDpFedAvg()).load_state_dict({})


def test_an_inner_failure_after_the_release_is_reported_as_released(tmp_path: Path) -> None:
    updates = federation(tmp_path)
    adam = FedAdam()
    adam.load_state_dict({"m.conv.weight": torch.zeros(9), "step": torch.tensor(1)})
    wrapped = PrivateStrategy(adam, DpFedAvg(CLIP, Z, DENOMINATOR, seeded()))
    with pytest.raises(InconsistentUpdatesError, match="m.conv.weight"):
        wrapped.aggregate(tmp_path / "base", updates, tmp_path / "out")
    # the noised mean was computed: the engine charges such a round
    assert wrapped.has_released
    # nothing is left behind: the optimizer refused before writing, the mean was removed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["base", *(u.path.name for u in updates)]
    )
    with pytest.raises(NotEnoughUpdatesError):
        wrapped.aggregate(tmp_path / "base", [], tmp_path / "out")
    assert not wrapped.has_released


class Tagged(FedProx):
    """FedProx whose evaluation keeps the worst client, and that may send a reserved key."""

    def __init__(self, reserved: bool = False) -> None:
        super().__init__(proximal_mu=0.5)
        self.reserved = reserved

    def configure_fit(
        self, server_round: int, clients: Sequence[str]
    ) -> dict[str, dict[str, ParamValue]]:
        answer = super().configure_fit(server_round, clients)
        if self.reserved:
            answer[clients[0]]["flctl.privacy.noise_multiplier"] = 0.0
        return answer

    def configure_evaluate(
        self, server_round: int, clients: Sequence[str]
    ) -> dict[str, dict[str, ParamValue]]:
        return {c: {"split": "test"} for c in clients}

    def aggregate_evaluate(
        self, results: Sequence[EvaluateResult]
    ) -> tuple[float, dict[str, float]]:
        worst = max(results, key=lambda r: r.loss)
        return worst.loss, dict(worst.metrics)


def test_everything_but_aggregation_is_the_inner_strategys() -> None:
    wrapped = PrivateStrategy(Tagged(), LocalDpFedAvg())
    # FedProx's proximal_mu reaches the clients under privacy too
    assert wrapped.configure_fit(3, ["a", "b"]) == {
        "a": {"proximal_mu": 0.5},
        "b": {"proximal_mu": 0.5},
    }
    assert wrapped.configure_evaluate(3, ["a"]) == {"a": {"split": "test"}}
    results = [EvaluateResult("a", 0.2, 10, {"acc": 0.9}), EvaluateResult("b", 0.7, 5, {})]
    assert wrapped.aggregate_evaluate(results) == (0.7, {})
    assert wrapped.state_dict() == {}


def test_a_reserved_privacy_key_is_refused() -> None:
    wrapped = PrivateStrategy(Tagged(reserved=True), LocalDpFedAvg())
    with pytest.raises(PrivacyError) as caught:
        wrapped.configure_fit(1, ["a", "b"])
    assert "flctl.privacy.noise_multiplier" in caught.value.message
    assert "'a'" in caught.value.message and "'fedprox'" in caught.value.message


def test_the_release_must_be_a_private_mean() -> None:
    with pytest.raises(TypeError, match="DpFedAvg or a LocalDpFedAvg"):
        PrivateStrategy(FedAvg(), FedAvg())  # type: ignore[arg-type]


WHY = {
    "central": ["one noised mean", "nothing to choose from", "clipping already bounds"],
    "local": ["reads that noise as an attack", "discards or distorts honest updates"],
}


@pytest.mark.parametrize("mode", ["central", "local"])
@pytest.mark.parametrize("name", ROBUST)
def test_robust_strategies_are_refused_with_the_reason(name: str, mode: str) -> None:
    strategy = make_strategy(name)
    with pytest.raises(ConfigError) as caught:
        check_private(strategy, mode)
    message = caught.value.message
    assert f'strategy {name!r} cannot be combined with [privacy] mode = "{mode}"' in message
    for words in WHY[mode]:
        assert words in message, message
    assert caught.value.exit_code == 10
    hint = caught.value.hint or ""
    assert all(n in hint for n in MEAN_BASED) and 'mode = "off"' in hint
    # the class is refused as its instances are, and so is a wrapper around it
    with pytest.raises(ConfigError):
        check_private(type(strategy), mode)
    release = LocalDpFedAvg() if mode == "local" else DpFedAvg(CLIP, Z, DENOMINATOR)
    with pytest.raises(ConfigError, match="cannot be combined"):
        PrivateStrategy(strategy, release)
    check_private(strategy, "off")  # without privacy, anything goes


@pytest.mark.parametrize("mode", ["central", "local"])
def test_mean_based_strategies_run_under_privacy(mode: str) -> None:
    assert sorted(n for n, c in BUILTIN_STRATEGIES.items() if c.is_mean_based) == MEAN_BASED
    assert sorted(n for n, c in BUILTIN_STRATEGIES.items() if not c.is_mean_based) == ROBUST
    for name in MEAN_BASED:
        check_private(make_strategy(name), mode)


class Custom(Strategy):
    """A custom strategy that says nothing about how it aggregates."""

    name = "custom"

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        FedAvg().aggregate(base, updates, out)


class DeclaredCustom(Custom):
    """The same, declaring that it aggregates through the mean."""

    name = "declared"
    is_mean_based = True


class RobustDeclared(FedMedian):
    """A robust rule that claims to be mean-based: still refused."""

    is_mean_based = True


@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_custom_strategy_runs_under_privacy_only_if_it_declares_it(
    tmp_path: Path, mode: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        check_private(Custom(), mode, subject="task.py defines strategy_fn, whose strategy")
    message = caught.value.message
    assert message.startswith("task.py defines strategy_fn, whose strategy cannot be combined")
    assert "is_mean_based = True" in message and "private mean" in message
    check_private(DeclaredCustom(), mode)
    with pytest.raises(ConfigError, match="cannot be combined"):
        check_private(RobustDeclared(), mode)
    # a subclass of a mean-based built-in inherits the declaration
    check_private(Tagged(), mode)


def test_an_unknown_mode_is_a_bug() -> None:
    with pytest.raises(ValueError, match="'both'"):
        check_private(FedAvg(), "both")
