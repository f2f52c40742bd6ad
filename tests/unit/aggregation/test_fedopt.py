"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) against a NumPy reimplementation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.aggregation import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
    WeightedUpdate,
    make_strategy,
)
from flctl.core.errors import ConfigError, InconsistentUpdatesError
from flctl.tensors import load_parameters, save_parameters

Arrays = dict[str, np.ndarray]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the formulas, written again in NumPy (float32, as the model) ---------------------------------


def numpy_adam(
    eta: float, beta_1: float, beta_2: float, tau: float
) -> Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray], int], np.ndarray]:
    def step(x: np.ndarray, delta: np.ndarray, s: dict[str, np.ndarray], t: int) -> np.ndarray:
        s["m"] = beta_1 * s.get("m", np.zeros_like(x)) + (1 - beta_1) * delta
        s["v"] = beta_2 * s.get("v", np.zeros_like(x)) + (1 - beta_2) * delta**2
        eta_t = eta * np.sqrt(1 - beta_2 ** (t + 1.0)) / (1 - beta_1 ** (t + 1.0))
        return np.asarray(x + eta_t * s["m"] / (np.sqrt(s["v"]) + tau))

    return step


def numpy_yogi(
    eta: float, beta_1: float, beta_2: float, tau: float
) -> Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray], int], np.ndarray]:
    def step(x: np.ndarray, delta: np.ndarray, s: dict[str, np.ndarray], t: int) -> np.ndarray:
        s["m"] = beta_1 * s.get("m", np.zeros_like(x)) + (1 - beta_1) * delta
        v = s.get("v", np.zeros_like(x))
        s["v"] = v - (1 - beta_2) * delta**2 * np.sign(v - delta**2)
        return np.asarray(x + eta * s["m"] / (np.sqrt(s["v"]) + tau))

    return step


def numpy_adagrad(
    eta: float, tau: float
) -> Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray], int], np.ndarray]:
    def step(x: np.ndarray, delta: np.ndarray, s: dict[str, np.ndarray], t: int) -> np.ndarray:
        s["v"] = s.get("v", np.zeros_like(x)) + delta**2
        return np.asarray(x + eta * delta / (np.sqrt(s["v"]) + tau))

    return step


def numpy_avgm(
    lr: float, momentum: float
) -> Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray], int], np.ndarray]:
    def step(x: np.ndarray, delta: np.ndarray, s: dict[str, np.ndarray], t: int) -> np.ndarray:
        gradient = -delta
        if momentum > 0:
            s["b"] = momentum * s["b"] + gradient if "b" in s else gradient
            gradient = s["b"]
        return np.asarray(x - lr * gradient)

    return step


unit = st.floats(0.0, 0.99)


@st.composite
def optimizers(
    draw: st.DrawFn,
) -> tuple[Strategy, Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray], int], np.ndarray]]:
    kind = draw(st.sampled_from(["fedadam", "fedyogi", "fedadagrad", "fedavgm"]))
    eta = draw(st.floats(1e-3, 1.0))
    tau = draw(st.floats(1e-4, 1e-1))
    if kind == "fedadam":
        b1, b2 = draw(unit), draw(unit)
        return FedAdam(eta=eta, beta_1=b1, beta_2=b2, tau=tau), numpy_adam(eta, b1, b2, tau)
    if kind == "fedyogi":
        b1, b2 = draw(unit), draw(unit)
        return FedYogi(eta=eta, beta_1=b1, beta_2=b2, tau=tau), numpy_yogi(eta, b1, b2, tau)
    if kind == "fedadagrad":
        return FedAdagrad(eta=eta, tau=tau), numpy_adagrad(eta, tau)
    lr, momentum = draw(st.floats(0.1, 2.0)), draw(st.floats(0.0, 0.99))
    return FedAvgM(server_learning_rate=lr, server_momentum=momentum), numpy_avgm(lr, momentum)


@settings(max_examples=40, deadline=None)
@given(
    pair=optimizers(),
    seed=st.integers(0, 10_000),
    weights=st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=4), min_size=2, max_size=2),
)
def test_two_rounds_equal_the_formulas_in_numpy(
    tmp_path_factory: pytest.TempPathFactory,
    pair: tuple[Strategy, Callable[..., np.ndarray]],
    seed: int,
    weights: list[list[int]],
) -> None:
    strategy, reference = pair
    folder = tmp_path_factory.mktemp("fedopt")
    rng = np.random.default_rng(seed)
    x: Arrays = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=3).astype(np.float32),
    }
    state: dict[str, dict[str, np.ndarray]] = {name: {} for name in x}
    base = folder / "r0"
    save_parameters({n: torch.from_numpy(a) for n, a in x.items()}, base)
    for t, round_weights in enumerate(weights, start=1):
        models = [
            {n: (a + rng.normal(scale=0.5, size=a.shape)).astype(np.float32) for n, a in x.items()}
            for _ in round_weights
        ]
        updates = []
        for i, (m, w) in enumerate(zip(models, round_weights, strict=True)):
            save_parameters({n: torch.from_numpy(a) for n, a in m.items()}, folder / f"r{t}u{i}")
            updates.append(WeightedUpdate(folder / f"r{t}u{i}", w, f"c{i}"))
        out = folder / f"r{t}"
        strategy.aggregate(base, updates, out)
        total = float(sum(round_weights))
        for name in x:
            mean = sum(
                m[name].astype(np.float64) * (w / total)
                for m, w in zip(models, round_weights, strict=True)
            )
            delta = (mean - x[name]).astype(np.float32)
            x[name] = reference(x[name], delta, state[name], t).astype(np.float32)
        got = load_parameters(out)
        for name, want in x.items():
            np.testing.assert_allclose(got[name].numpy(), want, rtol=2e-4, atol=2e-5)
            # the run goes on from the flctl model, so rounding does not add up over rounds
            x[name] = got[name].numpy().copy()
        base = out
    assert int(strategy.state_dict()["step"]) == 2


def write(path: Path, params: dict[str, torch.Tensor]) -> WeightedUpdate:
    save_parameters(params, path)
    return WeightedUpdate(path, 1, path.name)


def test_fedavgm_with_its_defaults_is_fedavg_bit_for_bit(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    base = write(tmp_path / "base", {"w": torch.randn(8, 8, generator=gen)}).path
    ups = [write(tmp_path / f"u{i}", {"w": torch.randn(8, 8, generator=gen)}) for i in range(3)]
    FedAvg().aggregate(base, ups, tmp_path / "fedavg")
    FedAvgM().aggregate(base, ups, tmp_path / "fedavgm")
    assert (tmp_path / "fedavg").read_bytes() == (tmp_path / "fedavgm").read_bytes()


def test_the_state_names_each_moment_per_tensor(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(2), "n": torch.tensor(3)}).path
    update = write(tmp_path / "u", {"w": torch.ones(2), "n": torch.tensor(4)})
    adam = FedAdam()
    assert adam.state_dict() == {}
    adam.aggregate(base, [update], tmp_path / "out")
    state = adam.state_dict()
    assert sorted(state) == ["m.w", "step", "v.w"]
    assert state["m.w"].dtype == torch.float32 and int(state["step"]) == 1
    assert int(load_parameters(tmp_path / "out")["n"]) == 4
    momentum = FedAvgM(server_momentum=0.5)
    momentum.aggregate(base, [update], tmp_path / "out2")
    assert sorted(momentum.state_dict()) == ["momentum.w", "step"]
    assert sorted(FedAdagrad().state_dict()) == []


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"m.w": torch.zeros(2)}, "no valid 'step' counter"),
        ({"step": torch.tensor(1.5)}, "no valid 'step' counter"),
        ({"step": torch.tensor(1), "momentum.w": torch.zeros(2)}, "'momentum.w'.*keeps float32 m"),
        ({"step": torch.tensor(1), "m.w": torch.zeros(2, dtype=torch.float64)}, "'m.w'"),
    ],
)
def test_a_state_of_another_strategy_is_refused(
    state: dict[str, torch.Tensor], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        FedAdam().load_state_dict(state)


def test_a_state_for_another_model_is_refused_before_writing(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)}).path
    update = write(tmp_path / "u", {"w": torch.ones(3)})
    adam = FedAdam()
    adam.load_state_dict({"step": torch.tensor(2), "m.w": torch.zeros(4), "v.w": torch.zeros(4)})
    with pytest.raises(InconsistentUpdatesError, match="'m.w' of shape \\(4,\\)"):
        adam.aggregate(base, [update], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_round_leaves_the_state_as_it_was(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)}).path
    good = write(tmp_path / "good", {"w": torch.ones(3)})
    bad = write(tmp_path / "bad", {"w": torch.ones(4)})
    adam = FedAdam()
    adam.aggregate(base, [good], tmp_path / "one")
    before = adam.state_dict()
    with pytest.raises(InconsistentUpdatesError):
        adam.aggregate(base, [good, bad], tmp_path / "two")
    after = adam.state_dict()
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("fedadam", {"beta_1": 1.0}, r"beta_1 must be in \[0, 1\), not 1.0"),
        ("fedyogi", {"beta_2": 1}, r"beta_2 must be in \[0, 1\)"),
        ("fedadam", {"eta": -0.1}, r"eta \(strategy 'fedadam'\) is -0.1, outside"),
        ("fedavgm", {"server_momentum": 1.5}, "outside"),
        ("fedprox", {"proximal_mu": -1.0}, "outside"),
        ("fedadagrad", {"beta_1": 0.9}, "unknown key"),
    ],
)
def test_bad_parameters_are_config_errors(
    name: str, values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_strategy(name, values)


def test_flower_defaults() -> None:
    adam, yogi, adagrad = FedAdam(), FedYogi(), FedAdagrad()
    assert (adam.eta, adam.eta_l, adam.beta_1, adam.beta_2, adam.tau) == (0.1, 0.1, 0.9, 0.99, 1e-3)
    assert (yogi.eta, yogi.eta_l, yogi.beta_1, yogi.beta_2, yogi.tau) == (
        0.01,
        0.0316,
        0.9,
        0.99,
        1e-3,
    )
    assert (adagrad.eta, adagrad.eta_l, adagrad.tau) == (0.1, 0.1, 1e-3)
    avgm = FedAvgM()
    assert (avgm.server_learning_rate, avgm.server_momentum) == (1.0, 0.0)


def test_fedprox_sends_proximal_mu_to_every_client() -> None:
    strategy = make_strategy("fedprox", {"proximal_mu": 0.1})
    assert isinstance(strategy, FedProx)
    assert strategy.configure_fit(3, ["c1", "c2"]) == {
        "c1": {"proximal_mu": 0.1},
        "c2": {"proximal_mu": 0.1},
    }
    assert FedAdam().configure_fit(1, ["c1"]) == {}
