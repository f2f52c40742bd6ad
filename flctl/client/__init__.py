"""The client side: the Client API a task implements, and the join loop."""

from flctl.client._api import Client, ConfigValue, Metrics, Parameters
from flctl.client._device import resolve_device
from flctl.client._proximal import proximal_term
from flctl.client._runner import (
    ClientCache,
    JoinOptions,
    PendingUpload,
    PendingUploads,
    Runner,
    fetch_blob,
)
from flctl.client._secagg import SecAggParticipant, SecAggSend, exchange_keys, finish_unmasking
from flctl.client._work import evaluate_client, fit_client

__all__ = [
    "Client",
    "ClientCache",
    "ConfigValue",
    "JoinOptions",
    "Metrics",
    "Parameters",
    "PendingUpload",
    "PendingUploads",
    "Runner",
    "SecAggParticipant",
    "SecAggSend",
    "evaluate_client",
    "exchange_keys",
    "fetch_blob",
    "finish_unmasking",
    "fit_client",
    "proximal_term",
    "resolve_device",
]
