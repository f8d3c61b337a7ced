"""What crosses between processes each iteration: the per-call cost of a Ray Serve handle call against a
direct Ray actor call (side by side in one run), and the bytes of the native backend's messages.

    python -m bench.rpc            # call costs (starts a local Ray instance)
    python -m bench.rpc --bytes    # bytes per speculative iteration, one-hot against distribution proposals

Why it exists: the engine calls the drafter and the target every iteration; the call costs are why the hot
path uses direct actor handles (cluster/deployments.py), and the bytes why drafts travel as one-hot
proposals (token ids) by default (workers/drafter.py).
"""

from __future__ import annotations

import argparse
import pickle
import threading
import time
from typing import Any

DEMO_VOCAB = 4096  # models/demo-moe
GPU_VOCAB = 151_936  # cluster/configs/gpu.yaml's Qwen3 pair


def call_costs() -> dict[str, float]:
    """Milliseconds per call with a 100-element list, through a Serve handle and to an actor directly."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class A:
        def f(self, x: Any) -> Any:
            return x

    @serve.deployment
    class S:
        def f(self, x: Any) -> Any:
            return x

    serve.run(S.bind(), name="s", route_prefix=None)
    handle = serve.get_deployment_handle("S", app_name="s")
    actor = A.remote()  # type: ignore[attr-defined]
    ray.get(actor.f.remote(1))
    result: dict[str, float] = {}

    def bench() -> None:  # from a plain thread, as the engine loop calls
        for name, call in [
            ("serve", lambda: handle.f.remote([1] * 100).result()),
            ("actor", lambda: ray.get(actor.f.remote([1] * 100))),
        ]:
            for _ in range(20):
                call()
            start = time.perf_counter()
            for _ in range(200):
                call()
            result[name] = (time.perf_counter() - start) / 200 * 1e3

    thread = threading.Thread(target=bench)
    thread.start()
    thread.join()
    return result


def iteration_messages(
    batch_size: int, num_spec_tokens: int, vocab_size: int, proposals: str
) -> dict[str, Any]:
    """The four messages of one speculative iteration of the native backend in steady state, as the engine
    and the backends build them: every request sampled (temperature 0.8), drafting K tokens, one new history
    token each (the last committed one), no penalties. Token ids and probabilities are random; only their
    shapes matter for the size."""
    import torch

    from workers.drafter import DraftOutput, DraftRequest, Proposal
    from workers.sampling import SamplingParams
    from workers.target import VerifyOutput, VerifyRequest

    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.8, max_tokens=256)
    ids = torch.randint(vocab_size, (batch_size, num_spec_tokens + 1), generator=g).tolist()
    draft_requests = [DraftRequest(i, 100, [ids[i][0]], num_spec_tokens, params) for i in range(batch_size)]
    drafted = []
    for i in range(batch_size):
        probs = None
        if proposals == "distribution":  # [K, V] fp32, what probs_from_logits returns
            probs = torch.softmax(torch.randn(num_spec_tokens, vocab_size, generator=g), dim=-1)
        drafted.append(Proposal(ids[i][1:], probs))
    verify_requests = [
        VerifyRequest(i, ids[i][0], p.draft_ids, p.draft_probs, params) for i, p in enumerate(drafted)
    ]
    committed = [row[: 1 + num_spec_tokens // 2] for row in ids]
    return {
        "router -> drafter": draft_requests,
        "drafter -> router": DraftOutput(drafted, 0.0),
        "router -> target": verify_requests,
        "target -> router": VerifyOutput(committed, [4] * 4, 0.0, [[] for _ in ids]),
    }


def message_bytes(message: Any) -> int:
    """Serialized size as Ray moves it: pickle protocol 5 (tensors by their raw storage)."""
    return len(pickle.dumps(message, protocol=5))


def iteration_bytes(batch_size: int, num_spec_tokens: int, vocab_size: int, proposals: str) -> dict[str, int]:
    messages = iteration_messages(batch_size, num_spec_tokens, vocab_size, proposals)
    sizes = {name: message_bytes(m) for name, m in messages.items()}
    sizes["total"] = sum(sizes.values())
    return sizes


def bytes_table(batch_sizes: tuple[int, ...] = (8, 32), num_spec_tokens: int = 4) -> str:
    lines = [
        f"Bytes per speculative iteration between processes (K = {num_spec_tokens}, every request sampled):",
        "",
        "| vocabulary | batch | distribution proposals | one-hot proposals | ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    for vocab in (DEMO_VOCAB, GPU_VOCAB):
        for batch in batch_sizes:
            full = iteration_bytes(batch, num_spec_tokens, vocab, "distribution")["total"]
            one_hot = iteration_bytes(batch, num_spec_tokens, vocab, "one_hot")["total"]
            lines.append(f"| {vocab:,} | {batch} | {full:,} | {one_hot:,} | {full / one_hot:,.0f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bytes", action="store_true", help="message bytes per iteration (no Ray)")
    args = parser.parse_args()
    if args.bytes:
        print(bytes_table())
    else:
        print({name: f"{ms:.2f} ms" for name, ms in call_costs().items()})


if __name__ == "__main__":
    main()
