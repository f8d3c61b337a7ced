"""Start-up behaviour without Ray: the router answers /health at once while its model replicas load, an app
that cannot fit the cluster fails at deployment naming the resource, and --help shows defaults."""

from __future__ import annotations

import asyncio
import time
from typing import Any

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
