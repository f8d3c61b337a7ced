"""Runs a SpecEngine on its own thread and connects it to asyncio request handlers.

The engine is not thread-safe, so only this thread touches it: handlers send commands (add, abort) through
an inbox that is drained at iteration boundaries, and receive their outputs through a per-request `put`
called on an asyncio event loop (after the first, a request's outputs are merged until they hold
`stream_interval` tokens or it ends). If an iteration fails (the target died), every running request ends
with that error; the loop goes on.

`EngineClient` is what the Router needs of an engine: this loop in the Router's process, or
`cluster.engine_host.HostedEngine`, the same loop in the target's host actor.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cluster.config import AppConfig
from cluster.metrics import Metrics
from policy.stats import IterationStats
from workers.engine import SpecEngine
from workers.sampling import SamplingParams
from workers.sequence import RequestOutput

logger = logging.getLogger(__name__)
Item = RequestOutput | BaseException
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class EngineFailure(RuntimeError):
    """An iteration failed on the server's side; every request it ended gets this (a 503, never a 400).

    The message is short: the failing call's own error, without Ray's traceback, paths or colour codes."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(short_reason(error))
        self.error = error

    def __reduce__(self) -> tuple[type[EngineFailure], tuple[BaseException]]:
        return EngineFailure, (self.error,)  # pickled across processes (engine.loop: target_host)


def short_reason(error: BaseException) -> str:
    """`error` in one line for a client: the original exception of a Ray task error, its first line."""
    cause = getattr(error, "cause", None)  # ray.exceptions.RayTaskError wraps the actor's own exception
    inner = cause if isinstance(cause, BaseException) else error
    lines = [line.strip() for line in _ANSI.sub("", str(inner)).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    return f"{type(inner).__name__}: {message}"[:300]


class EngineClient(Protocol):
    """What the Router needs of an engine: commands in, outputs out on per-request asyncio queues, and a
    view of the engine's state that HTTP handlers may read from the event loop's thread."""

    metrics: Metrics
    num_outstanding: int  # submitted and not yet finished (admission control reads it)
    last_error: BaseException | None  # the last iteration's failure; None after one that succeeded

    @property
    def vocab_size(self) -> int: ...
    @property
    def has_started(self) -> bool: ...
    @property
    def is_alive(self) -> bool: ...
    def start(self, event_loop: asyncio.AbstractEventLoop) -> None: ...
    def stop(self) -> None: ...
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None: ...
    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> asyncio.Queue[Item]: ...
    def abort(self, request_id: str) -> None: ...
    def gauges(self) -> dict[str, float]: ...


@dataclass
class _Client:
    put: Callable[[Item], None]  # called on the event loop's thread
    deadline: float
    held: RequestOutput | None = None  # outputs merged until they reach the stream interval
    num_delivered: int = 0


class EngineLoop:
    def __init__(
        self,
        engine: SpecEngine,
        metrics: Metrics,
        request_timeout_s: float,
        stream_interval: int = 1,
        on_iteration: Callable[[IterationStats], None] | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.stream_interval = stream_interval
        self.on_iteration = on_iteration
        self._inbox: queue.SimpleQueue[tuple[str, str, list[int], SamplingParams | None]] = (
            queue.SimpleQueue()
        )
        self._clients: dict[str, _Client] = {}  # touched only by the loop thread after registration
        self._wakeup = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._outstanding_lock = threading.Lock()
        self.num_outstanding = 0  # submitted and not yet finished (admission control reads it)
        self.last_error: BaseException | None = None

    @classmethod
    def for_config(
        cls,
        config: AppConfig,
        engine: SpecEngine,
        on_iteration: Callable[[IterationStats], None] | None = None,
    ) -> EngineLoop:
        """The loop the app runs over `engine`: its metrics, request timeout and stream interval."""
        metrics = Metrics(config.model.served_name, config.engine.max_spec_tokens)
        return cls(
            engine, metrics, config.engine.request_timeout_s, config.server.stream_interval, on_iteration
        )

    def start(self, event_loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is None:
            self._event_loop = event_loop
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    @property
    def has_started(self) -> bool:
        return self._thread is not None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stopped.set()
        self._wakeup.set()

    @property
    def vocab_size(self) -> int:
        return self.engine.info.vocab_size

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_ids, params)

    def gauges(self) -> dict[str, float]:
        return {
            "num_requests_outstanding": self.num_outstanding,
            "drafter_failures": self.engine.num_draft_failures,
            "target_recoveries": self.engine.num_target_recoveries,
            **self.engine.chooser.gauges(),
        }

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue[Item]:
        """Queue a request (already validated); its outputs arrive on the returned queue."""
        outputs: asyncio.Queue[Item] = asyncio.Queue()
        self.add(request_id, prompt_ids, params, outputs.put_nowait)
        return outputs

    def add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, put: Callable[[Item], None]
    ) -> None:
        """Queue a request; `put` receives its outputs, on the event loop `start` was given."""
        assert self._event_loop is not None, "start() the loop first"
        with self._outstanding_lock:
            self.num_outstanding += 1
        self._clients[request_id] = _Client(put, time.monotonic() + self.request_timeout_s)
        self._inbox.put(("add", request_id, prompt_ids, params))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, [], None))
        self._wakeup.set()

    # -- the loop thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._drain_inbox()
            self._expire()
            if not self.engine.has_unfinished:
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # noqa: BLE001 (the server stays up; the requests end with the error)
                logger.exception("engine iteration failed")
                self.last_error = error
                self._fail_all(error)
                continue
            self.last_error = None
            self._deliver_all([(out.request_id, out) for out in outputs])
            if self.engine.last_stats is not None and outputs:
                self.metrics.observe(self.engine.last_stats)
                if self.on_iteration is not None:
                    self.on_iteration(self.engine.last_stats)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command, request_id, prompt_ids, params = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "abort":
                if self.engine.abort(request_id):
                    self.metrics.count("requests_aborted_total")
                self._deliver(request_id, RequestOutput(request_id, [], "", 0, 0, "abort"))
                continue
            assert params is not None
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except Exception as error:  # noqa: BLE001 (reported to that request alone)
                self._deliver(request_id, error)

    def _expire(self) -> None:
        now = time.monotonic()
        for request_id, client in list(self._clients.items()):
            if now > client.deadline:
                self.engine.abort(request_id)
                self.metrics.count("requests_timed_out_total")
                self._deliver(request_id, TimeoutError(f"request {request_id} exceeded its deadline"))

    def _fail_all(self, error: BaseException) -> None:
        failure = EngineFailure(error)
        for request_id in list(self._clients):
            self.engine.abort(request_id)
        self._deliver_all([(request_id, failure) for request_id in list(self._clients)])

    def _deliver(self, request_id: str, item: Item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, Item]]) -> None:
        """Hand an iteration's outputs to their handlers with one wake-up of the event loop (one per output
        cost the loop thread a cross-thread call, and the event loop a wake-up, per request per iteration)."""
        batch: list[tuple[Callable[[Item], None], Item]] = []
        for request_id, item in items:
            client = self._clients.get(request_id)
            if client is None:
                continue
            if isinstance(item, BaseException) or item.is_finished:
                del self._clients[request_id]
                with self._outstanding_lock:
                    self.num_outstanding -= 1
            if client.held is not None:  # what was held goes out first, or with this output
                if isinstance(item, BaseException):
                    batch.append((client.put, client.held))
                else:
                    item = _merge(client.held, item)
                client.held = None
            if (
                isinstance(item, RequestOutput)
                and not item.is_finished
                and client.num_delivered > 0  # the first token goes out at once
                and len(item.new_token_ids) < self.stream_interval
            ):
                client.held = item
                continue
            client.num_delivered += 1
            batch.append((client.put, item))
        if batch:
            assert self._event_loop is not None
            self._event_loop.call_soon_threadsafe(_put_all, batch)


def _merge(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One output for two consecutive outputs of a request."""
    return RequestOutput(
        then.request_id,
        first.new_token_ids + then.new_token_ids,
        first.new_text + then.new_text,
        then.num_prompt_tokens,
        then.num_output_tokens,
        then.finish_reason,
        first.new_logprobs + then.new_logprobs,
    )


def _put_all(batch: list[tuple[Callable[[Item], None], Item]]) -> None:
    for put, item in batch:
        put(item)
