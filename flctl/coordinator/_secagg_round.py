"""One round's secure aggregation on the coordinator: its stages, its masked sum, its events.

With ``[secagg] enabled`` (docs/secagg.md) the round engine opens a :class:`SecAggRound` when a
round selects its clients; every fit task then carries the round's
:class:`~flctl.security.SecAggTask` (task config ``flctl.secagg``). The stages run so:

```
advertise_keys -> share_keys -> masked_input -> unmask -> done
 (stage_timeout_s)  (stage_timeout_s)  (rounds.deadline_s)  (stage_timeout_s)
```

- Each client sends its message for a stage (:meth:`SecAggRound.message`, the ``SecAgg`` RPC
  or the in-process transport); the call waits until the stage closes and answers with the
  coordinator's message for the client's next stage. A stage closes when every client still
  in the protocol and connected has answered, or at its timeout (:meth:`run_key_stages` for
  the two key stages, driven by the engine); whoever has not answered by then has dropped.
- The masked input arrives through the resumable upload (the intake asks
  :meth:`upload_refusal` before it reads a byte); each accepted one is added to the round's
  :class:`~flctl.aggregation.MaskedSum` as it arrives, in a worker thread
  (:meth:`masked_input_arrived`). The engine waits for them as for plain updates, then closes
  the stage (:meth:`close_masked_input`): the survivors are those whose input is in the sum.
- The survivors' shares come back (:meth:`run_unmask`), the protocol rebuilds what removes
  the masks, and the engine writes the mean.

Each closed stage is a ``secagg.stage`` event naming who left and why; a stage short of
``threshold`` live share holders ends the round (``secagg.failed`` with the reason, then
``round.failed``), as a quorum failure does. A protocol message that breaks the rules is
refused: its sender is out, the round goes on without it. Nothing here ever holds an unmasked
update: only the masked inputs, their sum, and in the end the sum's unmasking terms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from flctl.aggregation import MaskedSum
from flctl.core import events as ev
from flctl.core.errors import FlctlError, SecAggError, SecAggThresholdError
from flctl.core.work import SecAggAnswer
from flctl.security import (
    SECAGG_TASK_KEY,
    SecAggResult,
    SecAggServer,
    SecAggStage,
    SecAggTask,
    decode_key_advertisement,
    decode_share_keys_reply,
    decode_unmask_reply,
    encode_message,
)
from flctl.tensors import Quantizer, SecureLayout

from ._events import EventLog

__all__ = ["SecAggRound"]

log = logging.getLogger("flctl.coordinator")

#: The stage whose request a client gets once the stage it answered closes.
_NEXT = {
    SecAggStage.ADVERTISE_KEYS: SecAggStage.SHARE_KEYS,
    SecAggStage.SHARE_KEYS: SecAggStage.MASKED_INPUT,
    SecAggStage.MASKED_INPUT: SecAggStage.UNMASK,
}
#: How often a waiting stage looks again at who is still connected.
_RECHECK_S = 0.5


class SecAggRound:
    """The coordinator's part in one round's secure aggregation (see the module docstring).

    Args:
        task: The round's SecAgg task (setup and client settings), sent with every fit task.
        tasks: Each selected client's task id.
        layout: The round's flat vector (of its base model).
        events: Where the ``secagg.*`` events go.
        is_live: Whether a client is still connected and has not reported its task failed.
        has_failed: Whether a client reported its task of the round failed.
        rejoin_grace_s: How long a stage waits for a client whose connection dropped
            (``rounds.rejoin_grace_s``; within the stage's timeout): one that comes back sends
            the same messages again and stays in.
        scratch: The folder of the masked sum's scratch file.
    """

    def __init__(
        self,
        *,
        task: SecAggTask,
        tasks: dict[str, str],
        layout: SecureLayout,
        events: EventLog,
        is_live: Callable[[str], bool],
        has_failed: Callable[[str], bool] = lambda client_id: False,
        rejoin_grace_s: float = 0.0,
        scratch: Path | None = None,
    ) -> None:
        setup = task.setup
        if layout.num_elements != setup.num_elements:  # pragma: no cover - the engine's own
            raise ValueError("the layout does not match the setup")
        self.task = task
        self.setup = setup
        self.server_round = setup.server_round
        self.tasks = dict(tasks)
        self._server = SecAggServer(setup)
        self._events = events
        self._is_live = is_live
        self._has_failed = has_failed
        self._grace = rejoin_grace_s
        #: clients a stage waits for whose connection dropped, and since when (monotonic)
        self._absent: dict[str, float] = {}
        self.quantizer = Quantizer(
            setup.clip_range, setup.quantization_bits, len(setup.participants)
        )
        self.sum = MaskedSum(layout, setup.modulus_bits, scratch)
        #: why the round's secure aggregation cannot go on (None: it can)
        self.failure: str | None = None
        #: a client sent something, or one went away: the waiting stage looks again
        self.changed = asyncio.Event()
        #: clients out of the protocol, with why
        self.out: dict[str, str] = {}
        #: the stage each out client left at (for the events and round status)
        self._left_at: dict[str, SecAggStage] = {}
        #: clients whose message was refused, with the reason (the protocol's own refusals too)
        self._refused: dict[str, str] = {}
        self._closed = {stage: asyncio.Event() for stage in _NEXT}
        self._closed[SecAggStage.UNMASK] = asyncio.Event()
        self._answered: dict[SecAggStage, dict[str, bytes]] = {stage: {} for stage in _NEXT}
        self._answered[SecAggStage.UNMASK] = {}
        #: per stage closed: the coordinator's next message for each client still in
        self._requests: dict[SecAggStage, dict[str, bytes]] = {}
        self._uploaded: set[str] = set()
        self._inputs_closed = False
        self._adding: set[asyncio.Task[None]] = set()
        self._add_lock = asyncio.Lock()
        self._stage = SecAggStage.ADVERTISE_KEYS
        self.result: SecAggResult | None = None

    # ------------------------------------------------------------------ what clients see

    def entry(self) -> dict[str, str]:
        """The fit task config entry that tells a client the round's SecAgg task."""
        return {SECAGG_TASK_KEY: self.task.to_json()}

    def started_event(self) -> ev.SecAggStarted:
        """The round's ``secagg.started`` event."""
        s = self.setup
        return ev.SecAggStarted(
            participants=list(s.participants),
            threshold=s.threshold,
            num_neighbours=s.num_neighbours,
            quantization_bits=s.quantization_bits,
            modulus_bits=s.modulus_bits,
            num_elements=s.num_elements,
        )

    @property
    def stage(self) -> SecAggStage:
        """The stage whose messages the round waits for."""
        return self._stage

    @property
    def dropouts(self) -> dict[str, str]:
        """Each client out of the protocol, with the stage it left at."""
        left = {**self._server.dropouts, **self._left_at}
        return {c: stage.value for c, stage in sorted(left.items())}

    async def message(self, client_id: str, stage: str, payload: bytes) -> SecAggAnswer:
        """Take ``client_id``'s message for ``stage``; answer once the stage closed.

        The answer carries the coordinator's message for the client's next stage, or says why
        the client is out (its message was refused, it came too late, the round failed). The
        same message sent again (a client that reconnected) gets the same answer.
        """
        try:
            step = SecAggStage(stage)
        except ValueError:
            return _no(f"unknown secure aggregation stage {stage[:32]!r}")
        if client_id not in self.tasks:
            return _no(f"{client_id} is not in round {self.server_round}'s secure aggregation")
        refusal = self._refusal(client_id)
        if refusal is not None:
            return _no(refusal)
        if step is SecAggStage.UNMASK:
            return self._unmask(client_id, payload)
        if step is SecAggStage.DONE:
            return _no("nothing is sent for the done stage")
        if step is SecAggStage.MASKED_INPUT:
            # its masked input arrived by upload; the stage may close before this call comes
            if client_id not in self._uploaded:
                return self._refuse(client_id, step, "its masked input did not arrive")
            return await self._answer(client_id, step)
        answered = self._answered[step]
        if client_id in answered:
            if answered[client_id] != payload:
                return self._refuse(client_id, step, "sent another message for the same stage")
        elif self._closed[step].is_set() or self._stage is not step:
            return _no(
                f"too late: round {self.server_round}'s {step.value} stage is "
                + ("closed" if self._closed[step].is_set() else f"not open ({self._stage.value})")
            )
        else:
            try:
                self._receive(client_id, step, payload)
            except SecAggError as exc:
                return self._refuse(client_id, step, exc.message)
            answered[client_id] = payload
            self.changed.set()
        return await self._answer(client_id, step)

    async def _answer(self, client_id: str, step: SecAggStage) -> SecAggAnswer:
        """Wait for ``step`` to close; then the client's message for its next stage."""
        await self._closed[step].wait()
        refusal = self._refusal(client_id)
        if refusal is not None:
            return _no(refusal)
        request = self._requests.get(step, {}).get(client_id)
        if request is None:  # pragma: no cover - every client still in has a request
            return _no(f"round {self.server_round} has no {_NEXT[step].value} message for you")
        return SecAggAnswer(True, "", _NEXT[step].value, request)

    def _refusal(self, client_id: str) -> str | None:
        if self.failure is not None:
            return self.failure
        why = self.out.get(client_id)
        if why is not None:
            return f"out of round {self.server_round}'s secure aggregation: {why}"
        return None

    def _receive(self, client_id: str, stage: SecAggStage, payload: bytes) -> None:
        """Hand a client's stage message to the protocol (raises if it is refused)."""
        if stage is SecAggStage.ADVERTISE_KEYS:
            ad = decode_key_advertisement(payload)
            _own(ad.client_id, client_id)
            self._server.receive_keys(ad)
        else:
            reply = decode_share_keys_reply(payload)
            _own(reply.client_id, client_id)
            self._server.receive_shares(reply)

    def _unmask(self, client_id: str, payload: bytes) -> SecAggAnswer:
        step = SecAggStage.UNMASK
        answered = self._answered[step]
        if client_id in answered:
            if answered[client_id] != payload:
                return self._refuse(client_id, step, "sent other unmasking shares")
            return SecAggAnswer(True, "", SecAggStage.DONE.value)
        if self._stage is not step or self._closed[step].is_set():
            return _no(f"round {self.server_round}'s unmask stage is not open")
        try:
            reply = decode_unmask_reply(payload)
            _own(reply.client_id, client_id)
            self._server.receive_unmask(reply)
        except SecAggError as exc:
            return self._refuse(client_id, step, exc.message)
        answered[client_id] = payload
        self.changed.set()
        return SecAggAnswer(True, "", SecAggStage.DONE.value)

    def _refuse(self, client_id: str, stage: SecAggStage, reason: str) -> SecAggAnswer:
        """Put ``client_id`` out of the protocol for a message that broke it."""
        why = f"its {stage.value} message was refused: {reason}"
        self._refused.setdefault(client_id, reason)
        self._leave(client_id, stage, why)
        log.warning(
            "round %d: secure aggregation refused %s's %s message: %s",
            self.server_round,
            client_id,
            stage.value,
            reason,
            extra={"round": self.server_round, "client": client_id},
        )
        self.changed.set()
        return _no(f"out of round {self.server_round}'s secure aggregation: {why}")

    def _leave(self, client_id: str, stage: SecAggStage, why: str) -> None:
        if client_id not in self.out:
            self.out[client_id] = why
            self._left_at[client_id] = stage

    # ------------------------------------------------------------------ the key stages

    async def run_key_stages(self, stopped: Callable[[], bool]) -> None:
        """Run the two key stages, each closed when all answered or at its timeout.

        On a threshold failure :attr:`failure` says why (the engine fails the round); when
        ``stopped`` turns true the stages stop where they are.
        """
        closers = (
            (SecAggStage.ADVERTISE_KEYS, self._server.share_keys_requests),
            (SecAggStage.SHARE_KEYS, self._server.masked_input_requests),
        )
        for stage, close in closers:
            await self._wait_stage(stage, stopped)
            if stopped() or self.failure is not None:
                return
            try:
                requests = close()
            except SecAggThresholdError as exc:
                self.fail_at(stage, exc.message)
                return
            self._close(stage, {c: encode_message(r) for c, r in requests.items()})

    async def _wait_stage(self, stage: SecAggStage, stopped: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.task.stage_timeout_s
        answered = self._answered[stage]
        while self.failure is None and not stopped():
            waiting = [
                c
                for c in self._server.waiting_for
                if c not in answered and c not in self.out and self._waited_for(c)
            ]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, _RECHECK_S))

    def _waited_for(self, client_id: str) -> bool:
        """Whether a stage still waits for ``client_id``'s message.

        A connected client, yes; one that reported its task failed, no; one whose connection
        dropped, for ``rejoin_grace_s`` from when a stage first saw it gone (it may reconnect
        and send its message again), and again in full if it came back and left once more.
        """
        if self._is_live(client_id):
            self._absent.pop(client_id, None)
            return True
        if self._has_failed(client_id):
            return False
        since = self._absent.setdefault(client_id, time.monotonic())
        return time.monotonic() - since < self._grace

    def _close(self, stage: SecAggStage, requests: dict[str, bytes]) -> None:
        """Close ``stage``: who has no request is out; wake the clients waiting on it."""
        dropouts = self._server.dropouts
        refusals = self._server.refusals
        dropped: dict[str, str] = {}
        for client_id in self.setup.participants:
            if client_id in requests or client_id in self.out:
                continue
            if client_id in refusals:
                why = f"dropped at {stage.value}: {refusals[client_id]}"
            elif stage is SecAggStage.MASKED_INPUT:
                why = f"dropped at {stage.value}: no masked input in time"
            elif dropouts.get(client_id) is stage or client_id not in self._answered[stage]:
                why = f"dropped at {stage.value}: no answer in time"
            else:
                why = f"dropped at {stage.value}"
            self._leave(client_id, stage, why)
            dropped[client_id] = why
        for client_id, left_at in self._left_at.items():
            if left_at is stage and client_id not in dropped:
                dropped[client_id] = self.out[client_id]
        self._requests[stage] = requests
        self._stage = _NEXT.get(stage, SecAggStage.DONE)
        self._events.emit(
            ev.SecAggStageClosed(stage=stage.value, live=sorted(requests), dropped=dropped),
            server_round=self.server_round,
        )
        log.info(
            "round %d: secure aggregation %s closed: %d live, %d dropped",
            self.server_round,
            stage.value,
            len(requests),
            len(dropped),
            extra={"round": self.server_round},
        )
        self._closed[stage].set()
        self.changed.set()

    # ------------------------------------------------------------------ the masked inputs

    def upload_refusal(self, client_id: str) -> str | None:
        """Why ``client_id`` may not upload a masked input now, or None when it may."""
        if self.failure is not None:
            return self.failure
        if client_id in self.out:
            return f"out of round {self.server_round}'s secure aggregation: {self.out[client_id]}"
        if not self._closed[SecAggStage.SHARE_KEYS].is_set():
            return f"round {self.server_round}'s secure aggregation takes no masked input yet"
        if self._inputs_closed:
            return f"late: round {self.server_round}'s masked inputs are closed"
        if client_id in self._uploaded:
            return f"duplicate: {client_id}'s masked input for round {self.server_round} arrived"
        return None

    def masked_input_arrived(self, client_id: str, path: Path) -> None:
        """An accepted masked input: count it in, and add it to the sum in a worker thread."""
        if self._inputs_closed or client_id in self._uploaded or client_id in self.out:
            return
        try:
            self._server.receive_masked_input(client_id, self.setup.num_elements)
        except SecAggError as exc:
            self._leave(client_id, SecAggStage.MASKED_INPUT, f"masked input refused: {exc}")
            self.changed.set()
            return
        self._uploaded.add(client_id)
        task = asyncio.create_task(self._add(client_id, path), name=f"flctl-secagg-add-{client_id}")
        self._adding.add(task)
        task.add_done_callback(self._adding.discard)

    async def _add(self, client_id: str, path: Path) -> None:
        async with self._add_lock:
            if self.failure is not None:
                return
            try:
                await asyncio.to_thread(self.sum.add, path)
            except (FlctlError, OSError) as exc:
                # part of it may be in the sum: nothing can be unmasked any more
                self.fail_at(SecAggStage.MASKED_INPUT, f"adding {client_id}'s masked input: {exc}")

    def masked_input_refused(self, client_id: str, reason: str) -> None:
        """A malformed masked input (wrong length, bad bytes): its sender is out."""
        if client_id in self.tasks and not self._inputs_closed:
            self._refused.setdefault(client_id, f"masked input refused: {reason}")
            self._leave(client_id, SecAggStage.MASKED_INPUT, f"masked input refused: {reason}")
            self.changed.set()

    async def close_masked_input(self) -> None:
        """Close the masked-input stage once every input taken is in the sum.

        Raises:
            SecAggThresholdError: Too few inputs arrived to unmask the sum.
            SecAggError: An input could not be added.
        """
        self._inputs_closed = True
        while self._adding:
            await asyncio.gather(*list(self._adding), return_exceptions=True)
        if self.failure is not None:
            raise SecAggError(self.failure)
        stage = SecAggStage.MASKED_INPUT
        try:
            requests = self._server.unmask_requests()
        except SecAggThresholdError as exc:
            self.fail_at(stage, exc.message)
            raise
        if self.sum.count != len(requests):  # pragma: no cover - every input taken is added
            raise SecAggError(f"the sum holds {self.sum.count} inputs, not {len(requests)}")
        self._close(stage, {c: encode_message(r) for c, r in requests.items()})

    async def run_unmask(self, stopped: Callable[[], bool]) -> SecAggResult:
        """Wait for the survivors' shares (all, or the stage's timeout); rebuild the terms.

        Raises:
            SecAggThresholdError: Too few survivors sent their shares.
            SecAggError: The shares disagree, or the stage was stopped.
        """
        stage = SecAggStage.UNMASK
        deadline = time.monotonic() + self.task.stage_timeout_s
        answered = self._answered[stage]
        while self.failure is None and not stopped():
            waiting = [
                c
                for c in self._requests.get(SecAggStage.MASKED_INPUT, {})
                if c not in answered and c not in self.out and self._waited_for(c)
            ]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, _RECHECK_S))
        if self.failure is not None:
            raise SecAggError(self.failure)
        if stopped():
            raise SecAggError(f"round {self.server_round} stopped while unmasking")
        try:
            result = self._server.finish()
        except SecAggError as exc:
            self.fail_at(stage, exc.message)
            raise
        for client_id, left_at in result.dropouts.items():
            if left_at is stage and client_id not in self.out:
                self._leave(client_id, stage, "dropped at unmask: no shares in time")
        self._closed[stage].set()
        self._stage = SecAggStage.DONE
        self.result = result
        return result

    def unmasked_event(
        self, total_weight: float, error_bound: float, noise_std: float
    ) -> ev.SecAggUnmasked:
        """The round's ``secagg.unmasked`` event, once its mean is written."""
        assert self.result is not None
        return ev.SecAggUnmasked(
            survivors=list(self.result.survivors),
            dropouts=self.dropouts,
            refusals=dict(sorted({**self._server.refusals, **self._refused}.items())),
            total_weight=round(total_weight, 9),
            error_bound=error_bound,
            noise_std=noise_std or None,
        )

    # ------------------------------------------------------------------ the end

    def fail_at(self, stage: SecAggStage, reason: str) -> None:
        """The round's secure aggregation cannot go on: say so once, wake every waiter."""
        if self.failure is not None:
            return
        self.failure = reason
        self._events.emit(
            ev.SecAggFailed(stage=stage.value, reason=reason, dropouts=self.dropouts),
            server_round=self.server_round,
        )
        log.info(
            "round %d: secure aggregation failed at %s: %s",
            self.server_round,
            stage.value,
            reason,
            extra={"round": self.server_round},
        )
        self._wake()

    def end(self, reason: str) -> None:
        """The round ended (committed, failed, stopped): answer every waiting client."""
        if self.failure is None:
            self.failure = f"round {self.server_round} ended: {reason}"
        self._wake()
        for task in list(self._adding):
            task.cancel()
        self.sum.close()

    def _wake(self) -> None:
        for event in self._closed.values():
            event.set()
        self.changed.set()


def _no(reason: str) -> SecAggAnswer:
    return SecAggAnswer(False, reason)


def _own(named: str, caller: str) -> None:
    if named != caller:
        raise SecAggError(f"a message in {named!r}'s name")
