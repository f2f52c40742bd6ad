"""A round's updates with their anomaly scores, for `round status` and `models show`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flctl.transport.grpc import pb

__all__ = [
    "SCORE_COLUMNS",
    "UPDATE_COLUMNS",
    "UPDATE_NUMBERS",
    "outlier_mark",
    "score_cells",
    "update_doc",
    "update_rows",
]

#: The table columns of the three scores, in the order of :func:`score_cells`.
SCORE_COLUMNS = ("l2", "cos", "med-dist")
#: The columns of :func:`update_rows`, and those to right-align.
UPDATE_COLUMNS = ("client", "status", "examples", *SCORE_COLUMNS, "outlier")
UPDATE_NUMBERS = ("examples", *SCORE_COLUMNS)


def update_doc(update: pb.UpdateInfo) -> dict[str, Any]:
    """One update of a Status reply as JSON: who, its status, examples, scores, the verdict.

    ``scores`` is null for an update that was not scored (rejected, or recorded before
    Byzantine detection), else each of ``l2``, ``cosine`` and ``median_distance`` is a
    number or null where it was not computed; ``outlier`` is why the rule marked it ("" when
    it did not), and ``excluded`` whether it was left out of the aggregate.
    """
    scores = None
    if update.HasField("scores"):
        s = update.scores
        scores = {
            "l2": s.l2 if s.HasField("l2") else None,
            "cosine": s.cosine if s.HasField("cosine") else None,
            "median_distance": s.median_distance if s.HasField("median_distance") else None,
        }
    return {
        "client_id": update.client_id,
        "status": update.status,
        "reason": update.reason,
        "num_examples": int(update.num_examples),
        "scores": scores,
        "outlier": update.outlier,
        "excluded": update.excluded,
    }


def _score(value: Any, spec: str) -> str:
    return "-" if value is None else format(float(value), spec)


def score_cells(doc: dict[str, Any]) -> list[str]:
    """The cells of :data:`SCORE_COLUMNS` for an :func:`update_doc` ("-": not computed)."""
    scores = doc.get("scores") or {}
    return [
        _score(scores.get("l2"), ".4g"),
        _score(scores.get("cosine"), ".3f"),
        _score(scores.get("median_distance"), ".4g"),
    ]


def outlier_mark(doc: dict[str, Any]) -> str:
    """``excluded: <why>``, ``flagged: <why>`` or "" for an :func:`update_doc`."""
    if not doc.get("outlier"):
        return ""
    return f"{'excluded' if doc.get('excluded') else 'flagged'}: {doc['outlier']}"


def update_rows(docs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Table rows of a round's updates: :data:`UPDATE_COLUMNS`, already formatted."""
    rows = []
    for doc in docs:
        accepted = doc["status"] == "accepted"
        rows.append(
            [
                doc["client_id"],
                "accepted" if accepted else f"{doc['status']}: {doc['reason']}",
                str(doc["num_examples"]) if accepted else "-",
                *score_cells(doc),
                outlier_mark(doc) or "-",
            ]
        )
    return rows
