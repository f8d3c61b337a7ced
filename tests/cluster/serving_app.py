"""A served app on the session's Ray instance: tiny random checkpoints with a character tokenizer, built
from the CPU demo Serve config's args (only the model paths and sizes changed)."""

from __future__ import annotations

import concurrent.futures
import json
import random
import socket
import string
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from cluster.cli import DEFAULT_CONFIG, load_serve_config
from tests.workers.checkpoints import make_checkpoint

CHARS = ["<s>", "</s>", *string.printable[:95], "\n"]  # BOS, EOS, printable characters, space, newline
VOCAB_SIZE = 100
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_models(root: Path, max_position_embeddings: int = 512) -> tuple[Path, Path]:
    target = make_checkpoint(
        root / "target",
        "MixtralForCausalLM",
        num_local_experts=4,
        eos_token_id=1,
        vocab_size=VOCAB_SIZE,
        bos_token_id=0,
        max_position_embeddings=max_position_embeddings,
    )
    draft = make_checkpoint(
        root / "draft",
        "LlamaForCausalLM",
        num_hidden_layers=1,
        eos_token_id=1,
        vocab_size=VOCAB_SIZE,
        bos_token_id=0,
        max_position_embeddings=max_position_embeddings,
    )
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.decoder = decoders.Fuse()
    for path in (target, draft):
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
        )
    return target, draft


def app_args(target: Path, draft: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = json.loads(
        json.dumps(load_serve_config(DEFAULT_CONFIG)["applications"][0]["args"])
    )
    args["model"].update(target=str(target), draft=str(draft), max_seqs=16, max_seq_len=256)
    args["engine"].update(max_waiting=8, max_spec_tokens=4)
    for name, values in sections.items():
        args.setdefault(name, {}).update(values)
    return args


RAY_WORKER_PORTS_END = 19999  # Ray's default `--max-worker-port`; its workers listen at or below it


def free_port() -> int:
    """A free loopback port that nothing else started by the test will take before the server binds it.

    A port the kernel hands out for `bind(0)` lies in its ephemeral range, which every outgoing connection
    also draws from: a Ray start opens hundreds (gRPC between its processes), and one took such a port
    between this function and Serve's proxy binding it (CI: "Failed to bind to address"). So the port is
    drawn between Ray's worker ports and the start of the ephemeral range instead.
    """
    low = _ephemeral_ports_start()
    if low <= RAY_WORKER_PORTS_END + 1:  # no gap on this machine: take the kernel's choice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(RAY_WORKER_PORTS_END + 1, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {RAY_WORKER_PORTS_END + 1}-{low - 1}")


def _ephemeral_ports_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's setting; 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@contextmanager
def running_app(base: str, args: dict[str, Any], name: str, timeout_s: float = 180) -> Iterator[str]:
    """Serve `build_app(args)` at `base` until the block ends; waits until /health answers 200."""
    from ray import serve

    from cluster.app import build_app

    try:
        serve.run(build_app(args), name=name, route_prefix="/")
        deadline = time.monotonic() + timeout_s
        while not _is_healthy(base):
            assert time.monotonic() < deadline, "the app never became healthy"
            time.sleep(0.5)
        yield base
    finally:  # also when it never became healthy: the next module needs the route prefix
        serve.delete(name)


def _is_healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=30).status_code == 200
    except httpx.HTTPError:  # a busy machine: the replica may take a while to answer
        return False


def host_actors(app: str, class_name: str) -> dict[str, Any]:
    """The live model host actors (`TargetHost`, `DrafterHost`) of an app's Router replicas, by replica."""
    import ray

    from cluster.deployments import HOST_NAMESPACE

    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        replica, _, rest = entry["name"].partition(f":{class_name}:")
        if entry["namespace"] != HOST_NAMESPACE or not rest or not replica.startswith(f"{app}#"):
            continue
        try:
            found[replica] = ray.get_actor(entry["name"], namespace=HOST_NAMESPACE)
        except ValueError:  # died since it was listed
            continue
    return found


def used_slots(app: str) -> dict[str, tuple[int, int]]:
    """KV slots in use (target, drafter) on each live Router replica of an app, by replica, whichever process
    holds the target (`RouterServer.record_routing_stats`, called on each replica's actor)."""
    import ray
    from ray.exceptions import RayActorError

    prefix = f"SERVE_REPLICA::{app}#Router#"  # Serve's replica actor names, in its namespace "serve"
    found: dict[str, tuple[int, int]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] != "serve" or not entry["name"].startswith(prefix):
            continue
        try:
            replica = ray.get_actor(entry["name"], namespace="serve")
            stats: Any = ray.get(replica.record_routing_stats.remote(), timeout=60)
        except (ValueError, RayActorError):  # died since it was listed
            continue
        target, drafter = stats["num_used_slots"]
        found[entry["name"].removeprefix("SERVE_REPLICA::")] = (int(target), int(drafter))
    return found


def metric_value(metrics: str, name: str) -> float:
    """The first sample of `moespec:<name>` in Prometheus text."""
    lines = [line for line in metrics.splitlines() if line.startswith(f"moespec:{name}{{")]
    assert lines, f"no {name} in /metrics"
    return float(lines[0].rsplit(" ", 1)[1])


def burst(server: str, num_requests: int, max_tokens: int = 32) -> list[int]:
    """`num_requests` concurrent sampled completions; each gets 200 with `max_tokens` tokens, or 429."""
    body = {"prompt": "burst", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8}

    def post(i: int) -> int:
        response = httpx.post(f"{server}/v1/completions", json={**body, "seed": i}, timeout=300)
        assert response.status_code in (200, 429), response.text
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] == max_tokens
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(num_requests) as pool:
        return list(pool.map(post, range(num_requests)))
