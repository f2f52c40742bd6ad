"""A client's part in a round with secure aggregation: the stages, and its masked input.

A fit task whose config holds ``flctl.secagg`` (:data:`~flctl.security.SECAGG_TASK_KEY`) is a
round with secure aggregation (docs/secagg.md). The client then, in order:

1. advertises its keys and shares its secrets with its neighbours (:func:`exchange_keys`: two
   stage messages, each answered once the coordinator closed the stage);
2. trains as for any fit, and turns the update into its masked input
   (:meth:`SecAggParticipant.write_masked`): ``r * (new - base)`` of every floating-point
   tensor and ``r * clip_range`` in the last element, clipped, quantized and masked chunk by
   chunk, written front to back (``r``: its weight, ``min(num_examples, max_weight) /
   max_weight``; with central DP its delta clipped to ``clip_norm`` instead, weight 1). The
   plaintext update never leaves the client;
3. uploads the masked input through the resumable upload, as any update;
4. waits for the unmasking request and answers it once (:func:`finish_unmasking`).

The deployed client (:class:`~flctl.client.Runner`) and the simulation's dispatcher both run
this, each sending the stage messages its own way (a ``send`` coroutine). A participant keeps
what it sent, so a client that lost its connection sends the same messages again and gets
the same answers.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from numpy.typing import ArrayLike, NDArray

from flctl.core.errors import SecAggError, TaskError
from flctl.core.work import SecAggAnswer
from flctl.privacy import clip_factor
from flctl.security import (
    SecAggClient,
    SecAggStage,
    SecAggTask,
    decode_masked_input_request,
    decode_share_keys_request,
    decode_unmask_request,
    encode_message,
)
from flctl.tensors import (
    MaskedWriter,
    Quantizer,
    SecureLayout,
    TensorReader,
    UpdateReader,
)

__all__ = ["SecAggParticipant", "SecAggSend", "exchange_keys", "finish_unmasking"]

#: Sends a stage's message and returns the coordinator's answer: ``(stage, payload) -> answer``.
SecAggSend = Callable[[str, bytes], Awaitable[SecAggAnswer]]

_CHUNK = 1 << 20


class SecAggParticipant:
    """One client's part in one round's secure aggregation.

    Args:
        task: The round's SecAgg task, from the fit task's config.
        client_id: This client's id (its certificate's name).

    Raises:
        SecAggError: ``client_id`` is not one of the round's participants.
    """

    def __init__(self, task: SecAggTask, client_id: str) -> None:
        self.task = task
        self.client_id = client_id
        self._client = SecAggClient(task.setup, client_id)
        setup = task.setup
        self.quantizer = Quantizer(
            setup.clip_range, setup.quantization_bits, len(setup.participants)
        )
        #: what this client sent for each stage (sent again, the same, after a reconnection)
        self._sent: dict[str, bytes] = {}
        #: the answers taken: a second, identical answer is not taken again
        self._taken: dict[str, bytes] = {}
        #: the stage messages are done through the masked input's request
        self.has_shared_keys = False
        #: its masked input was accepted
        self.has_uploaded = False
        #: it answered the unmasking request: its part is over
        self.is_done = False
        #: what was uploaded: its num_examples, metrics and size (for the client's output)
        self.upload: tuple[int, dict[str, Any], int] = (0, {}, 0)

    @property
    def refused_shares(self) -> dict[str, str]:
        """Senders whose share this client refused (tampered, malformed, not its own)."""
        return self._client.refused_shares

    def _once(self, stage: SecAggStage, make: Callable[[], bytes]) -> bytes:
        if stage.value not in self._sent:
            self._sent[stage.value] = make()
        return self._sent[stage.value]

    def advertisement(self) -> bytes:
        """Stage 1's message: this client's two public keys (the same ones when sent again)."""
        return self._once(
            SecAggStage.ADVERTISE_KEYS, lambda: encode_message(self._client.advertise_keys())
        )

    def share_keys(self, request: bytes) -> bytes:
        """Stage 2's message: the encrypted shares for the neighbours the request names.

        Raises:
            SecAggError: The request breaks the protocol (this client takes no further part).
        """
        return self._once(
            SecAggStage.SHARE_KEYS,
            lambda: encode_message(self._client.share_keys(decode_share_keys_request(request))),
        )

    def receive_shares(self, request: bytes) -> None:
        """Take stage 3's request: who shared keys, and the shares for this client.

        Raises:
            SecAggError: The request breaks the protocol.
        """
        if self._taken.get(SecAggStage.MASKED_INPUT.value) == request:
            return
        self._client.receive_shares(decode_masked_input_request(request))
        self._taken[SecAggStage.MASKED_INPUT.value] = request
        self.has_shared_keys = True

    def unmask(self, request: bytes) -> bytes:
        """Stage 4's message: the shares the coordinator needs, answered once.

        Raises:
            SecAggError: The request breaks the protocol, or a second, other one came.
        """
        return self._once(
            SecAggStage.UNMASK,
            lambda: encode_message(self._client.unmask(decode_unmask_request(request))),
        )

    def write_masked(self, base: Path, update: Path, num_examples: int, out: Path) -> None:
        """Write this client's masked input, from its update file, to ``out``.

        The update (any encoding, :class:`~flctl.tensors.UpdateReader`) is read tensor by
        tensor and written chunk by chunk: memory stays a tensor of the model, whatever its
        size.

        Args:
            base: The round's model.
            update: The client's update of it (as :func:`flctl.client.fit_client` wrote it).
            num_examples: The examples it trained on (its weight).
            out: Where the masked input goes; removed again on failure.

        Raises:
            TaskError: The update holds NaN or Inf values, or its model is not the round's.
        """
        import torch

        task = self.task
        setup = task.setup
        c = setup.clip_range
        try:
            with TensorReader(base) as model, UpdateReader(update, model) as reader:
                layout = SecureLayout.of(model.specs)
                if layout.num_elements != setup.num_elements:
                    raise TaskError(
                        f"the round's masked vector has {setup.num_elements} elements, this "
                        f"model {layout.num_elements}: it is not the round's model"
                    )
                weight = task.weight(num_examples)
                scale = weight
                if task.is_private:
                    total = 0.0
                    for name, _, _ in layout.tensors:
                        delta = reader.read_delta(name, dtype=torch.float64).reshape(-1)
                        total += float(torch.dot(delta, delta))
                    if not math.isfinite(total):
                        raise TaskError("fit returned parameters holding NaN or Inf values")
                    scale = clip_factor(math.sqrt(total), task.clip_norm)
                with MaskedWriter(out, setup.num_elements, setup.modulus_bits) as writer:
                    for name, offset, count in layout.tensors:
                        values = reader.read_delta(name, dtype=torch.float64).reshape(-1).numpy()
                        values *= scale
                        for start in range(0, count, _CHUNK):
                            writer.write(self._mask(values[start : start + _CHUNK], offset + start))
                        del values
                    writer.write(self._mask([weight * c], layout.weight_slot))
        except ValueError as exc:  # quantize refuses NaN and Inf
            out.unlink(missing_ok=True)
            raise TaskError(f"fit returned an update that cannot be masked: {exc}") from exc
        except BaseException:
            out.unlink(missing_ok=True)
            raise

    def _mask(self, values: ArrayLike, offset: int) -> NDArray[Any]:
        return self._client.mask(self.quantizer.quantize(values), offset)


async def exchange_keys(participant: SecAggParticipant, send: SecAggSend) -> str | None:
    """Stages 1 and 2: advertise keys, share them; None when the client may mask, else why not.

    Raises:
        SecAggError: The coordinator broke the protocol (the client takes no further part).
    """
    if participant.has_shared_keys:
        return None
    answer = await send(SecAggStage.ADVERTISE_KEYS.value, participant.advertisement())
    if not answer.accepted:
        return answer.reason
    _expect(answer, SecAggStage.SHARE_KEYS)
    answer = await send(SecAggStage.SHARE_KEYS.value, participant.share_keys(answer.payload))
    if not answer.accepted:
        return answer.reason
    _expect(answer, SecAggStage.MASKED_INPUT)
    participant.receive_shares(answer.payload)
    return None


async def finish_unmasking(participant: SecAggParticipant, send: SecAggSend) -> str | None:
    """Stage 4, once the masked input was accepted: None when done, else why not.

    Raises:
        SecAggError: The coordinator broke the protocol.
    """
    if participant.is_done:
        return None
    answer = await send(SecAggStage.MASKED_INPUT.value, b"")
    if not answer.accepted:
        return answer.reason
    _expect(answer, SecAggStage.UNMASK)
    answer = await send(SecAggStage.UNMASK.value, participant.unmask(answer.payload))
    if not answer.accepted:
        return answer.reason
    participant.is_done = True
    return None


def _expect(answer: SecAggAnswer, stage: SecAggStage) -> None:
    if answer.stage != stage.value:
        raise SecAggError(
            f"the coordinator answered with a {answer.stage[:32]!r} message, not {stage.value!r}"
        )
