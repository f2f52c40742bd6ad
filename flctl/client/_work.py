"""One fit or one evaluation of a client: the user's code, and the checks around what it returns.

The deployed client (:class:`flctl.client.Runner`, in its worker thread) and the simulation
workers (many virtual clients, in worker processes, with no Runner and no connection) both call
:func:`fit_client` and :func:`evaluate_client`, so a simulated client runs exactly the checks a
deployed one does, fails with the same messages, and writes its update the same way.

Neither function knows where the model came from or where the update goes next: the caller
chooses the model file, the output path and (for a delta) the digest the update records as
its base.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flctl.core.dp import TaskPrivacy
from flctl.core.errors import FlctlError, TaskError
from flctl.core.task import report_progress_to
from flctl.core.usercode import describe_failure
from flctl.privacy import privatize_update
from flctl.tensors import encode_update, load_parameters, read_spec, spec_of

from ._api import Client

__all__ = ["evaluate_client", "fit_client"]


def fit_client(
    client: Client,
    model_path: Path,
    config: dict[str, Any],
    out: Path,
    *,
    update_encoding: str,
    update_dtype: str,
    privacy: TaskPrivacy | None = None,
    base_digest: str | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> tuple[int, dict[str, float]]:
    """Run ``client.fit`` on the model at ``model_path``; check its result; write the update.

    The update is written to ``out`` in ``update_encoding`` (``"full"`` or ``"delta"``) and
    ``update_dtype``; the default, full in the model's dtype, is the plain model file. When
    ``privacy`` asks for local DP, the update is instead the delta clipped to the task's
    ``clip_norm`` plus Gaussian noise (:func:`flctl.privacy.privatize_update`, noise from the
    OS-seeded generator), in ``update_dtype``: nothing un-noised is written.

    Args:
        client: The task's client.
        model_path: The round's model (a safetensors file).
        config: The task's config, as ``fit`` receives it (privacy entries already split off).
        out: Where the update is written. Removed again when the update cannot be written.
        update_encoding: ``client.update_encoding``: ``"full"`` or ``"delta"``.
        update_dtype: ``client.update_dtype``: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        privacy: What the task asks (local DP: clip and noise); None or not local: nothing.
        base_digest: The digest a delta records as its base (None: none recorded).
        on_progress: Receives the fit's ``context.report_progress`` calls (0.0 to 1.0).

    Returns:
        The number of examples ``fit`` trained on and its metrics (finite floats, by name).

    Raises:
        TaskError: ``fit`` raised (the one-line reason, the traceback in ``details``), returned
            a num_examples that is not a positive int, a non-finite metric, parameters that
            are unusable or whose names, shapes or dtypes differ from the model's, or an update
            that cannot be encoded.
    """
    expected = {name: (s.dtype, s.shape) for name, s in read_spec(model_path).items()}
    try:
        # No reference is kept here, so a task may adopt the tensors (load_state_dict with
        # assign=True) and the model is held once, not twice.
        with report_progress_to(on_progress):
            new_parameters, num_examples, metrics = client.fit(load_parameters(model_path), config)
    except Exception as exc:  # user code: report it, keep serving
        failure = describe_failure(exc, "fit")
        raise TaskError(failure.reason, details={"traceback": failure.traceback}) from exc
    if not isinstance(num_examples, int) or num_examples <= 0:
        raise TaskError(f"fit must return a positive num_examples, not {num_examples!r}")
    clean: dict[str, float] = {}
    for key, value in dict(metrics or {}).items():
        number = float(value)
        if not math.isfinite(number):
            raise TaskError(f"fit returned a non-finite metric {key!r}: {number}")
        clean[str(key)] = number
    try:
        got = spec_of(new_parameters)
    except FlctlError as exc:
        raise TaskError(f"fit returned unusable parameters: {exc.message}") from exc
    if got != expected:
        raise TaskError("fit returned parameters whose names, shapes or dtypes differ")
    try:
        if privacy is not None and privacy.is_local:
            privatize_update(
                model_path,
                new_parameters,
                out,
                clip_norm=privacy.clip_norm,
                noise_multiplier=privacy.noise_multiplier,
                dtype=update_dtype,
                base_digest=base_digest,
            )
        else:
            encode_update(
                model_path,
                new_parameters,
                out,
                encoding=update_encoding,
                dtype=update_dtype,
                base_digest=base_digest,
            )
    except FlctlError as exc:
        out.unlink(missing_ok=True)
        raise TaskError(f"fit returned an unusable update: {exc.message}", hint=exc.hint) from exc
    return num_examples, clean


def evaluate_client(
    client: Client, model_path: Path, config: dict[str, Any], max_metrics: int = 0
) -> tuple[float, int, dict[str, float]]:
    """Run ``client.evaluate`` on the model at ``model_path``; check what it returns.

    Args:
        client: The task's client.
        model_path: The model to evaluate (a safetensors file).
        config: The task's config, as ``evaluate`` receives it.
        max_metrics: The most metrics the coordinator accepts (0: no limit announced).

    Returns:
        The loss, the number of examples evaluated and the metrics (finite floats, by name).

    Raises:
        TaskError: ``evaluate`` raised (the one-line reason, the traceback in ``details``), or
            returned a num_examples that is not a positive int, a loss that is not a finite
            number, a non-finite metric, or more than ``max_metrics`` metrics.
    """
    try:
        loss, num_examples, metrics = client.evaluate(load_parameters(model_path), config)
    except Exception as exc:  # user code: report it, keep serving
        failure = describe_failure(exc, "evaluate")
        raise TaskError(failure.reason, details={"traceback": failure.traceback}) from exc
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
        raise TaskError(f"evaluate must return a positive num_examples, not {num_examples!r}")
    try:
        loss = float(loss)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"evaluate must return a number as its loss, not {loss!r}") from exc
    if not math.isfinite(loss):
        raise TaskError(f"evaluate returned a non-finite loss: {loss}")
    clean: dict[str, float] = {}
    for key, value in dict(metrics or {}).items():
        number = float(value)
        if not math.isfinite(number):
            raise TaskError(f"evaluate returned a non-finite metric {key!r}: {number}")
        clean[str(key)] = number
    if max_metrics and len(clean) > max_metrics:
        raise TaskError(
            f"evaluate returned {len(clean)} metrics, more than the coordinator accepts "
            f"({max_metrics}): return fewer from the task's evaluate"
        )
    return loss, num_examples, clean
