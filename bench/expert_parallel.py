"""Expert parallelism: iteration time of EP = 2 against EP = 1, split into compute and communication.

Decode (1 token per sequence) and verification at K = 4 (K + 1 tokens per sequence) across batch sizes, for
both exchange strategies, on Ray EP groups with one torch thread per rank (a rank stands for a device); plus
weight memory per rank. Systems are measured interleaved over repeats; medians are reported.
Usage: .venv/bin/python -m bench.expert_parallel [--batch-sizes 1,4,16,32] [--repeats 3] [--small]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from bench.common import (
    RESULTS_DIR,
    MoEShape,
    format_table,
    log,
    machine_info,
    make_moe_checkpoint,
    median,
    write_json,
)
from cluster.ep_group import EPGroup, EPGroupConfig
from workers.expert_parallel import STRATEGIES, Strategy
from workers.kv_cache import CacheConfig

SMALL = MoEShape(vocab_size=4096, hidden_size=256, num_heads=8, num_kv_heads=2, expert_intermediate_size=512)


@dataclass(frozen=True)
class System:
    name: str
    group: EPGroup
    strategy: Strategy | None  # None for EP = 1 (no exchange)


@dataclass
class Sample:
    wall_s: float  # coordinator: the Ray round trip included
    total_s: float  # rank 0's forward
    comm_s: float  # rank 0's time inside collectives (waiting for the other rank included)


def measure(system: System, batch_size: int, num_new: int, iters: int, seed: int) -> list[Sample]:
    """`iters` forwards of `num_new` tokens per sequence; each is rolled back so lengths stay constant."""
    group, seq_ids = system.group, list(range(batch_size))
    if system.strategy is not None:
        group.set_strategy(system.strategy)
    gen = torch.Generator().manual_seed(seed)
    vocab = group.config.vocab_size
    samples = []
    for _ in range(iters):
        feeds = torch.randint(0, vocab, (batch_size, num_new), generator=gen).tolist()
        start = time.perf_counter()
        _, timings = group.forward_timed(seq_ids, feeds)
        wall = time.perf_counter() - start
        samples.append(Sample(wall, timings[0].total_s, timings[0].comm_s))
        for seq_id in seq_ids:
            group.rollback(seq_id, num_new)  # queued: shipped with the next forward, no extra round trip
    return samples


def prefill(groups: list[EPGroup], batch_size: int, context: int) -> None:
    prompts = torch.randint(0, groups[0].config.vocab_size, (batch_size, context)).tolist()
    for group in groups:
        for seq_id in range(batch_size):
            group.add_sequence(seq_id)
        group.forward(list(range(batch_size)), prompts, logits_for="last")


def release(groups: list[EPGroup], batch_size: int) -> None:
    for group in groups:
        for seq_id in range(batch_size):
            group.free(seq_id)


def cell(samples: list[Sample]) -> str:
    total, comm = median([s.total_s for s in samples]), median([s.comm_s for s in samples])
    return f"{total * 1e3:.1f} ({(total - comm) * 1e3:.1f}+{comm * 1e3:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--num-spec-tokens", type=int, default=4)
    parser.add_argument("--context", type=int, default=32, help="tokens cached per sequence before timing")
    parser.add_argument("--iters", type=int, default=5, help="forwards per system per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a 4x smaller model for a quick run")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    shape = SMALL if args.small else MoEShape()
    path = make_moe_checkpoint(shape)

    ray.init(num_cpus=4, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    cache = CacheConfig(max_seqs=max(batch_sizes), max_seq_len=args.context + args.num_spec_tokens + 1)
    log(f"starting EP = 1 and EP = 2 groups on {path.name}")
    ep1 = EPGroup(EPGroupConfig(str(path), 1, cache, num_cpus_per_rank=1.0))
    ep2 = EPGroup(EPGroupConfig(str(path), 2, cache, num_cpus_per_rank=1.0))
    systems = [System("EP=1", ep1, None)] + [System(f"EP=2 {s}", ep2, s) for s in STRATEGIES]
    rows, raw = [], []
    try:
        for batch_size in batch_sizes:
            prefill([ep1, ep2], batch_size, args.context)
            for mode, num_new in (
                ("decode", 1),
                (f"verify K={args.num_spec_tokens}", args.num_spec_tokens + 1),
            ):
                log(f"{mode} at batch size {batch_size}")
                samples: dict[str, list[Sample]] = {s.name: [] for s in systems}
                for repeat in range(args.repeats):
                    for system in systems:  # interleaved, so drift in machine load hits every system alike
                        samples[system.name] += measure(system, batch_size, num_new, args.iters, seed=repeat)
                base = median([s.total_s for s in samples["EP=1"]])
                ratios = [median([s.total_s for s in samples[x.name]]) / base for x in systems[1:]]
                walls = [median([s.wall_s for s in samples[x.name]]) * 1e3 for x in systems]
                rows.append(
                    [mode, str(batch_size), str(batch_size * num_new)]
                    + [cell(samples[s.name]) for s in systems]
                    + [f"{r:.2f}" for r in ratios]
                    + ["/".join(f"{w:.0f}" for w in walls)]
                )
                raw.append({"mode": mode, "batch_size": batch_size, "samples": samples})
            release([ep1, ep2], batch_size)
        memory: list[dict[str, Any]] = [
            {"group": name, "rank": rank, "total": w.total, "experts": w.experts}
            for name, group in (("EP=1", ep1), ("EP=2", ep2))
            for rank, w in enumerate(group.weight_bytes())
        ]
    finally:
        ep1.shutdown()
        ep2.shutdown()
        ray.shutdown()

    headers = ["mode", "B", "tokens"] + [s.name for s in systems]
    headers += [f"{s.name.removeprefix('EP=2 ')}/EP1" for s in systems[1:]] + ["wall ms"]
    print(
        f"\nmodel {path.name}; one torch thread per rank; times in ms, median: total (compute+comm) of rank 0"
    )
    print(format_table(headers, rows))
    print("\nweight memory per rank (MB)")
    mem_rows = [
        [str(m["group"]), str(m["rank"]), f"{m['total'] / 2**20:.1f}", f"{m['experts'] / 2**20:.1f}"]
        for m in memory
    ]
    print(format_table(["group", "rank", "total", "experts"], mem_rows))
    write_json(
        RESULTS_DIR / "expert_parallel.json",
        {
            "machine": machine_info(),
            "model": shape,
            "args": vars(args),
            "rows": rows,
            "raw": raw,
            "memory": memory,
        },
    )


if __name__ == "__main__":
    main()
