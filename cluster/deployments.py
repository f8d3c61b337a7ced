"""Model hosting: the host actors that hold the models, their supervisor, and the proxies the engine uses.

Why plain actors: the engine calls the drafter and the target every iteration, and a Serve handle call
costs several times a direct actor call (measured here: 6.7 ms against 1.5 ms per call on a loaded 2-core
machine, `bench/rpc.py`). So the models live in host actors (`TargetHost`, `DrafterHost`) that the engine
calls directly.

Binding: each Router replica starts its own TargetHost and DrafterHost (`start_hosts`), so every call about
a sequence reaches the actor holding its cache, and `num_replicas: N` (or Serve's autoscaling) on the one
Router deployment scales the whole unit: N routers, N targets, N drafters, no sequence shared. The replica
owns its hosts (Ray fate-sharing): a replaced router starts with fresh hosts and empty caches, so it never
inherits slots it cannot free. A `HostSupervisor` keeps each host's lifecycle: the router's health check
pings it, and a host that died is started again (the engine re-prefills from its token history).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import ray
import torch

from cluster.config import AppConfig
from cluster.engine_builder import draft_engine, target_runner
from cluster.ep_group import assigned_device
from workers.drafter import DraftOutput, DraftRequest
from workers.sampling import SamplingParams
from workers.target import PrefillOutput, Target, TargetInfo, VerifyOutput, VerifyRequest

logger = logging.getLogger(__name__)
CALL_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 20.0  # a loaded host actor that does not answer a ping for this long is unhealthy
LOAD_TIMEOUT_S = 600.0  # a host actor that has not loaded its model after this long is unhealthy
HOST_NAMESPACE = "moespec-hosts"  # the Ray namespace of the host actors' names


class TargetHost:
    """Runs in a plain Ray actor: the MoE target and its KV cache."""

    def __init__(self, config: AppConfig) -> None:
        torch.set_num_threads(config.resources.torch_threads)
        logger.info("loading the target %s", config.model.target)
        self.target = Target(target_runner(config, assigned_device()))

    def info(self) -> TargetInfo:
        return self.target.info

    def prefill(
        self, seq_ids: list[int], prompts: list[list[int]], params: list[SamplingParams]
    ) -> PrefillOutput:
        return self.target.prefill(seq_ids, prompts, params)

    def verify(self, requests: list[VerifyRequest]) -> VerifyOutput:
        return self._guard(self.target.verify, requests)

    def restore(self, seq_ids: list[int], token_ids: list[list[int]], params: list[SamplingParams]) -> None:
        self._guard(self.target.restore, seq_ids, token_ids, params)

    def free(self, seq_ids: list[int]) -> None:
        self.target.free(seq_ids)

    def num_used_slots(self) -> int:
        return self.target.runner.cache.num_used_slots

    def ping(self) -> bool:
        return True

    def _guard(self, method: Any, *args: Any) -> Any:
        """Run a call; if an expert-parallel group broke (a rank died or hung), rebuild it before raising, so
        that the caller's restore can re-prefill on the fresh group."""
        try:
            return method(*args)
        except Exception:
            runner: Any = self.target.runner
            if getattr(runner, "is_usable", True) is False:
                logger.warning("expert-parallel group broke; rebuilding it")
                runner.rebuild()
            raise


class DrafterHost:
    """Runs in a plain Ray actor: the draft model and its KV cache."""

    def __init__(self, config: AppConfig) -> None:
        assert config.model.draft is not None
        torch.set_num_threads(config.resources.torch_threads)
        logger.info("loading the draft %s", config.model.draft)
        self.drafter = draft_engine(config, assigned_device())

    def vocab_size(self) -> int:
        return self.drafter.vocab_size

    def propose(self, requests: list[DraftRequest]) -> DraftOutput:
        return self.drafter.propose(requests)

    def free(self, seq_ids: list[int]) -> None:
        self.drafter.free(seq_ids)

    def num_used_slots(self) -> int:
        return self.drafter.runner.cache.num_used_slots

    def ping(self) -> bool:
        return True


class HostSupervisor:
    """Starts one host actor (`host_cls`) for a router replica, replaces it when it dies, reports its health.

    The actor is owned by the router replica's process, so it dies with it (Ray fate-sharing): a replaced
    router starts with fresh models and empty caches. Its name (`<name>:<generation>`) lets tools and tests
    find it. Loading a model can take longer than Serve's health-check period (a busy 2-core machine took
    over 20 s for the demo pair), so a host that is still starting is healthy until LOAD_TIMEOUT_S. Used from
    the engine's thread (`lookup`) and Serve's health check (`check`): a lock guards the current actor.
    """

    def __init__(
        self, host_cls: type, config: AppConfig, num_cpus: float, num_gpus: float, name: str
    ) -> None:
        self.host_cls, self.config, self.name = host_cls, config, name
        self._options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0}
        self._lock = threading.Lock()
        self._generation = 0
        self.actor: Any = self._spawn()
        self._ping: tuple[Any, float] | None = None  # the health check's ping in flight, and when it was sent
        self._has_loaded = False  # the current actor answered once: its model is loaded

    @property
    def deployment_name(self) -> str:
        return self.host_cls.__name__

    def _spawn(self) -> Any:
        self._generation += 1
        actor_cls: Any = ray.remote(self.host_cls)
        name = f"{self.name}:{self._generation}"
        return actor_cls.options(name=name, namespace=HOST_NAMESPACE, **self._options).remote(self.config)

    def _replace_if_current(self, dead: Any) -> Any:
        with self._lock:
            if self.actor is dead:
                logger.warning("the %s actor died; starting a new one", self.deployment_name)
                self.actor, self._ping, self._has_loaded = self._spawn(), None, False
            return self.actor

    async def actor_handle(self) -> Any:
        """The actor once its model has loaded (awaited inside the replica's event loop)."""
        actor = self.actor
        await actor.ping.remote()
        return actor

    def lookup(self, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        """The live actor after a failed call (blocking): the same one after a timeout, a new one if it died."""
        actor = self.actor
        try:
            ray.get(actor.ping.remote(), timeout=timeout_s)
            return actor
        except ray.exceptions.RayActorError:
            actor = self._replace_if_current(actor)
        ray.get(actor.ping.remote(), timeout=timeout_s)  # a new actor: wait until its model has loaded
        return actor

    async def num_used_slots(self) -> int:
        return int(await self.actor.num_used_slots.remote())

    def check(self) -> None:
        """Part of the router's health check: raises if the actor stopped answering for HEALTH_TIMEOUT_S after
        it had loaded, or took more than LOAD_TIMEOUT_S to load; starts a new one if it died. Never waits: a
        ping stays in flight between checks, so a model that loads slowly does not fail the first checks."""
        actor = self.actor
        if self._ping is None:
            self._ping = (actor.ping.remote(), time.monotonic())
        ref, sent_at = self._ping
        if ray.wait([ref], timeout=0)[0]:
            self._ping = None
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                self._replace_if_current(actor)
                return
            self._has_loaded = True
            return
        waited = time.monotonic() - sent_at
        if self._has_loaded and waited > HEALTH_TIMEOUT_S:
            raise RuntimeError(f"the {self.deployment_name} actor has not answered for {waited:.0f} s")
        if not self._has_loaded and waited > LOAD_TIMEOUT_S:
            raise RuntimeError(f"the {self.deployment_name} actor has not loaded within {waited:.0f} s")


@dataclass(frozen=True)
class ModelHosts:
    """A router replica's own model hosts: the target and (with speculation) the drafter."""

    # The TargetHost (engine.loop router), the EngineHost (target_host), or None: the target runs in the
    # router's process (beside_target).
    target: HostSupervisor | None
    drafter: HostSupervisor | None  # None without speculation, or when the EngineHost owns the drafter


def start_hosts(config: AppConfig, owner: str) -> ModelHosts:
    """Start the host actors of one router replica (`owner`: the replica's name, which the actors' names
    carry). The models load while the replica starts."""
    res = config.resources
    if config.engine.loop == "target_host":  # the engine host loads the target and starts the drafter
        from cluster.engine_host import EngineHost

        engine_host = HostSupervisor(
            EngineHost, config, res.target_num_cpus, res.target_num_gpus, f"{owner}:EngineHost"
        )
        return ModelHosts(engine_host, None)
    single = config.expert_parallel.num_ranks == 1  # else the expert-parallel ranks hold the resources
    target = None
    if config.engine.loop == "router":
        target = HostSupervisor(
            TargetHost,
            config,
            res.target_num_cpus if single else 0.1,
            res.target_num_gpus if single else 0.0,
            f"{owner}:TargetHost",
        )
    drafter = None
    if config.model.draft is not None:
        drafter = HostSupervisor(
            DrafterHost, config, res.drafter_num_cpus, res.drafter_num_gpus, f"{owner}:DrafterHost"
        )
    return ModelHosts(target, drafter)


class BackendUnavailable(RuntimeError):
    """A host actor is being looked up again after a failure; the call was not made."""


Host = TypeVar("Host", TargetHost, DrafterHost)
Params = ParamSpec("Params")
Result = TypeVar("Result")


class _Remote(Generic[Host]):
    """Typed blocking calls to a host actor (of class `Host`) from the engine's thread.

    `call(TargetHost.verify, requests)` names the method by the host class's own function, so mypy checks
    the arguments against its signature and types the result: no method names in strings.

    After a failed call the actor is looked up again through its supervisor (the same actor after a timeout,
    a new one after it died) before the next call. With `lookup_in_background`, the look-up runs on a helper
    thread and calls fail fast with `BackendUnavailable` until it answers, so the engine's loop never waits
    for a replacement (the drafter's case: the engine runs at K = 0 meanwhile). Frees sent while no actor is
    known are kept and sent first to the next actor, so one failed call never drops later frees (a new actor
    holds no sequences; the frees are no-ops there).
    """

    def __init__(
        self, host: HostSupervisor, actor: Any, timeout_s: float, lookup_in_background: bool = False
    ) -> None:
        self.host, self.timeout_s = host, timeout_s
        self._actor: Any = actor  # None after a failed call, until looked up again
        self._unsent_frees: list[list[int]] = []
        self._lookup: concurrent.futures.Future[Any] | None = None
        self._lookup_pool = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="actor-lookup")
            if lookup_in_background
            else None
        )

    def call(
        self,
        method: Callable[Concatenate[Host, Params], Result],
        *args: Params.args,
        **kwargs: Params.kwargs,
    ) -> Result:
        if self._actor is None:
            self._use(self._looked_up())
        try:
            remote_method = getattr(self._actor, method.__name__)  # the actor's handle to the same method
            result: Result = ray.get(remote_method.remote(*args, **kwargs), timeout=self.timeout_s)
            return result
        except Exception:
            self._actor = None
            raise

    def free(self, seq_ids: list[int]) -> None:
        """Submit without waiting (off the iteration's critical path). A Ray actor runs one caller's calls
        in submission order, so the free is done before any later `call` runs."""
        if self._actor is None:
            self._unsent_frees.append(seq_ids)
            return
        self._actor.free.remote(seq_ids)

    def _use(self, actor: Any) -> None:
        self._actor = actor
        for seq_ids in self._unsent_frees:
            actor.free.remote(seq_ids)
        self._unsent_frees.clear()

    def _looked_up(self) -> Any:
        if self._lookup_pool is None:
            return self.host.lookup()
        if self._lookup is None:
            self._lookup = self._lookup_pool.submit(self.host.lookup)
        if not self._lookup.done():
            raise BackendUnavailable(f"looking up a replacement {self.host.deployment_name} actor")
        lookup, self._lookup = self._lookup, None
        return lookup.result()  # raises the look-up's error; the next call starts another


class RemoteTarget:
    """The engine's target backend: a TargetHost actor."""

    def __init__(self, host: HostSupervisor, actor: Any, info: TargetInfo) -> None:
        self.remote: _Remote[TargetHost] = _Remote(host, actor, CALL_TIMEOUT_S)
        self.info = info

    def prefill(
        self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> PrefillOutput:
        return self.remote.call(TargetHost.prefill, list(seq_ids), [list(p) for p in prompts], list(params))

    def verify(self, requests: Sequence[VerifyRequest]) -> VerifyOutput:
        return self.remote.call(TargetHost.verify, list(requests))

    def restore(
        self, seq_ids: Sequence[int], token_ids: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> None:
        self.remote.call(TargetHost.restore, list(seq_ids), [list(t) for t in token_ids], list(params))

    def free(self, seq_ids: Sequence[int]) -> None:
        self.remote.free(list(seq_ids))


class RemoteDrafter:
    """The engine's draft backend: a DrafterHost actor. Failures reach the engine, which continues at
    K = 0 for a while (see SpecEngine._draft)."""

    def __init__(self, host: HostSupervisor, actor: Any, vocab_size: int, timeout_s: float = 5.0) -> None:
        self.remote: _Remote[DrafterHost] = _Remote(host, actor, timeout_s, lookup_in_background=True)
        self.vocab_size = vocab_size

    def propose(self, requests: Sequence[DraftRequest]) -> DraftOutput:
        return self.remote.call(DrafterHost.propose, list(requests))

    def free(self, seq_ids: Sequence[int]) -> None:
        self.remote.free(list(seq_ids))
