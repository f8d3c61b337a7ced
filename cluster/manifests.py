"""Keeps the Serve configs embedded in the KubeRay manifests identical to those in cluster/configs.

    python -m cluster.manifests           rewrite the generated parts of k8s/
    python -m cluster.manifests --check   exit 1 naming the files that are out of date

KubeRay takes a Serve config as a string (`spec.serveConfigV2`); the files in cluster/configs stay the
source. The one change made for Kubernetes: HTTP proxies on every Pod, listening on every interface, since
KubeRay's Serve Service sends traffic to the Pods' addresses. (cluster/configs/gpu.yaml already does both.)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from cluster.config import REPO_ROOT

GPU_SERVE_CONFIG = REPO_ROOT / "cluster" / "configs" / "gpu.yaml"
DEMO_SERVE_CONFIG = REPO_ROOT / "cluster" / "configs" / "demo-cpu.yaml"
RAYSERVICE = REPO_ROOT / "k8s" / "base" / "rayservice.yaml"
DEMO_PATCH = REPO_ROOT / "k8s" / "overlays" / "cpu-demo" / "serve-config.yaml"

_FIELD = "  serveConfigV2: |"  # the block scalar in RayService manifests, under `spec:`
_FIELD_INDENT = " " * 4


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    return data


def for_kubernetes(serve_config: dict[str, Any]) -> dict[str, Any]:
    """The Serve config as KubeRay runs it: a proxy on every Pod, reachable from outside the Pod."""
    config = copy.deepcopy(serve_config)
    config["proxy_location"] = "EveryNode"
    config["http_options"] = {**(config.get("http_options") or {}), "host": "0.0.0.0"}
    return config


def dump(serve_config: dict[str, Any]) -> str:
    return yaml.safe_dump(serve_config, sort_keys=False, default_flow_style=False, width=100)


def _block(text: str, indent: str) -> list[str]:
    return [indent + line if line else line for line in text.splitlines()]


def embed_serve_config(manifest: str, serve_text: str) -> str:
    """Replaces the `serveConfigV2: |` block of a RayService manifest's text, keeping everything else."""
    lines = manifest.splitlines()
    if _FIELD not in lines:
        raise ValueError(f"no line {_FIELD!r} in the RayService manifest")
    start = lines.index(_FIELD) + 1
    end = start
    while end < len(lines) and (lines[end].startswith(_FIELD_INDENT) or not lines[end].strip()):
        end += 1
    return "\n".join([*lines[:start], *_block(serve_text, _FIELD_INDENT), *lines[end:]]) + "\n"


def demo_patch(serve_text: str) -> str:
    """A JSON 6902 patch (kustomize) that sets the RayService's Serve config."""
    header = (
        f"# Generated from {DEMO_SERVE_CONFIG.relative_to(REPO_ROOT)} by `python -m cluster.manifests`: "
        "edit that file, not this one.\n"
    )
    op = "- op: replace\n  path: /spec/serveConfigV2\n  value: |\n"
    return header + op + "\n".join(_block(serve_text, _FIELD_INDENT)) + "\n"


def rendered() -> dict[Path, str]:
    """The expected text of every generated file."""
    gpu = dump(for_kubernetes(load_yaml(GPU_SERVE_CONFIG)))
    demo = dump(for_kubernetes(load_yaml(DEMO_SERVE_CONFIG)))
    return {
        RAYSERVICE: embed_serve_config(RAYSERVICE.read_text(), gpu),
        DEMO_PATCH: demo_patch(demo),
    }


def stale_files() -> list[Path]:
    return [path for path, text in rendered().items() if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.manifests", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report out-of-date files")
    args = parser.parse_args(argv)
    stale = stale_files()
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(REPO_ROOT)} (run python -m cluster.manifests)")
        return 1 if stale else 0
    for path, text in rendered().items():
        if path in stale:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
