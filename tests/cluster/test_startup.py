"""Start-up behaviour without Ray: the router answers /health at once while its model replicas load, an app
that cannot fit the cluster fails at deployment naming the resource, and --help shows defaults."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from cluster.app import RouterServer, check_fits, resource_demand
from cluster.cli import main
from cluster.config import AppConfig
from cluster.deployments import ModelHosts


class _NeverReady:
    """A model host that never finishes loading (`actor_handle` awaits forever)."""

    async def actor_handle(self) -> Any:
        await asyncio.Event().wait()

    def check(self) -> None:
        pass


class _Failing(_NeverReady):
    async def actor_handle(self) -> Any:
        raise RuntimeError("replica died while loading")


def _hosts(target: Any) -> ModelHosts:
    return ModelHosts(target, None)


def _request(path: str) -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    return Request(scope, receive)


def test_health_answers_503_at_once_while_the_replicas_load_then_with_the_failure() -> None:
    async def scenario() -> None:
        server = RouterServer(AppConfig(), _hosts(_NeverReady()))
        for _ in range(3):
            start = time.monotonic()
            response = await server(_request("/health"))
            assert time.monotonic() - start < 0.5
            assert response.status_code == 503
            assert b'"code":503' in response.body and b"still starting" in response.body
        failing = RouterServer(AppConfig(), _hosts(_Failing()))
        await failing(_request("/health"))  # starts the build, which fails
        await asyncio.sleep(0.05)
        response = await failing(_request("/health"))
        assert response.status_code == 503 and b"replica died while loading" in response.body

    asyncio.run(scenario())


def test_an_app_larger_than_the_cluster_fails_naming_the_resource() -> None:
    config = AppConfig.from_args({"resources": {"router_num_cpus": 0.5, "target_num_cpus": 1.0}})
    demand = resource_demand(config)
    check_fits(demand, {"CPU": 4.0})
    with pytest.raises(
        ValueError, match=r"needs 2\.1 CPU \(Router 0\.5, MoETarget host 1, Drafter host 0\.5, SpecPolicy"
    ):
        check_fits(demand, {"CPU": 2.0})
    gpu = AppConfig.from_args({"resources": {"target_num_gpus": 1.0}})
    with pytest.raises(ValueError, match="needs 1 GPU .* has 0 GPU"):
        check_fits(resource_demand(gpu), {"CPU": 8.0})


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Wide enough that argparse does not break the default config's path (long in a temporary clone).
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 4)" in text and "(default: 600.0)" in text and "demo-cpu.yaml)" in text


def test_the_loop_beside_its_target_serves_from_the_routers_process(tmp_path: Path) -> None:
    """engine.loop beside_target: no TargetHost; the Router replica loads the target itself and serves
    (greedy text equal to the engine's own), and its slots are free afterwards."""
    from cluster.engine_builder import build_engine, local_backends
    from policy.baselines import OffChooser
    from tests.cluster.serving_app import app_args, make_models
    from workers.sampling import SamplingParams
    from workers.tokenizer import Tokenizer

    target, draft = make_models(tmp_path)
    args = app_args(target, draft, engine={"loop": "beside_target"}, policy={"use_central_actor": False})
    args["model"]["draft"] = None
    config = AppConfig.from_args(args)
    with pytest.raises(ValueError, match="expert_parallel.num_ranks 1"):
        AppConfig.from_args({**args, "expert_parallel": {"num_ranks": 2}})
    assert set(resource_demand(config)) == {"Router"}  # the target's CPUs are the Router's
    assert resource_demand(config)["Router"]["CPU"] == 1.25
    server = RouterServer(config, ModelHosts(None, None))
    body = {"prompt": "def f(x):", "max_tokens": 12, "temperature": 0, "ignore_eos": True}

    async def scenario() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=_asgi(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert await server.num_used_slots() == (0, 0)
            return dict(response.json())

    done = asyncio.run(scenario())
    assert server.router is not None
    server.router.loop.stop()
    tokenizer = Tokenizer(target)
    local, _ = local_backends(config)
    engine = build_engine(config, local, None, OffChooser(), tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    (expected,) = engine.generate([tokenizer.encode("def f(x):")], params)
    assert done["choices"][0]["text"] == tokenizer.decode(expected)


def _asgi(server: RouterServer) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        response = await server(Request(scope, receive))
        await response(scope, receive, send)

    return app
