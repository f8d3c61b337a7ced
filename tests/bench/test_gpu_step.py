"""The whole-model GPU step script, run on CPU with a tiny MoE: its verification forward over a cache equals a
forward over the whole sequence without one, repeats measure the same step, and the run writes its points."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import DynamicCache

from bench.gpu_step import (
    build,
    main,
    static_step,
    verify,
)


def test_verification_over_the_cache_matches_a_full_forward_and_leaves_the_cache_as_it_was() -> None:
    torch.manual_seed(0)
    model = build("tiny", "cpu", torch.float32)
    with torch.inference_mode():
        prompt = torch.randint(model.config.vocab_size, (2, 16))
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        for k in (0, 3, 1):
            tokens = torch.randint(model.config.vocab_size, (2, k + 1))
            reference = model(input_ids=torch.cat([prompt, tokens], dim=1)).logits[:, 16:]
            for _ in range(2):  # a repeat sees the same cache
                torch.testing.assert_close(verify(model, cache, tokens), reference, rtol=1e-4, atol=1e-5)
                assert cache.get_seq_length() == 16


def test_the_static_step_for_cuda_graphs_matches_a_full_forward_at_every_call() -> None:
    torch.manual_seed(0)
    model = build("tiny", "cpu", torch.float32)
    with torch.inference_mode():
        for k in (0, 2, 4):
            step = static_step(model, 2, k, 16, "cpu")
            reference = model(input_ids=torch.cat([step.prompt_ids, step.token_ids], dim=1)).logits[:, 16:]
            for _ in range(2):
                torch.testing.assert_close(step.run(), reference, rtol=1e-4, atol=1e-5)


def test_the_run_writes_every_point_with_the_truth_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "gpu_step.json"
    args = "--models tiny --draft tiny --device cpu --dtype float32 --batch-sizes 1,2 --max-spec-tokens 2"
    results = main([*args.split(), "--context", "8", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    points = results["models"]["tiny"]["points"]
    assert [(p["batch_size"], p["num_spec_tokens"]) for p in points] == [
        (b, k) for b in (1, 2) for k in range(3)
    ]
    truth = [p["truth_s"] for p in points[:3]]
    assert all(p["measured_s"] > 0.0 for p in points) and truth == sorted(truth) and truth[0] < truth[-1]
    assert [s["batch_size"] for s in results["draft"]["steps"]] == [1, 2]
