"""Builds the Ray Serve application: Router (ingress) -> Drafter and MoETarget deployments (engine.backend =
native), or one `VllmServer` deployment, a vLLM engine with our scheduler per replica (engine.backend = vllm).

`build_app(args)` is the import path of every Serve config (`cluster.app:build_app`); `args` are validated
into an `AppConfig`. `serve.deployment` is applied here and only here, so the classes stay testable.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response

from cluster.choosers import analytic_prior, make_chooser, shared_chooser_factory
from cluster.config import AppConfig
from cluster.deployments import DrafterServer, RemoteDrafter, RemoteTarget, TargetServer, resolve_model_path
from cluster.policy_actor import PolicyClient, policy_actor_handle
from cluster.router import Router
from policy.guard import MeasuredGuard
from policy.stats import KChooser
from workers.checkpoint import checkpoint_dtype
from workers.config import ModelConfig
from workers.engine import EngineConfig, SpecEngine
from workers.target import TargetInfo
from workers.tokenizer import Tokenizer


class RouterServer:
    """The ingress deployment: builds the engine over handles to its bound Drafter and MoETarget.

    The engine is built on the first request (health checks included): handles are awaited, never blocked
    on, inside the replica's event loop.
    """

    def __init__(self, config: AppConfig, target_handle: Any, drafter_handle: Any | None) -> None:
        self.config = config
        self.target_handle, self.drafter_handle = target_handle, drafter_handle
        self.router: Router | None = None
        self._starting = asyncio.Lock()

    async def __call__(self, request: Request) -> Response:
        if self.router is None:
            async with self._starting:
                if self.router is None:
                    self.router = await self._build_router()
        return await self.router(request)

    async def _build_router(self) -> Router:
        config = self.config
        target_actor = await self.target_handle.actor_handle.remote()
        target = RemoteTarget(self.target_handle, target_actor, await target_actor.info.remote())
        drafter = None
        if self.drafter_handle is not None:
            drafter_actor = await self.drafter_handle.actor_handle.remote()
            drafter = RemoteDrafter(
                self.drafter_handle, drafter_actor, await drafter_actor.vocab_size.remote()
            )
        chooser = self._chooser(target.info)
        tokenizer = Tokenizer(resolve_model_path(config.model.target))
        engine_config = EngineConfig(
            max_batch_size=config.engine.max_batch_size,
            max_spec_tokens=config.engine.max_spec_tokens,
            max_waiting=config.engine.max_waiting + config.engine.max_batch_size,
            drafter_retry_s=2.0,
            target_recovery_s=config.engine.target_recovery_s,
        )
        engine = SpecEngine(target, drafter, chooser, engine_config, tokenizer)
        api_key = config.server.api_key
        if api_key is None and config.server.api_key_env:
            api_key = os.environ.get(config.server.api_key_env) or None
        return Router(config, engine, tokenizer, api_key)

    def _chooser(self, info: TargetInfo) -> KChooser:
        policy, max_spec, model = self.config.policy, self.config.engine.max_spec_tokens, self.config.model
        target = ModelConfig.from_dir(resolve_model_path(model.target))
        draft = ModelConfig.from_dir(resolve_model_path(model.draft)) if model.draft else None
        dtype = checkpoint_dtype(resolve_model_path(model.target)) if model.dtype == "auto" else model.dtype
        prior = analytic_prior(target, draft, 2 if "16" in str(dtype) else 4)
        local = make_chooser(policy, info, max_spec, prior=prior)
        if policy.kind in ("off", "static"):
            return local
        if not policy.use_central_actor:
            return MeasuredGuard(local)
        factory = shared_chooser_factory(policy, info, max_spec, prior)
        client = PolicyClient(
            f"router-{uuid.uuid4().hex[:8]}",
            local,
            lambda: policy_actor_handle(policy.actor_name, policy.window_iterations, factory),
        )
        # This router's batch must measure faster drafting than plain, whatever the policy's model says.
        return MeasuredGuard(client)

    def check_health(self) -> None:
        """Serve's health check: raises if the engine loop died."""
        loop = self.router.loop if self.router is not None else None
        if loop is not None and loop.has_started and not loop.is_alive:
            raise RuntimeError("the engine loop thread has stopped")


def build_app(args: dict[str, Any] | None = None) -> Application:
    config = AppConfig.from_args(args)
    if config.engine.backend == "vllm":
        return build_vllm_app(config)
    # The model replicas are light: the host actors they start hold the models and the CPU/GPU resources.
    light = {"num_cpus": 0.05}
    target = serve.deployment(name="MoETarget", ray_actor_options=light)(TargetServer).bind(config)
    drafter = None
    if config.model.draft is not None:
        drafter = serve.deployment(name="Drafter", ray_actor_options=light)(DrafterServer).bind(config)
    ongoing = config.engine.max_batch_size + config.engine.max_waiting + 16  # 429s come from the router
    router = serve.deployment(
        name="Router",
        max_ongoing_requests=ongoing,
        ray_actor_options={"num_cpus": config.resources.router_num_cpus},
    )(RouterServer)
    return router.bind(config, target, drafter)


def build_vllm_app(config: AppConfig) -> Application:
    """One deployment; each replica runs one vLLM engine (draft and target inside it) behind our Router."""
    from cluster.vllm_backend.server import VllmServer  # imports no vLLM until a replica starts its engine

    resources = config.resources
    num_gpus = resources.target_num_gpus * config.expert_parallel.num_ranks
    deployment = serve.deployment(
        name="VllmServer",
        num_replicas=config.vllm.num_replicas,
        max_ongoing_requests=config.engine.max_batch_size + config.engine.max_waiting + 16,
        ray_actor_options={"num_cpus": resources.target_num_cpus, "num_gpus": num_gpus},
        health_check_period_s=10,
        health_check_timeout_s=60,
    )(VllmServer)
    return deployment.bind(config)
