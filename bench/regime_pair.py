"""The benchmark pair in the product's regime: the demo target widened into a memory-bound MoE + the demo draft.

    python -m bench.regime_pair [--out models/demo-moe-wide] [--intermediate-size 6144] [--check-vllm]

The wide target computes the shipped demo target's function: every routed expert gets extra SwiGLU neurons
whose gate and up rows are copies of the expert's own rows (real, finite activations) and whose down-proj
columns are zero, so each expert's output is unchanged in exact arithmetic, the routers are untouched, and
acceptance with the shipped draft stays what it was. Its routed experts hold >= 90% of >= 300 MB of bf16
weights, which every forward reads from memory (see bench/demo-moe-wide.md, the model card). The built
directory is a standard Hugging Face Mixtral checkpoint; it is git-ignored and rebuilt when the source
checkpoint or this builder changes (`build.json` records what it was built from).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
DEMO_TARGET = REPO / "models" / "demo-moe"
DEMO_DRAFT = REPO / "models" / "demo-draft"
WIDE_TARGET = REPO / "models" / "demo-moe-wide"
MODEL_CARD = Path(__file__).resolve().parent / "demo-moe-wide.md"
BUILDER_VERSION = 1  # bump when the built weights change for the same source and spec
_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class WideSpec:
    """How wide to make each routed expert; the default gives 308 MB of bf16 weights, 98% in experts."""

    intermediate_size: int = 6144

    def check(self, source_intermediate_size: int) -> None:
        if self.intermediate_size < source_intermediate_size:
            raise ValueError(
                f"intermediate_size {self.intermediate_size} is below the source's "
                f"{source_intermediate_size}: widening only adds neurons"
            )


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of a Mixtral checkpoint's weights, computed from its config.json alone."""

    total: int
    routed_experts: int
    active_per_token: int  # what one decode token reads: everything but experts, plus top_k experts a layer

    @property
    def routed_share(self) -> float:
        return self.routed_experts / self.total


def weight_bytes(config: dict[str, object]) -> WeightBytes:
    """The weights' bytes of a MixtralForCausalLM `config` (a parsed config.json) in its own dtype."""
    c = {k: int(v) for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)}
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    num_layers, num_experts, top_k = c["num_hidden_layers"], c["num_local_experts"], c["num_experts_per_tok"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    attention = hidden * head_dim * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    per_layer_dense = attention + 2 * hidden + num_experts * hidden  # + two norms + the router
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    expert = 3 * hidden * inter
    dense = num_layers * per_layer_dense + embeddings + hidden  # + the final norm
    size = _DTYPE_BYTES[str(config.get("dtype") or config.get("torch_dtype") or "float32")]
    routed = num_layers * num_experts * expert
    # One decode token reads one embedding row (the whole table only when the LM head is tied to it).
    table = 0 if config.get("tie_word_embeddings") else vocab * hidden - hidden
    active = dense - table + num_layers * top_k * expert
    return WeightBytes(
        total=size * (dense + routed), routed_experts=size * routed, active_per_token=size * active
    )


def wide_config(source_config: dict[str, object], spec: WideSpec) -> dict[str, object]:
    if source_config.get("model_type") != "mixtral":
        raise ValueError(
            f"the source must be a Mixtral checkpoint, got model_type {source_config.get('model_type')!r}"
        )
    spec.check(int(str(source_config["intermediate_size"])))
    return {**source_config, "intermediate_size": spec.intermediate_size}


def widen(name: str, tensor: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """One tensor of the wide checkpoint: experts' w1/w3 [I0, H] -> [I, H] with rows repeated cyclically,
    w2 [H, I0] -> [H, I] with zero columns appended (the new neurons' outputs are multiplied by 0)."""
    if ".block_sparse_moe.experts." not in name:
        return tensor
    if name.endswith((".w1.weight", ".w3.weight")):  # [I0, H]
        rows = torch.arange(intermediate_size) % tensor.shape[0]
        return tensor[rows].contiguous()
    if name.endswith(".w2.weight"):  # [H, I0]
        extra = tensor.new_zeros(tensor.shape[0], intermediate_size - tensor.shape[1])
        return torch.cat([tensor, extra], dim=1).contiguous()
    raise ValueError(f"unexpected expert tensor {name!r}")


def _source_digest(source: Path) -> str:
    digest = hashlib.sha256()
    for file in ("config.json", "model.safetensors"):
        digest.update((source / file).read_bytes())
    return digest.hexdigest()


def _build_record(source: Path, spec: WideSpec) -> dict[str, object]:
    return {"source_sha256": _source_digest(source), "spec": asdict(spec), "builder_version": BUILDER_VERSION}


def build(out: Path, source: Path = DEMO_TARGET, spec: WideSpec = WideSpec()) -> Path:
    """Write the wide checkpoint of `source` to `out` (replacing what is there) and return `out`."""
    source_config = json.loads((source / "config.json").read_text())
    config = wide_config(source_config, spec)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    with safe_open(str(source / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensors[name] = widen(name, f.get_tensor(name), spec.intermediate_size)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in _COPIED_FILES:
        if (source / file).is_file():
            shutil.copyfile(source / file, out / file)
    (out / "README.md").write_text(model_card(source_config, config))
    (out / "build.json").write_text(json.dumps(_build_record(source, spec), indent=2) + "\n")
    return out


def ensure_built(out: Path = WIDE_TARGET, source: Path = DEMO_TARGET, spec: WideSpec = WideSpec()) -> Path:
    """The wide checkpoint at `out`, built first if it is missing or was built from another source or spec."""
    record = out / "build.json"
    is_built = record.is_file() and (out / "model.safetensors").is_file()
    if is_built and json.loads(record.read_text()) == _build_record(source, spec):
        return out
    start = time.perf_counter()
    build(out, source, spec)
    print(f"built {out} from {source} in {time.perf_counter() - start:.1f} s", flush=True)
    return out


def ensure_checkpoint(path: Path) -> Path:
    """`path`, built first when it is the wide target (any other checkpoint must exist already)."""
    if path.resolve() == WIDE_TARGET.resolve():
        return ensure_built()
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} is missing: train the demo pair first (python -m training.train)")
    return path


def regime_pair() -> tuple[Path, Path]:
    """(target, draft) of the benchmark pair, building the wide target on first use."""
    return ensure_built(), DEMO_DRAFT


def model_card(source_config: dict[str, object], config: dict[str, object]) -> str:
    """The card in the repository (bench/demo-moe-wide.md) plus the numbers of this build."""
    source, wide = weight_bytes(source_config), weight_bytes(config)
    lines = [
        "",
        "## This build",
        "",
        "| | shipped demo-moe | this checkpoint |",
        "|---|---:|---:|",
        f"| expert intermediate size | {source_config['intermediate_size']} | {config['intermediate_size']} |",
        f"| weights | {source.total / 1e6:.1f} MB | {wide.total / 1e6:.1f} MB |",
        f"| in routed experts | {100 * source.routed_share:.1f}% | {100 * wide.routed_share:.1f}% |",
        f"| read per decode token | {source.active_per_token / 1e6:.1f} MB | {wide.active_per_token / 1e6:.1f} MB |",
        "",
    ]
    return MODEL_CARD.read_text() + "\n".join(lines)


def check_vllm(python: Path, wide: Path, out: Path) -> bool:
    """vLLM loads the wide target as it is and its greedy completions equal the shipped target's (fp32)."""
    import subprocess

    results = {}
    for model in (DEMO_TARGET, wide):
        file = out.parent / "raw" / f"vllm_greedy_{model.name}.json"
        weights = model / "model.safetensors"
        if file.is_file() and file.stat().st_mtime > weights.stat().st_mtime:  # from this build: reuse
            results[model.name] = json.loads(file.read_text())
            continue
        command = [
            str(python),
            "-m",
            "bench.vllm_offline",
            "greedy",
            "--model",
            str(model),
            "--out",
            str(file),
        ]
        print(f"vLLM greedy on {model.name} (an engine start takes minutes)", flush=True)
        subprocess.run(command, check=True, cwd=REPO, env=_vllm_env())
        results[model.name] = json.loads(file.read_text())
    shipped, built = results[DEMO_TARGET.name], results[wide.name]
    same = [a == b for a, b in zip(shipped["token_ids"], built["token_ids"], strict=True)]
    summary = {
        "num_prompts": len(same),
        "num_same_greedy_tokens": sum(same),
        "dtype": built["dtype"],
        "completions": [
            {"prompt": p, "shipped": a, "wide": b}
            for p, a, b in zip(built["prompts"], shipped["texts"], built["texts"], strict=True)
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"vLLM: {sum(same)}/{len(same)} greedy completions equal the shipped target's; wrote {out}")
    return all(same)


def _vllm_env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WIDE_TARGET)
    parser.add_argument("--source", type=Path, default=DEMO_TARGET)
    parser.add_argument("--intermediate-size", type=int, default=WideSpec.intermediate_size)
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached build is current")
    parser.add_argument(
        "--check-vllm",
        action="store_true",
        help="then check that vLLM loads it and its greedy text equals the shipped target's",
    )
    parser.add_argument("--vllm-python", type=Path, help="vLLM's python (default: bench.peers creates one)")
    args = parser.parse_args()
    spec = WideSpec(args.intermediate_size)
    if args.force:
        build(args.out, args.source, spec)
    else:
        ensure_built(args.out, args.source, spec)
    sizes = weight_bytes(json.loads((args.out / "config.json").read_text()))
    print(
        f"{args.out}: {sizes.total / 1e6:.1f} MB of weights, {100 * sizes.routed_share:.1f}% in routed "
        f"experts, {sizes.active_per_token / 1e6:.1f} MB read per decode token"
    )
    if args.check_vllm:
        from bench.peers import ensure_vllm_venv

        python = args.vllm_python or ensure_vllm_venv(REPO / "bench" / "results" / "raw" / "vllm-venv")
        if not check_vllm(python, args.out, REPO / "bench" / "results" / "regime_pair_vllm.json"):
            raise SystemExit("vLLM's greedy text on the wide target differs from the shipped target's")


if __name__ == "__main__":
    main()
