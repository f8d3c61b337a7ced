"""The README's serve command end to end: `python -m cluster.cli serve` starts its own Ray, serves the demo
config over HTTP behind either ingress (Serve's proxy actor, or HAProxy straight to the Router), streamed and
not, and SIGTERM (`kill`, `docker stop`) shuts it down cleanly instead of aborting in Ray's handler."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from cluster.config import REPO_ROOT
from tests.cluster.serving_app import free_port


@pytest.mark.parametrize("ingress", ["proxy", "haproxy"])
def test_serve_answers_a_completion_then_sigterm_shuts_it_down_cleanly(ingress: str) -> None:
    port = free_port()
    command = ["serve", "--port", str(port), "--num-cpus", "4", "--ingress", ingress]
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *command],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:  # progress until the ready banner (the command's own timeout: 600 s)
            lines.append(line)
            if "[moespec] ready" in line:
                break
        assert any("[moespec] ready" in line for line in lines), "".join(lines[-30:])
        body = json.dumps(
            {"model": "demo-moe", "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 (loopback)
            completion = json.loads(response.read())
        assert completion["usage"]["completion_tokens"] == 8
        # The same completion streamed token by token (the path the ingress relays chunk by chunk).
        streamed = json.loads(body) | {"stream": True, "stream_options": {"include_usage": True}}
        request = urllib.request.Request(
            request.full_url, json.dumps(streamed).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 (loopback)
            events = [json.loads(line[6:]) for line in response.read().decode().splitlines()
                      if line.startswith("data: {")]  # fmt: skip
        assert (
            "".join(e["choices"][0]["text"] for e in events if e["choices"])
            == completion["choices"][0]["text"]
        )
        assert events[-1]["usage"]["completion_tokens"] == 8

        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=120)
        lines.append(rest)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines)
    assert process.returncode == 0, output[-3000:]
    assert "[moespec] shutting down" in output
    assert "SIGTERM received" not in output  # Ray's abort handler did not run
    print(f"shut down in {time.monotonic() - start:.1f} s")


def test_the_haproxy_ingress_is_refused_on_an_existing_cluster_naming_the_settings() -> None:
    from cluster.cli import main

    with pytest.raises(SystemExit, match="RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1"):
        main(["serve", "--address", "auto", "--ingress", "haproxy"])


def test_the_haproxy_ingress_is_refused_on_a_ray_without_it_naming_the_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    from cluster.cli import INGRESS_ENV, main

    for name, value in INGRESS_ENV["haproxy"].items():
        monkeypatch.setenv(name, value)  # serve sets them; monkeypatch restores the environment afterwards
    monkeypatch.setattr(ray, "__version__", "2.50.0")
    with pytest.raises(SystemExit, match=r"needs Ray >= 2\.55 .*this Ray is 2\.50\.0"):
        main(["serve", "--ingress", "haproxy"])
