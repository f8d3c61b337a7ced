"""Model hosting: Serve deployments that own plain Ray actors, and the proxies the router's engine uses.

Why actors under the deployments: the engine calls the drafter and the target every iteration, and a
Serve handle call costs several times a direct actor call (measured here: 6.7 ms against 1.5 ms per call
on a loaded 2-core machine, `bench/rpc.py`). So each deployment replica (`TargetServer`,
`DrafterServer`) starts one host actor (`TargetHost`, `DrafterHost`) that holds the model and its KV caches,
hands the actor to its router once, and keeps the lifecycle: its health check pings the actor, so a dead
actor makes Serve replace the replica, and the replica's death takes the actor with it (Ray fate-sharing).

Binding: an app has one Router, one Drafter and one MoETarget replica, so every call about a sequence
reaches the actor holding its cache. Scale out with more apps (one expert-parallel group each).

Ownership: a host actor's sequences belong to one owner, the router whose engine runs them. A router
`claim`s the actor before its first call (and after it re-resolves one), and a claim by a new owner frees
every sequence of the old one. So a replaced router never inherits slots it cannot free: the sequence ids
it numbers from 0 again cannot collide with its predecessor's, and nothing of the old one stays cached.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
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


class _OwnedHost:
    """The sequences of a host actor belong to one owner (see the module docstring)."""

    owner: str | None = None

    def claim(self, owner: str) -> int:
        """Make `owner` the owner; a new owner frees every sequence of the old one. Returns how many."""
        if owner == self.owner:
            return 0
        seq_ids = self._seq_ids()
        if seq_ids:
            logger.warning("owner %s replaces %s: freeing its %d sequences", owner, self.owner, len(seq_ids))
            self.free(seq_ids)
        self.owner = owner
        return len(seq_ids)

    def _seq_ids(self) -> list[int]:
        raise NotImplementedError

    def free(self, seq_ids: list[int]) -> None:
        raise NotImplementedError


class TargetHost(_OwnedHost):
    """Runs in a plain Ray actor: the MoE target and its KV cache."""

    def __init__(self, config: AppConfig) -> None:
        torch.set_num_threads(config.resources.torch_threads)
        logger.info("loading the target %s", config.model.target)
        self.target = Target(target_runner(config, assigned_device()))

    def _seq_ids(self) -> list[int]:
        return self.target.runner.cache.seq_ids

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


class DrafterHost(_OwnedHost):
    """Runs in a plain Ray actor: the draft model and its KV cache."""

    def __init__(self, config: AppConfig) -> None:
        assert config.model.draft is not None
        torch.set_num_threads(config.resources.torch_threads)
        logger.info("loading the draft %s", config.model.draft)
        self.drafter = draft_engine(config, assigned_device())

    def _seq_ids(self) -> list[int]:
        return self.drafter.runner.cache.seq_ids

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


class _HostServer:
    """A Serve replica that owns one host actor (`host_cls`) and reports its health.

    Loading the model can take longer than Serve's health-check period (a busy 2-core machine took over 20 s
    for the demo pair), so a host that is still starting is healthy until LOAD_TIMEOUT_S; one whose
    start-up failed, or that died, or that stopped answering once started, is not.
    """

    host_cls: type

    def __init__(self, config: AppConfig, num_cpus: float, num_gpus: float) -> None:
        actor_cls: Any = ray.remote(self.host_cls)
        self.actor = actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0).remote(config)
        self._ping: tuple[Any, float] | None = None  # the health check's ping in flight, and when it was sent
        self._has_loaded = False  # the actor answered once: its model is loaded

    async def actor_handle(self) -> Any:
        await self.actor.ping.remote()  # loaded and answering
        return self.actor

    async def num_used_slots(self) -> int:
        return int(await self.actor.num_used_slots.remote())

    def check_health(self) -> None:
        """Serve's health check: raises if the host actor died, stopped answering for HEALTH_TIMEOUT_S after
        it had loaded, or took more than LOAD_TIMEOUT_S to load. Never waits: a ping stays in flight between
        checks, so a model that loads slowly (a busy machine, a large checkpoint) does not fail the replica's
        first checks, while a dead actor's ping fails at once."""
        if self._ping is None:
            self._ping = (self.actor.ping.remote(), time.monotonic())
        ref, sent_at = self._ping
        if ray.wait([ref], timeout=0)[0]:
            self._ping = None
            ray.get(ref)  # raises if the actor died
            self._has_loaded = True
            return
        waited = time.monotonic() - sent_at
        if self._has_loaded and waited > HEALTH_TIMEOUT_S:
            raise RuntimeError(f"the {self.host_cls.__name__} actor has not answered for {waited:.0f} s")
        if not self._has_loaded and waited > LOAD_TIMEOUT_S:
            raise RuntimeError(f"the {self.host_cls.__name__} actor has not loaded within {waited:.0f} s")


class TargetServer(_HostServer):
    host_cls = TargetHost

    def __init__(self, config: AppConfig) -> None:
        res = config.resources
        single = config.expert_parallel.num_ranks == 1  # else the ranks hold the resources
        super().__init__(
            config, res.target_num_cpus if single else 0.1, res.target_num_gpus if single else 0.0
        )


class DrafterServer(_HostServer):
    host_cls = DrafterHost

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config, config.resources.drafter_num_cpus, config.resources.drafter_num_gpus)


class BackendUnavailable(RuntimeError):
    """A host actor is being looked up again after a failure; the call was not made."""


Host = TypeVar("Host", bound=_OwnedHost)
Params = ParamSpec("Params")
Result = TypeVar("Result")


class _Remote(Generic[Host]):
    """Typed blocking calls to a host actor (of class `Host`) from the engine's thread, as `owner`.

    `call(TargetHost.verify, requests)` names the method by the host class's own function, so mypy checks
    the arguments against its signature and types the result: no method names in strings.

    `actor` is handed over already claimed by `owner`. After a failed call the actor is looked up again
    through its (possibly replaced) replica and claimed before the next call. With `lookup_in_background`,
    the look-up runs on a helper thread and calls fail fast with `BackendUnavailable` until it answers, so the
    engine's loop never waits for a replacement (the drafter's case: the engine runs at K = 0 meanwhile).
    Frees sent while no actor is known are kept and sent first to the next actor, so one failed call never
    drops later frees.
    """

    def __init__(
        self, server_handle: Any, actor: Any, timeout_s: float, owner: str, lookup_in_background: bool = False
    ) -> None:
        self.server_handle, self.timeout_s, self.owner = server_handle, timeout_s, owner
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
            return self._claim_replacement()
        if self._lookup is None:
            self._lookup = self._lookup_pool.submit(self._claim_replacement)
        if not self._lookup.done():
            raise BackendUnavailable(f"looking up a replacement {self.server_handle.deployment_name} replica")
        lookup, self._lookup = self._lookup, None
        return lookup.result()  # raises the look-up's error; the next call starts another

    def _claim_replacement(self) -> Any:
        """The replica's actor (the same one after a timeout, a new one after a replacement), claimed."""
        actor = self.server_handle.actor_handle.remote().result(timeout_s=CALL_TIMEOUT_S)
        ray.get(actor.claim.remote(self.owner), timeout=self.timeout_s)
        return actor


class RemoteTarget:
    """The engine's target backend: a TargetHost actor."""

    def __init__(self, server_handle: Any, actor: Any, info: TargetInfo, owner: str) -> None:
        self.remote: _Remote[TargetHost] = _Remote(server_handle, actor, CALL_TIMEOUT_S, owner)
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

    def __init__(
        self, server_handle: Any, actor: Any, vocab_size: int, owner: str, timeout_s: float = 5.0
    ) -> None:
        self.remote: _Remote[DrafterHost] = _Remote(
            server_handle, actor, timeout_s, owner, lookup_in_background=True
        )
        self.vocab_size = vocab_size

    def propose(self, requests: Sequence[DraftRequest]) -> DraftOutput:
        return self.remote.call(DrafterHost.propose, list(requests))

    def free(self, seq_ids: Sequence[int]) -> None:
        self.remote.free(list(seq_ids))
