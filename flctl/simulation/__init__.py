"""Simulation: many virtual clients from the project's own task.py, through the deployed engine.

``flctl simulate`` (docs/simulation.md). Workers run the clients' tasks: local processes
(:mod:`._local`) or Ray actors (:mod:`._ray`, the one home of ``ray``, an optional extra).
"""

from flctl.simulation._run import RoundOutcome, SimulationOptions, SimulationReport, simulate
from flctl.simulation._worker import CLIENT_DIR_KEY, WorkerCore, WorkerSetup

__all__ = [
    "CLIENT_DIR_KEY",
    "RoundOutcome",
    "SimulationOptions",
    "SimulationReport",
    "WorkerCore",
    "WorkerSetup",
    "simulate",
]
