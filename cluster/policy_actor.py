"""The central policy: one named Ray actor that every router reports to, and the router-side client.

The actor wraps `policy.aggregator.PolicyAggregator` (transport-free logic). A router's `PolicyClient` is its
K chooser: it answers from the latest central decision while that decision's window lasts, and asks its
local chooser only otherwise (before the first answer, while the actor is unreachable, for requests the
decision does not list). The local chooser observes every iteration either way, so it is warm when needed.
Calls to the actor never block an iteration: one report is in flight at a time and is picked up when ready;
the next window's report goes out one iteration before the current window ends, so that its answer is
normally back in time. Messages are msgspec-encoded (`IterationStats` in, `Decision` out).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import msgspec
import ray

from policy.aggregator import AggregatorConfig, PolicyAggregator
from policy.stats import Decision, IterationStats, JoinAware, KChooser, OutlookAware, RequestOutlook

logger = logging.getLogger(__name__)
_stats_encoder = msgspec.msgpack.Encoder()
_stats_decoder = msgspec.msgpack.Decoder(list[IterationStats])
_decision_decoder = msgspec.msgpack.Decoder(Decision)
POLICY_NAMESPACE = "moespec"
MAX_UNREPORTED_ITERATIONS = 512  # the cost model keeps no more than this many recent iterations either


class SpecPolicy:
    """The actor's body (ray.remote is applied in `policy_actor_handle`)."""

    def __init__(self, window_iterations: int, make_chooser: Callable[[], KChooser]) -> None:
        self.aggregator = PolicyAggregator(
            AggregatorConfig(window_iterations=window_iterations), make_chooser
        )

    def report(
        self, source: str, stats: bytes, released: list[str], request_ids: list[str], iteration: int
    ) -> bytes:
        now = time.monotonic()
        for item in _stats_decoder.decode(stats):
            self.aggregator.ingest(msgspec.structs.replace(item, source=source), now)
        for request_id in released:
            self.aggregator.release(request_id)
        self.aggregator.expire(now)
        decision = self.aggregator.decide(source, request_ids, iteration, now)
        return _stats_encoder.encode(decision)

    def num_requests(self) -> int:
        return self.aggregator.num_requests

    def num_decisions(self) -> int:
        """Decisions published so far (the aggregator's version)."""
        return self.aggregator.version

    def source_names(self) -> list[str]:
        """The routers and vLLM engines that have reported so far."""
        return self.aggregator.source_names

    def gauges(self) -> dict[str, dict[str, float]]:
        """Each source's chooser's gauges (`KChooser.gauges`): what the central policy decides from."""
        return self.aggregator.gauges()


def ray_reply(pending: Any) -> bytes | None:
    """The actor's answer if it has arrived (None if not yet); raises if the call failed."""
    ready, _ = ray.wait([pending], timeout=0)
    return ray.get(ready[0]) if ready else None


def policy_actor_handle(name: str, window_iterations: int, make_chooser: Callable[[], KChooser]) -> Any:
    """The named policy actor, created by the first router that asks (detached: it outlives routers)."""
    actor_cls = ray.remote(num_cpus=0.1, max_restarts=-1)(SpecPolicy)
    options = {"name": name, "namespace": POLICY_NAMESPACE, "get_if_exists": True, "lifetime": "detached"}
    return actor_cls.options(**options).remote(window_iterations, make_chooser)


class PolicyClient:
    """A router's K chooser backed by the central actor, with a local chooser as the fallback."""

    def __init__(
        self,
        source: str,
        local: KChooser,
        connect: Callable[[], Any],
        retry_s: float = 5.0,
        reply: Callable[[Any], bytes | None] = ray_reply,
    ) -> None:
        self.source = source
        self.local = local
        # What the local chooser takes, read once: a check against a runtime Protocol took 5-15 us (`KPlan`),
        # and the engine sets an outlook every step.
        self._local_takes_outlook = isinstance(local, OutlookAware)
        self._local_takes_joined = isinstance(local, JoinAware)
        self._connect = connect
        self._reply = reply  # the answer to the report in flight, if it arrived (tests inject a fake)
        self._retry_s = retry_s
        self._actor: Any = None
        self._next_connect = 0.0
        self._pending: Any = None  # the report in flight (an ObjectRef)
        # Iterations not yet reported; only the latest are kept while nothing asks the actor (no auto requests).
        self._stats: deque[IterationStats] = deque(maxlen=MAX_UNREPORTED_ITERATIONS)
        self._released: list[str] = []
        self._decision: Decision | None = None
        self._iteration = 0
        self.num_central_decisions = 0  # answers received from the actor
        self.num_local_choices = 0  # calls to the local chooser (the fallback)
        self.num_failures = 0
        # Start (or find) the actor now: creating it starts a process, which should not happen on the
        # serving loop when the first auto request arrives.
        self._ensure_actor()

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        self._poll()
        decision = self._decision
        if decision is None or not _covers_iteration(decision, self._iteration):
            self._send(request_ids, self._iteration)
            return self._choose_locally(request_ids)
        central = decision.num_spec_tokens
        missing = [r for r in request_ids if r not in central]
        if missing:
            self._send(request_ids, self._iteration)  # a new decision that lists the new requests
        elif self._iteration == decision.first_iteration + decision.num_iterations - 1:
            self._send(request_ids, self._iteration + 1)  # the next window, back before it starts
        chosen = self._choose_locally(missing) if missing else {}
        return {r: central[r] if r in central else chosen[r] for r in request_ids}

    def set_outlook(self, outlook: Mapping[str, RequestOutlook]) -> None:
        """(`OutlookAware`) For the local chooser: the central decisions are made for windows of iterations
        from reports, and do not weigh it."""
        if self._local_takes_outlook:
            cast(OutlookAware, self.local).set_outlook(outlook)

    def choose_joined(self, joined: Sequence[str], chosen: Mapping[str, int]) -> dict[str, int]:
        """(`JoinAware`) The local chooser's: no central decision names a request that just joined."""
        if not self._local_takes_joined:
            return dict.fromkeys(joined, 0)
        self.num_local_choices += 1
        return cast(JoinAware, self.local).choose_joined(joined, chosen)

    def observe(self, stats: IterationStats) -> None:
        self.local.observe(stats)
        self._stats.append(stats)
        self._iteration = stats.iteration + 1

    def release(self, request_id: str) -> None:
        self.local.release(request_id)
        self._released.append(request_id)

    def gauges(self) -> dict[str, float]:
        """A central policy that keeps failing is visible here."""
        return {
            **self.local.gauges(),
            "policy_central_decisions": self.num_central_decisions,
            "policy_actor_failures": self.num_failures,
        }

    @property
    def is_connected(self) -> bool:
        return self._actor is not None

    def _choose_locally(self, request_ids: Sequence[str]) -> dict[str, int]:
        self.num_local_choices += 1
        return self.local.choose(request_ids)

    def _send(self, request_ids: Sequence[str], iteration: int) -> None:
        """Report what happened since the last report and ask for a decision from `iteration` on."""
        if self._pending is not None or not self._ensure_actor():
            return
        stats, released = list(self._stats), self._released
        self._stats.clear()
        self._released = []
        try:
            self._pending = self._actor.report.remote(
                self.source, _stats_encoder.encode(stats), released, list(request_ids), iteration
            )
        except Exception as error:  # noqa: BLE001 (the local chooser keeps serving)
            self._lost(error)

    def _poll(self) -> None:
        if self._pending is None:
            return
        try:
            reply = self._reply(self._pending)
            if reply is None:
                return  # still in flight
            self._decision = _decision_decoder.decode(reply)
            self.num_central_decisions += 1
        except Exception as error:  # noqa: BLE001 (the local chooser keeps serving)
            self._lost(error)
        self._pending = None

    def _ensure_actor(self) -> bool:
        if self._actor is None and time.monotonic() >= self._next_connect:
            try:
                self._actor = self._connect()
            except Exception as error:  # noqa: BLE001
                self._lost(error)
        return self._actor is not None

    def _lost(self, error: BaseException) -> None:
        self.num_failures += 1
        logger.warning(
            "policy actor unreachable (%s); deciding locally, retrying in %.0f s", error, self._retry_s
        )
        self._actor = None
        self._decision = None
        self._next_connect = time.monotonic() + self._retry_s


def _covers_iteration(decision: Decision, iteration: int) -> bool:
    return decision.first_iteration <= iteration < decision.first_iteration + decision.num_iterations
