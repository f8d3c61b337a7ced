"""A whole MoE model's verification step on a GPU: time(B, K) over a plain step's, beside the simulator's truth.

    python -m bench.gpu_step [--models mixtral-8x7b,qwen2-57b-a14b] [--context 512] [--device cuda]
    python -m bench.gpu_step --models tiny --device cpu --batch-sizes 1,2 --max-spec-tokens 1   # a check

What: transformers' causal LM built from the published config (all layers, random bf16 weights, SDPA
attention, `grouped_mm` experts) and a KV cache of `--context` tokens for each of B sequences; each point
times one forward of B * (K + 1) tokens over that cache (the cache cropped back after each), the median of
`--repeats` after warm-up. Where `bench.gpu_calibrate` times the MoE layers alone, this has attention, the
KV reads, the embeddings and the LM head: what a served verification step costs the target, less the
engine's own overhead. Beside each point: `policy.truth.ServerTruth`'s target forward for the same model on
one `H200` with `VLLM_ENGINE` (the simulator's truth), and with `--draft` the draft model's one-token step at
B (MoESD's draft for Qwen2, Qwen2-0.5B), the draft-to-target cost ratio the policy's payoff rests on.
Writes bench/results/gpu_step.json (or --out). Needs torch and transformers only. `bench.gpu_fit` fits
the policy's GPU figures to a `--graphs` result.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.gpu_calibrate import time_forward
from policy.presets import H200, MIXTRAL_8X7B, QWEN2_0_5B, QWEN2_57B_A14B, VLLM_ENGINE
from policy.truth import ModelSpec, ServerTruth

if TYPE_CHECKING:
    pass

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_step.json"

# The published config.json values that set the cost (hidden, layers, heads, experts, vocabulary).
CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": dict(
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32000,
    ),
    "qwen2-57b-a14b": dict(
        model_type="qwen2_moe", hidden_size=3584, intermediate_size=18944, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, vocab_size=151936,
        norm_topk_prob=False, decoder_sparse_step=1,
    ),
    "qwen2-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "tiny": dict(
        model_type="qwen2_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, vocab_size=128, decoder_sparse_step=1,
    ),
}  # fmt: skip
# The simulator's spec of each (`policy.presets`); tiny's is derived from its config.
SPECS: dict[str, ModelSpec] = {
    "mixtral-8x7b": MIXTRAL_8X7B,
    "qwen2-57b-a14b": QWEN2_57B_A14B,
    "qwen2-0.5b": QWEN2_0_5B,
}


def build(name: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(CONFIGS[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config._attn_implementation = "sdpa"
    if "num_experts" in values or "num_local_experts" in values:  # dense models take no setting
        config._experts_implementation = "grouped_mm" if device.startswith("cuda") else "eager"
    with torch.device(device):  # built where it runs: up to 57 B parameters
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def spec_of(name: str, model: Any) -> ModelSpec:
    if name in SPECS:
        return SPECS[name]
    c = model.config
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    total = sum(p.numel() for p in model.parameters())
    dense = total - c.num_hidden_layers * c.num_experts * expert
    return ModelSpec(name, float(dense), c.num_hidden_layers, float(expert), c.num_experts,
                     c.num_experts_per_tok, hidden_size=c.hidden_size)  # fmt: skip


def verify(model: Any, cache: Any, tokens: torch.Tensor) -> torch.Tensor:
    """One verification forward of `tokens` over the cache, which is then cropped back to what it held (so
    that repeats measure the same step); its logits at every position."""
    logits = model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=0).logits
    cache.crop(-tokens.shape[1])
    return logits


class StaticStep(NamedTuple):
    run: Callable[[], torch.Tensor]  # the step: its logits [B, K + 1, vocab]
    prompt_ids: torch.Tensor  # [B, context]: in the cache
    token_ids: torch.Tensor  # [B, K + 1]: the tokens it verifies


def static_step(model: Any, batch: int, num_spec_tokens: int, context: int, device: str) -> StaticStep:
    """A verification step of B sequences at K drafts over a static KV cache of `context` random tokens, its
    causal mask built ahead: the same step at every run (the cache's write position is set back in place),
    with nothing in it that waits on the GPU, so that a CUDA graph can capture it (`captured`)."""
    from transformers import StaticCache

    vocab, width = model.config.vocab_size, num_spec_tokens + 1
    cache = StaticCache(config=model.config, max_cache_len=context + width)
    prompt = torch.randint(vocab, (batch, context)).to(device)  # drawn on the CPU: see `captured`
    model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tokens = torch.randint(vocab, (batch, width)).to(device)
    positions = torch.arange(context, context + width, device=device)[None].expand(batch, -1)
    kv_index = torch.arange(context + width, device=device)
    allowed = (kv_index[None, :] <= positions[0][:, None])[None, None].expand(batch, 1, -1, -1)
    # A 4D mask is taken as given (transformers' mask functions return it untouched): built here, where
    # building it in the forward would wait on the GPU, which capture does not allow.

    def step() -> torch.Tensor:
        logits = model(input_ids=tokens, past_key_values=cache, position_ids=positions, attention_mask=allowed,
                       use_cache=True, logits_to_keep=0).logits  # fmt: skip
        for layer in cache.layers:
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(context)
            elif isinstance(length, int):
                setattr(layer, "cumulative_length", context)  # noqa: B010 (a cache layer of another kind)
        return logits

    return StaticStep(step, prompt, tokens)


def captured(step: Any) -> Any:
    """`step` captured in a CUDA graph (how vLLM serves decode steps: no launch cost per kernel); the graph's
    replay, or None where capture failed (a failed capture leaves the CUDA generator unusable: the steps draw
    their random tokens on the CPU)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            step()
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as error:
        print(f"CUDA graph capture failed: {str(error)[:300]}", flush=True)
        return None
    return graph.replay


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure_model(name: str, args: argparse.Namespace, truth_of: Any) -> list[dict[str, Any]]:
    """Every (B, K) point of one target."""
    from transformers import DynamicCache

    model = build(name, args.device, getattr(torch, args.dtype))
    vocab = model.config.vocab_size
    experts = getattr(model.config, "_experts_implementation", None)
    attention = getattr(model.config, "_attn_implementation", None)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, experts {experts}, "
          f"attention {attention}", flush=True)  # fmt: skip
    points = []
    with torch.inference_mode():
        for batch in args.batch_sizes:
            cache = DynamicCache(config=model.config)
            prompt = torch.randint(vocab, (batch, args.context)).to(args.device)  # on the CPU: see `captured`
            model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for k in range(args.max_spec_tokens + 1):
                tokens = torch.randint(vocab, (batch, k + 1)).to(args.device)
                step = functools.partial(verify, model, cache)
                seconds = time_forward(step, tokens, args.repeats, args.warmup)
                if cache.get_seq_length() != args.context:
                    raise RuntimeError(f"the cache holds {cache.get_seq_length()} tokens, not {args.context}")
                truth_s = truth_of(batch * (k + 1), [args.context] * batch)
                graph_s = None
                if args.graphs:
                    replay = captured(static_step(model, batch, k, args.context, args.device).run)
                    if replay is None:
                        raise SystemExit(
                            f"{name}: --graphs asked for CUDA graphs, and capture failed (above)"
                        )
                    graph_s = time_forward(lambda _, f=replay: f(), tokens, args.repeats, args.warmup)
                    replay = None  # the graph's memory goes back
                    free_memory(args.device)
                points.append({"batch_size": batch, "num_spec_tokens": k, "num_tokens": batch * (k + 1),
                               "measured_s": seconds, "graph_s": graph_s, "truth_s": truth_s})  # fmt: skip
                graph_ms = "" if graph_s is None else f" graph {graph_s * 1e3:8.3f} ms"
                print(f"{name} B={batch:>3} K={k} measured {seconds * 1e3:8.3f} ms{graph_ms} truth "
                      f"{truth_s * 1e3:8.3f} ms", flush=True)  # fmt: skip
    return points


def report(name: str, points: list[dict[str, Any]]) -> None:
    """Per batch size, a verification step's time at K = 1.. over a plain one's, eager and replayed from a CUDA
    graph (where measured), beside the truth's; and each over the truth's at K = 0."""
    by_shape = {(p["batch_size"], p["num_spec_tokens"]): p for p in points}
    keys = ["measured_s", *(["graph_s"] if all(p.get("graph_s") for p in points) else []), "truth_s"]
    for batch in sorted({p["batch_size"] for p in points}):
        plain = by_shape[(batch, 0)]
        ks = sorted(k for b, k in by_shape if b == batch and k > 0)
        ratios = [" ".join(f"{by_shape[(batch, k)][key] / plain[key]:.2f}" for k in ks) for key in keys]
        levels = [f"{key[:-2]} {plain[key] / plain['truth_s']:.2f}" for key in keys[:-1]]
        print(f"{name} B={batch:>3} time(K={ks[0]}..{ks[-1]}) / time(K=0): "
              + " | ".join(f"{key[:-2]} {r}" for key, r in zip(keys, ratios, strict=True))
              + f"; over the truth at K=0: {', '.join(levels)}")  # fmt: skip


def measure_draft(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The draft model's one-token step at each batch size (its cache: `--context` tokens)."""
    steps = measure_model(name, argparse.Namespace(**{**vars(args), "max_spec_tokens": 0}), lambda t, c: 0.0)
    return [
        {"batch_size": p["batch_size"], "measured_s": p["measured_s"], "graph_s": p["graph_s"]} for p in steps
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="mixtral-8x7b,qwen2-57b-a14b")
    parser.add_argument(
        "--draft", default="qwen2-0.5b", help="a draft model to time beside them ('' for none)"
    )
    parser.add_argument("--batch-sizes", default="1,4,16,32,64")
    parser.add_argument("--max-spec-tokens", type=int, default=4)
    parser.add_argument("--context", type=int, default=512, help="tokens in each sequence's KV cache")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--graphs", action="store_true", help="also time each step replayed from a CUDA graph (a GPU)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.graphs and not args.device.startswith("cuda"):
        parser.error("--graphs needs a CUDA device")
    unknown = {m for m in [*args.models.split(","), args.draft] if m} - set(CONFIGS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results: dict[str, Any] = {"device": device_name, "torch": torch.__version__, "context": args.context,
                               "models": {}}  # fmt: skip

    def save() -> None:  # after each model: a timeout keeps what ran
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    if args.draft:
        results["draft"] = {"name": args.draft, "steps": measure_draft(args.draft, args)}
        free_memory(args.device)
        save()
    for name in args.models.split(","):
        spec = SPECS.get(name)
        if spec is None:  # tiny's: derived from the model, built once more here on the CPU
            spec = spec_of(name, build(name, "cpu", torch.float32))
        truth = ServerTruth(spec, QWEN2_0_5B, H200, 1, VLLM_ENGINE)
        points = measure_model(name, args, truth.target_forward)
        free_memory(args.device)
        results["models"][name] = {"spec": vars(spec), "points": points}
        report(name, points)
        if "draft" in results:
            steps = results["draft"]["steps"]
            key = "graph_s" if all(p["graph_s"] for p in [*points, *steps]) else "measured_s"
            plain = {p["batch_size"]: p[key] for p in points if p["num_spec_tokens"] == 0}
            ratios = " ".join(f"B={s['batch_size']} {s[key] / plain[s['batch_size']]:.3f}" for s in steps)
            print(f"{name}: {args.draft}'s step over a plain target step ({key[:-2]}): {ratios}")
        save()
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
