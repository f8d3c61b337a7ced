"""The engine loop inside the target's host actor (`engine.loop: target_host`), and the Router's side of it.

`EngineHost` (a Ray actor, one per Router replica) holds the target's model, runs `EngineLoop` +
`SpecEngine` on a thread beside it, and owns the replica's `DrafterHost` (started from here, so it dies with
this actor). A plain iteration makes no call between processes, a speculative one makes one, to the drafter;
the forward shares its process with no HTTP machinery. The Router keeps HTTP, validation and streaming:
`HostedEngine` sends typed commands (`AddCommand`, abort) and receives outputs, iteration statistics and an
`EngineSnapshot` through one long-poll call (`EngineHost.poll`) per batch of outputs, off the iteration's
critical path.

Failures (the first cut, as with the loop beside its target): if the host dies, the replica's in-flight
requests end with a 503 naming the failure, the supervisor starts a new host (fresh caches and a fresh
drafter: no KV slot survives), and requests are served again once it has loaded. Target recovery by
re-prefilling (`SpecEngine._recover_target`) is for targets that live in their own actor; see README.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
import ray
import torch

from cluster.choosers import router_chooser
from cluster.config import AppConfig, resolve_model_path
from cluster.deployments import CALL_TIMEOUT_S, DrafterHost, HostSupervisor, RemoteDrafter
from cluster.engine_builder import build_engine, target_runner
from cluster.engine_loop import EngineFailure, EngineLoop, Item
from cluster.ep_group import assigned_device
from cluster.metrics import Metrics
from policy.stats import IterationStats
from workers.sampling import SamplingParams
from workers.sequence import RequestOutput
from workers.target import Target, TargetInfo
from workers.tokenizer import Tokenizer
from workers.validation import validate_request

logger = logging.getLogger(__name__)
POLL_IDLE_S = 1.0  # an idle host answers a poll after this long, with its snapshot only


class AddCommand(msgspec.Struct, frozen=True):
    """A validated request for the engine: its tokenized prompt and sampling parameters."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class EngineSnapshot(msgspec.Struct, frozen=True):
    """The engine's state as of a poll, for the Router's handlers (they never reach into the engine)."""

    num_running: int
    num_waiting: int
    gauges: dict[str, float]  # drafter_failures, target_recoveries and the chooser's gauges
    last_error: BaseException | None  # the last iteration's failure (None after one that succeeded)


class EngineReport(msgspec.Struct, frozen=True):
    """One poll's answer: outputs since the last poll (already merged to the stream interval), in order."""

    outputs: list[tuple[str, Item]]  # (request_id, output or the request's error)
    stats: list[IterationStats]  # iterations since the last poll, for the Router's metrics
    snapshot: EngineSnapshot


class EngineHost:
    """Runs in a Ray actor (async: its commands and polls run on an event loop, the engine on a thread)."""

    def __init__(self, config: AppConfig) -> None:
        torch.set_num_threads(config.resources.torch_threads)
        res = config.resources
        owner = (
            ray.get_runtime_context().get_actor_name() or "EngineHost"
        )  # <replica>:EngineHost:<generation>
        replica = owner.split(":EngineHost")[0]
        self.drafter_host: HostSupervisor | None = None
        if config.model.draft is not None:  # starts loading in its own actor while the target loads here
            self.drafter_host = HostSupervisor(
                DrafterHost, config, res.drafter_num_cpus, res.drafter_num_gpus, f"{replica}:DrafterHost"
            )
        logger.info("loading the target %s", config.model.target)
        self.target = Target(target_runner(config, assigned_device()))
        drafter = None
        if self.drafter_host is not None:
            actor = self.drafter_host.actor
            vocab_size = ray.get(actor.vocab_size.remote(), timeout=CALL_TIMEOUT_S * 10)
            drafter = RemoteDrafter(self.drafter_host, actor, vocab_size)
        tokenizer = Tokenizer(resolve_model_path(config.model.target))
        engine = build_engine(
            config, self.target, drafter, router_chooser(config, self.target.info), tokenizer
        )
        self.loop = EngineLoop.for_config(config, engine, on_iteration=self._on_iteration)
        self._outputs: list[tuple[str, Item]] = []  # touched on the event loop's thread only
        self._stats: list[IterationStats] = []
        self._ready: asyncio.Event | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None

    def _start(self) -> asyncio.Event:
        if self._ready is None:
            self._event_loop = asyncio.get_running_loop()
            self._ready = asyncio.Event()
            self.loop.start(self._event_loop)
        return self._ready

    # -- commands (from the Router) ----------------------------------------------------------------------------

    async def add(self, command: AddCommand) -> None:
        ready = self._start()
        request_id = command.request_id

        def put(item: Item) -> None:  # on the event loop's thread
            self._outputs.append((request_id, item))
            ready.set()

        self.loop.add(request_id, command.prompt_ids, command.params, put)

    async def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    async def poll(self) -> EngineReport:
        """Outputs and statistics since the last poll; waits for some, at most POLL_IDLE_S."""
        ready = self._start()
        if not self._outputs and not self._stats:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), POLL_IDLE_S)
        ready.clear()
        outputs, self._outputs = self._outputs, []
        stats, self._stats = self._stats, []
        return EngineReport(outputs, stats, self._snapshot())

    def _on_iteration(self, stats: IterationStats) -> None:  # on the engine's thread
        assert self._event_loop is not None and self._ready is not None
        self._event_loop.call_soon_threadsafe(self._add_stats, stats)

    def _add_stats(self, stats: IterationStats) -> None:
        assert self._ready is not None
        self._stats.append(stats)
        self._ready.set()

    def _snapshot(self) -> EngineSnapshot:
        engine = self.loop.engine
        gauges = {k: float(v) for k, v in self.loop.gauges().items() if k != "num_requests_outstanding"}
        return EngineSnapshot(len(engine.running), len(engine.waiting), gauges, self.loop.last_error)

    # -- queries -----------------------------------------------------------------------------------------------

    async def info(self) -> TargetInfo:
        return self.target.info

    async def num_used_slots(self) -> tuple[int, int]:
        """KV slots in use in the target's cache and in the drafter's."""
        drafter = await self.drafter_host.num_used_slots() if self.drafter_host is not None else 0
        return self.target.runner.cache.num_used_slots, drafter

    async def ping(self) -> bool:
        """Healthy: the engine thread runs (once started) and the drafter answers (a dead one is restarted)."""
        if self.loop.has_started and not self.loop.is_alive:
            raise RuntimeError("the engine loop thread has stopped")
        if self.drafter_host is not None:
            self.drafter_host.check()
        return True


class HostedEngine:
    """The Router's engine when the loop runs in an `EngineHost`: an `EngineClient` over one long poll.

    Runs on the Router replica's event loop (no thread of its own). If the host dies, every request it held
    ends with an `EngineFailure` (503), new requests are refused with one until a replacement has loaded, and
    the replacement starts with empty caches and a new drafter.
    """

    def __init__(self, config: AppConfig, host: HostSupervisor, actor: Any, info: TargetInfo) -> None:
        self.host, self._actor = host, actor  # _actor: None while a replacement is looked up
        self._info = info
        self.metrics = Metrics(config.model.served_name, config.engine.max_spec_tokens)
        self.num_outstanding = 0
        self.last_error: BaseException | None = None
        self._queues: dict[str, asyncio.Queue[Item]] = {}
        self._snapshot = EngineSnapshot(0, 0, {}, None)
        self._task: asyncio.Task[None] | None = None

    @property
    def vocab_size(self) -> int:
        return self._info.vocab_size

    @property
    def has_started(self) -> bool:
        return self._task is not None

    @property
    def is_alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, event_loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None:
            self._task = event_loop.create_task(self._poll_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        validate_request(self._info, True, prompt_ids, params)  # the host's engine has the tokenizer

    def gauges(self) -> dict[str, float]:
        return {"num_requests_outstanding": self.num_outstanding, **self._snapshot.gauges}

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue[Item]:
        outputs: asyncio.Queue[Item] = asyncio.Queue()
        if self._actor is None:
            outputs.put_nowait(EngineFailure(RuntimeError("the engine host is restarting")))
            return outputs
        self._queues[request_id] = outputs
        self.num_outstanding += 1
        self._actor.add.remote(AddCommand(request_id, prompt_ids, params))
        return outputs

    def abort(self, request_id: str) -> None:
        if request_id in self._queues and self._actor is not None:
            self._actor.abort.remote(request_id)

    async def _poll_forever(self) -> None:
        while True:
            actor = self._actor
            try:
                report: EngineReport = await actor.poll.remote()
            except Exception as error:  # noqa: BLE001 (the host died or failed: its requests end with it)
                await self._replace(actor, error)
                continue
            self._receive(report)

    def _receive(self, report: EngineReport) -> None:
        for request_id, item in report.outputs:
            outputs = self._queues.get(request_id)
            if outputs is None:
                continue
            if isinstance(item, BaseException) or item.is_finished:
                del self._queues[request_id]
                self.num_outstanding -= 1
            if isinstance(item, TimeoutError):
                self.metrics.count("requests_timed_out_total")
            elif isinstance(item, RequestOutput) and item.finish_reason == "abort":
                self.metrics.count("requests_aborted_total")
            outputs.put_nowait(item)
        for stats in report.stats:
            self.metrics.observe(stats)
        self._snapshot = report.snapshot
        self.last_error = report.snapshot.last_error

    async def _replace(self, actor: Any, error: BaseException) -> None:
        """Fail the requests the host held, then wait for the live host (a new one if it died)."""
        logger.warning("the engine host failed (%s); failing %d requests", error, len(self._queues))
        self._actor, self.last_error = None, error
        failure = EngineFailure(error)
        for outputs in self._queues.values():
            outputs.put_nowait(failure)
        self._queues.clear()
        self.num_outstanding = 0
        while self._actor is None:
            try:
                self._actor = await asyncio.to_thread(self.host.lookup)
            except Exception as lookup_error:  # noqa: BLE001 (still loading, or failed: look again)
                logger.warning("the engine host is not back yet (%s)", lookup_error)
                await asyncio.sleep(1.0)
        if self._actor is actor:  # the same host answered (a failed poll, not a death): do not spin
            await asyncio.sleep(1.0)
        self.last_error = None
