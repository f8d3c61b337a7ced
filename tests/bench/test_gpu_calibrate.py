"""The GPU calibration script, run on CPU with a tiny shape: it measures ours beside transformers on the
same weights, fits the cost model's verify terms on part of the points and checks them on the rest."""

from __future__ import annotations

import json
from pathlib import Path

from bench.gpu_calibrate import main


def test_calibration_runs_end_to_end_on_a_tiny_shape(tmp_path: Path) -> None:
    out = tmp_path / "gpu_calibration.json"
    args = "--shapes tiny --device cpu --dtype float32 --batch-sizes 1,2,4 --max-spec-tokens 1"
    results = main([*args.split(), "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    tiny = results["shapes"]["tiny"]
    assert tiny["max_relative_output_diff"] < 1e-5  # transformers' blocks hold the same weights
    assert len(tiny["points"]) == 3 * 2
    for point in tiny["points"]:
        assert point["num_tokens"] == point["batch_size"] * (point["num_spec_tokens"] + 1)
        assert 1.0 <= point["experts_touched"] <= 8.0 and point["ours_s"] > 0 and point["transformers_s"] > 0
    for fit in (tiny["fit"], tiny["fit_transformers"]):
        assert fit["fit_batch_sizes"] == [1, 4]
        assert min(fit["fixed_s"], fit["per_expert_s"], fit["per_token_s"]) >= 0.0
        assert fit["check_max_abs_error"] >= fit["check_median_abs_error"] >= 0.0
    # The simulator's truth beside each point: more tokens touch more experts and cost more.
    truth = [point["truth_s"] for point in tiny["points"]]
    assert all(t > 0.0 for t in truth) and truth == sorted(truth)
    # --refit reproduces the analysis from the file alone.
    assert main(["--refit", str(out)]) == results
    assert json.loads(out.read_text()) == results
