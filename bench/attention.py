"""Attention reading the KV cache in place against gathering each sequence's keys, on the demo target.

    python -m bench.attention [--batch-sizes 8 32] [--context 64 160 400] [--repeats 5]

One verification forward (K = 2: three new tokens per sequence) of the shipped demo MoE over a full batch
whose sequences hold `context` tokens, timed with the layout's in-place path and with the gather path
(`workers.batch.MAX_ROWS_PER_SEQUENCE = 0`) alternating in one process. Prints median ms per forward and
the ratio gather / in-place (median over repeats of adjacent pairs, with the range).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import workers.batch
from cluster.config import DEMO_TARGET
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner


def time_forward(runner: ModelRunner, batch_size: int, num_steps: int, in_place: bool) -> float:
    """Median seconds of a [pending + 2 drafts] forward per sequence; rolls back after each step."""
    workers.batch.MAX_ROWS_PER_SEQUENCE = 2.0 if in_place else 0.0
    ids = list(range(batch_size))
    times = []
    for step in range(num_steps):
        feeds = [[(7 * s + step) % 4000 + 5, 11, 13] for s in ids]
        start = time.perf_counter()
        runner.forward(ids, feeds)
        times.append(time.perf_counter() - start)
        for s in ids:
            runner.rollback(s, 3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[64, 160, 400])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'batch':>5} {'context':>7} {'in-place ms':>11} {'gather ms':>9} {'gather/in-place':>15} (range)")
    for batch_size in args.batch_sizes:
        for context in args.context:
            cache = CacheConfig(max_seqs=batch_size, max_seq_len=context + 8)
            runner = ModelRunner.from_checkpoint(DEMO_TARGET, cache, torch.float32)
            for s in range(batch_size):
                runner.add_sequence(s)
                runner.forward([s], [[(s * 31 + i) % 4000 + 5 for i in range(context)]], logits_for="last")
            pairs = []
            for repeat in range(args.repeats):
                order = (True, False) if repeat % 2 == 0 else (False, True)
                timed = {mode: time_forward(runner, batch_size, args.num_steps, mode) for mode in order}
                pairs.append((timed[True], timed[False]))
            ratios = sorted(g / i for i, g in pairs)
            in_place = statistics.median(i for i, _ in pairs) * 1e3
            gather = statistics.median(g for _, g in pairs) * 1e3
            print(
                f"{batch_size:>5} {context:>7} {in_place:>11.2f} {gather:>9.2f} "
                f"{statistics.median(ratios):>15.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
            )


if __name__ == "__main__":
    main()
