"""Differential privacy: clipping, noise and the privacy accountant (see docs/privacy.md).

torch and dp-accounting are imported inside the functions, so importing this package is cheap.
"""

from flctl.privacy._accountant import (
    ACCOUNTANTS,
    MAX_PLAN_NOISE,
    MIN_PLAN_NOISE,
    PLAN_TOLERANCE,
    PLD_DISCRETIZATION,
    SAMPLINGS,
    Accountant,
    AccountantName,
    Adjacency,
    SampledGaussianRound,
    Sampling,
    epsilon,
    plan_noise,
    rounds_left,
)
from flctl.privacy._adaptive import COUNT_STDDEV_DIVISOR, AdaptiveClipping, default_count_stddev
from flctl.privacy._clipping import clip_factor, clipped_delta, delta_norm, l2_norm
from flctl.privacy._local import LocalRelease, local_round, privatize_update
from flctl.privacy._noise import gaussian_noise_like, noise_std, secure_generator

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "AccountantName",
    "AdaptiveClipping",
    "Adjacency",
    "COUNT_STDDEV_DIVISOR",
    "LocalRelease",
    "MAX_PLAN_NOISE",
    "MIN_PLAN_NOISE",
    "PLAN_TOLERANCE",
    "PLD_DISCRETIZATION",
    "SAMPLINGS",
    "SampledGaussianRound",
    "Sampling",
    "clip_factor",
    "clipped_delta",
    "default_count_stddev",
    "delta_norm",
    "epsilon",
    "gaussian_noise_like",
    "l2_norm",
    "local_round",
    "noise_std",
    "plan_noise",
    "privatize_update",
    "rounds_left",
    "secure_generator",
]
