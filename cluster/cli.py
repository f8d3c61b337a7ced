"""Command line: run the Serve application on a local Ray instance (or an existing cluster).

    python -m cluster.cli serve [--config cluster/configs/demo-cpu.yaml] [--port 8000] [--address auto]

Starts Ray if needed, deploys the app from the Serve config, waits until /health answers 200 (printing
progress), prints where to send requests, and serves until interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from packaging.version import Version

from cluster.config import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "cluster" / "configs" / "demo-cpu.yaml"
# Serve's HTTP ingress, chosen by the environment of the Ray processes (set before Ray starts). proxy: Serve's
# Python proxy actor relays every request and every streamed chunk to a Router replica through Ray. haproxy:
# HAProxy forwards HTTP straight to each Router replica's own HTTP server (direct ingress), with Serve's
# throughput-optimized settings; a feature flag of Ray Serve >= 2.55 on Linux (ray[serve] installs HAProxy).
INGRESS_ENV: dict[str, dict[str, str]] = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}

HAPROXY_MIN_RAY = "2.55"


def load_serve_config(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path} is not a Serve config with an `applications` list")
    return config


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our own loopback URL)
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = str(error)
        print(f"  waiting for {url} ... {last[:60]}", flush=True)
        time.sleep(2)
    raise TimeoutError(f"{url} did not become healthy within {timeout_s:.0f} s ({last})")


def serve_command(args: argparse.Namespace) -> int:
    if args.address and INGRESS_ENV[args.ingress]:
        raise SystemExit(
            f"--ingress {args.ingress} sets the environment of a Ray instance this command starts; on an "
            f"existing cluster set {' '.join(f'{k}={v}' for k, v in INGRESS_ENV[args.ingress].items())} "
            "where its nodes start (ray start, or the RayService's container env)"
        )
    os.environ.update(INGRESS_ENV[args.ingress])  # before Ray is imported: Serve reads it at import
    import ray
    from ray import serve

    if INGRESS_ENV[args.ingress] and Version(ray.__version__) < Version(HAPROXY_MIN_RAY):
        raise SystemExit(
            f"--ingress {args.ingress} needs Ray >= {HAPROXY_MIN_RAY} (Serve's HAProxy ingress); this Ray is "
            f"{ray.__version__}: use --ingress proxy or upgrade ray[serve]"
        )

    from cluster.app import build_app

    config = load_serve_config(Path(args.config))
    http = dict(config.get("http_options") or {})
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or int(http.get("port", 8000))
    app_config = config["applications"][0]
    print(f"[moespec] starting Ray ({'address ' + args.address if args.address else 'local'})", flush=True)
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(
            num_cpus=args.num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
        )
    _stop_on_sigterm()  # after ray.init, whose handler would abort the process on SIGTERM
    try:
        serve.start(http_options={"host": host, "port": port})
        print("[moespec] deploying the Router (each replica loads its drafter and target)", flush=True)
        serve.run(
            build_app(app_config.get("args")),
            name=app_config.get("name", "moespec"),
            route_prefix=app_config.get("route_prefix", "/"),
            blocking=False,
        )
        base = f"http://{host}:{port}"
        wait_healthy(f"{base}/health", args.timeout)
        _print_ready(base, app_config.get("args", {}).get("model", {}).get("served_name", "demo-moe"))
        while not args.exit_after_ready:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[moespec] shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _print_ready(base: str, model: str) -> None:
    example = {"model": model, "prompt": "def fibonacci(n):", "max_tokens": 48, "temperature": 0}
    print(f"\n[moespec] ready: OpenAI-compatible API at {base}/v1  (metrics: {base}/metrics)")
    print(f"  curl {base}/v1/completions -H 'Content-Type: application/json' -d '{json.dumps(example)}'")
    print(
        f"  python -c \"import openai; c = openai.OpenAI(base_url='{base}/v1', api_key='none'); "
        f"print(c.completions.create(model='{model}', prompt='def add(a, b):', max_tokens=32)"
        f'.choices[0].text)"',
        flush=True,
    )


def _stop_on_sigterm() -> None:
    """SIGTERM (`kill`, `docker stop`, systemd, a background job that ignores Ctrl-C) shuts the app down as
    Ctrl-C does; Ray's handler in the driver would print a stack and abort (exit status 134)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.cli", description=__doc__, formatter_class=_HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser(
        "serve", help="serve the application over HTTP", formatter_class=_HelpFormatter
    )
    serve_parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config YAML")
    serve_parser.add_argument(
        "--host", default=None, help="HTTP host (None: the config's http_options.host, else 127.0.0.1)"
    )
    serve_parser.add_argument(
        "--port", type=int, default=None, help="HTTP port (None: the config's http_options.port, else 8000)"
    )
    serve_parser.add_argument("--address", default=None, help="an existing Ray cluster (e.g. auto)")
    serve_parser.add_argument(
        "--num-cpus",
        type=int,
        default=4,
        help="logical CPUs of a local Ray instance (more than cores is fine)",
    )
    serve_parser.add_argument(
        "--ingress",
        choices=sorted(INGRESS_ENV),
        default="proxy",
        help="Serve's HTTP ingress: its Python proxy actor, or HAProxy straight to the Router replicas "
        "(a Ray Serve feature flag; see the README)",
    )
    serve_parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for health")
    serve_parser.add_argument(
        "--exit-after-ready", action="store_true", help="stop once healthy (a smoke run)"
    )
    args = parser.parse_args(argv)
    return serve_command(args)


if __name__ == "__main__":
    sys.exit(main())
