"""Aggregation strategies over streamed updates."""

from flctl.aggregation._anomaly import (
    AnomalyScores,
    RunningMean,
    UpdateScorer,
    median_distances,
    round_median_distances,
    score_update,
)
from flctl.aggregation._bulyan import Bulyan
from flctl.aggregation._dpfedavg import DpFedAvg
from flctl.aggregation._fedadagrad import FedAdagrad
from flctl.aggregation._fedadam import FedAdam
from flctl.aggregation._fedavg import FedAvg, fedavg_in_memory
from flctl.aggregation._fedavgm import FedAvgM
from flctl.aggregation._fedmedian import FedMedian
from flctl.aggregation._fedprox import FedProx
from flctl.aggregation._fedtrimmedavg import FedTrimmedAvg
from flctl.aggregation._fedyogi import FedYogi
from flctl.aggregation._krum import Krum, MultiKrum
from flctl.aggregation._localdpfedavg import LocalDpFedAvg
from flctl.aggregation._outliers import Outlier, find_outliers
from flctl.aggregation._private import PrivateStrategy, check_private
from flctl.aggregation._registry import BUILTIN_STRATEGIES, make_strategy
from flctl.aggregation._running import RunningSum, SumOverflowError
from flctl.aggregation._secure import MaskedSum, SecureMean, Unmasker, check_secure
from flctl.aggregation._strategy import EvaluateResult, Param, Strategy, WeightedUpdate
from flctl.aggregation._streaming import ArrivingUpdate, StreamCancelledError, StreamingMean
from flctl.aggregation._weights import cap_weights

__all__ = [
    "AnomalyScores",
    "ArrivingUpdate",
    "BUILTIN_STRATEGIES",
    "Bulyan",
    "DpFedAvg",
    "EvaluateResult",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "LocalDpFedAvg",
    "MaskedSum",
    "MultiKrum",
    "Outlier",
    "Param",
    "PrivateStrategy",
    "RunningMean",
    "RunningSum",
    "SecureMean",
    "Strategy",
    "StreamCancelledError",
    "StreamingMean",
    "SumOverflowError",
    "Unmasker",
    "UpdateScorer",
    "WeightedUpdate",
    "cap_weights",
    "check_private",
    "check_secure",
    "fedavg_in_memory",
    "find_outliers",
    "make_strategy",
    "median_distances",
    "round_median_distances",
    "score_update",
    "strategy_for",
]


def strategy_for(name: str) -> Strategy:
    """Return the built-in strategy ``name`` with its default parameters.

    Raises:
        ConfigError: No built-in strategy has that name.
    """
    return make_strategy(name)
