"""Builds the Ray Serve application: one Router deployment (engine.backend = native), each replica with its
own drafter and target host actors, or one `VllmServer` deployment, a vLLM engine with our scheduler per
replica (engine.backend = vllm). `replicas.num_replicas` / `replicas.autoscaling_config` scale the Router.

`build_app(args)` is the import path of every Serve config (`cluster.app:build_app`); `args` are validated
into an `AppConfig`. `serve.deployment` is applied here and only here, so the classes stay testable.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray
import torch
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response

from cluster.choosers import router_chooser
from cluster.config import AppConfig, resolve_model_path
from cluster.deployments import ModelHosts, RemoteDrafter, RemoteTarget, start_hosts
from cluster.engine_builder import build_engine, target_runner
from cluster.engine_host import HostedEngine
from cluster.engine_loop import EngineLoop
from cluster.openai_api import APIError
from cluster.router import Router, unavailable
from workers.backends import TargetBackend
from workers.kv_cache import CacheCapacityError
from workers.target import Target
from workers.tokenizer import Tokenizer

START_WAIT_S = 60.0  # a request that arrives while the model replicas load waits this long, then gets 503


class RouterServer:
    """The ingress deployment: one replica = HTTP, the engine loop and its own model hosts.

    The hosts start loading when the replica starts (`start_hosts`; tests inject their own). The engine is
    built in the background from the first request on: hosts are awaited, never blocked on, inside the
    replica's event loop. Until it is built, /health answers 503 at once and other requests wait up to
    START_WAIT_S; a failed build answers 503 with its reason and is retried by the next request.
    """

    def __init__(self, config: AppConfig, hosts: ModelHosts | None = None) -> None:
        self.config = config
        self.hosts = hosts if hosts is not None else start_hosts(config, replica_name())
        self.router: Router | None = None
        self._building: asyncio.Task[Router] | None = None
        self._local_target: Target | None = None  # engine.loop beside_target

    async def __call__(self, request: Request) -> Response:
        if self.router is None:
            try:
                self.router = await self._wait_built(0.0 if request.url.path == "/health" else START_WAIT_S)
            except APIError as error:
                return error.response()
        return await self.router(request)

    async def _wait_built(self, timeout_s: float) -> Router:
        if self._building is None or (self._building.done() and self._building.exception() is not None):
            self._building = asyncio.create_task(self._build_router())
        if not self._building.done():
            await asyncio.wait([self._building], timeout=timeout_s)
        if not self._building.done():
            raise unavailable("the model hosts are still starting")
        error = self._building.exception()
        if error is not None:
            raise unavailable(f"the router could not reach its model hosts: {error}")
        return self._building.result()

    async def _build_router(self) -> Router:
        hosts = self.hosts
        if self.config.engine.loop == "target_host":  # the engine runs in the host: nothing to build here
            assert hosts.target is not None
            actor = await hosts.target.actor_handle()
            engine = HostedEngine(self.config, hosts.target, actor, await actor.info.remote())
            tokenizer = await asyncio.to_thread(Tokenizer, resolve_model_path(self.config.model.target))
            return Router(self.config, engine, tokenizer, self._api_key())
        target: TargetBackend
        if hosts.target is None:  # engine.loop beside_target: the model loads here, off the event loop
            target = self._local_target = await asyncio.to_thread(local_target, self.config)
        else:
            target_actor = await hosts.target.actor_handle()
            target = RemoteTarget(hosts.target, target_actor, await target_actor.info.remote())
        drafter = None
        if hosts.drafter is not None:
            drafter_actor = await hosts.drafter.actor_handle()
            drafter = RemoteDrafter(hosts.drafter, drafter_actor, await drafter_actor.vocab_size.remote())
        # The rest reads files and builds models of the policy: off the event loop, so /health keeps answering.
        return await asyncio.to_thread(self._assemble, target, drafter)

    def _assemble(self, target: TargetBackend, drafter: RemoteDrafter | None) -> Router:
        config = self.config
        chooser = router_chooser(config, target.info)
        tokenizer = Tokenizer(resolve_model_path(config.model.target))
        engine = build_engine(config, target, drafter, chooser, tokenizer)
        return Router(config, EngineLoop.for_config(config, engine), tokenizer, self._api_key())

    def _api_key(self) -> str | None:
        server = self.config.server
        if server.api_key is None and server.api_key_env:
            return os.environ.get(server.api_key_env) or None
        return server.api_key

    async def num_used_slots(self) -> tuple[int, int]:
        """KV slots in use in this replica's target and drafter caches (for tests and operators)."""
        target, drafter = self.hosts.target, self.hosts.drafter
        if target is not None and self.config.engine.loop == "target_host":
            used = await target.actor.num_used_slots.remote()  # the EngineHost asks its drafter
            return int(used[0]), int(used[1])
        if target is not None:
            num_target = await target.num_used_slots()
        else:
            num_target = self._local_target.runner.cache.num_used_slots if self._local_target else 0
        return num_target, await drafter.num_used_slots() if drafter else 0

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve's per-replica statistics hook (Serve's controller polls it for request routers; tests and
        operators call it on the replica's actor): this replica's KV slots in use, (target, drafter), in
        either placement of the target."""
        return {"num_used_slots": await self.num_used_slots()}

    def check_health(self) -> None:
        """Serve's health check: raises if the engine loop died, if a model host hangs (see
        `HostSupervisor.check`; a dead one is started again), or if the target's cache refused new requests
        while this router ran none (slots held by nobody: the replacement router starts with empty caches)."""
        for host in (self.hosts.target, self.hosts.drafter):
            if host is not None:
                host.check()
        loop = self.router.loop if self.router is not None else None
        if loop is not None and loop.has_started and not loop.is_alive:
            raise RuntimeError("the engine loop thread has stopped")
        if loop is not None and isinstance(loop.last_error, CacheCapacityError):
            raise RuntimeError(f"the KV cache refuses requests while none run: {loop.last_error}")


def local_target(config: AppConfig) -> Target:
    """The target in this process (engine.loop beside_target: on the CPU), with the model processes' torch
    threads."""
    torch.set_num_threads(config.resources.torch_threads)
    return Target(target_runner(config))


def router_num_cpus(config: AppConfig) -> float:
    """The Router replica's CPUs: its own, plus the target's when the target runs in its process."""
    res = config.resources
    return res.router_num_cpus + (res.target_num_cpus if config.engine.loop == "beside_target" else 0.0)


def replica_name() -> str:
    """This Router replica's name (app, deployment, replica id); its host actors' names start with it."""
    context = serve.get_replica_context()
    return f"{context.app_name}#{context.deployment}#{context.replica_id.unique_id}"


def resource_demand(config: AppConfig) -> dict[str, dict[str, float]]:
    """The logical resources each part of the app reserves at deployment, as Ray schedules them: each part
    of a replica times the replicas that start (`replicas.num_starting`), the central policy actor once."""
    res, num_ranks = config.resources, config.expert_parallel.num_ranks
    parts = {"Router": {"CPU": router_num_cpus(config)}}
    if config.engine.loop == "beside_target":
        pass  # the target runs in the Router's process
    elif config.engine.loop == "target_host":
        parts["Engine host (target)"] = {"CPU": res.target_num_cpus, "GPU": res.target_num_gpus}
    elif num_ranks == 1:
        parts["MoETarget host"] = {"CPU": res.target_num_cpus, "GPU": res.target_num_gpus}
    else:
        parts["MoETarget host"] = {"CPU": 0.1}
        ranks = {
            "CPU": num_ranks * res.target_num_cpus,
            "GPU": float(num_ranks if res.target_num_gpus else 0),
        }
        parts[f"{num_ranks} expert-parallel ranks"] = ranks
    if config.model.draft is not None:
        parts["Drafter host"] = {"CPU": res.drafter_num_cpus, "GPU": res.drafter_num_gpus}
    num_replicas = config.replicas.num_starting
    if num_replicas > 1:
        parts = {
            f"{num_replicas} x {part}": {r: amount * num_replicas for r, amount in demand.items()}
            for part, demand in parts.items()
        }
    if config.policy.kind in ("auto", "cascade") and config.policy.use_central_actor:
        parts["SpecPolicy actor"] = {"CPU": 0.1}
    return parts


def check_fits(demand: dict[str, dict[str, float]], cluster: dict[str, float]) -> None:
    """Fail at deployment, naming the resource, when the app needs more than the whole cluster has (Serve
    would otherwise wait for it forever)."""
    for resource in ("CPU", "GPU"):
        needed = {part: r.get(resource, 0.0) for part, r in demand.items() if r.get(resource, 0.0) > 0}
        total = sum(needed.values())
        if total > cluster.get(resource, 0.0) + 1e-9:
            detail = ", ".join(f"{part} {amount:g}" for part, amount in needed.items())
            raise ValueError(
                f"the application needs {total:g} {resource} ({detail}) but the Ray cluster has "
                f"{cluster.get(resource, 0.0):g} {resource} in total; lower the `resources` section of the "
                f"Serve config or give Ray more {resource}s (ray start --num-{resource.lower()}s)"
            )


def build_app(args: dict[str, Any] | None = None) -> Application:
    config = AppConfig.from_args(args)
    if config.engine.backend == "vllm":
        return build_vllm_app(config)
    if ray.is_initialized():  # on a cluster (serve run, serve deploy, our CLI); not when only validating
        check_fits(resource_demand(config), ray.cluster_resources())
    router = serve.deployment(
        name="Router",
        max_ongoing_requests=config.max_outstanding + 16,  # 429s come from the router
        ray_actor_options={"num_cpus": router_num_cpus(config)},
        **scaling(config),
    )(RouterServer)
    return router.bind(config)


def scaling(config: AppConfig) -> dict[str, Any]:
    """Serve's replica options of either backend's deployment: a fixed number, or its autoscaling."""
    replicas = config.replicas
    if replicas.autoscaling_config is not None:
        return {"autoscaling_config": replicas.autoscaling_config}
    return {"num_replicas": replicas.num_replicas or 1}


def build_vllm_app(config: AppConfig) -> Application:
    """One deployment; each replica runs one vLLM engine (draft and target inside it) behind our Router."""
    from cluster.vllm_backend.server import VllmServer  # imports no vLLM until a replica starts its engine

    resources = config.resources
    num_gpus = resources.target_num_gpus * config.expert_parallel.num_ranks
    deployment = serve.deployment(
        name="VllmServer",
        max_ongoing_requests=config.max_outstanding + 16,
        ray_actor_options={"num_cpus": resources.target_num_cpus, "num_gpus": num_gpus},
        health_check_period_s=10,
        health_check_timeout_s=60,
        **scaling(config),
    )(VllmServer)
    return deployment.bind(config)
