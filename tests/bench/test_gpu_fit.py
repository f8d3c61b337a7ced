"""Fitting the policy's GPU figures to the stored H200 run (`bench.gpu_fit`): the constants in
`cluster.choosers` and `policy.presets` are what the fits give, and the prior built from them has the run's
shape."""

from __future__ import annotations

import json

import pytest

from bench.gpu_fit import fit_cost_params, fit_prior, main, model_config, predicted_s
from bench.gpu_step import RESULTS
from cluster.choosers import GPU_HARDWARE, Hardware, analytic_prior
from policy.cost_model import CostParams
from policy.presets import H200_MIXTRAL_PARAMS, H200_QWEN2_PARAMS


def test_the_gpu_prior_is_the_fit_of_the_h200_run_and_has_its_shape() -> None:
    """`cluster.choosers.GPU_HARDWARE` is what `bench.gpu_fit` gives on the stored H200 run (rounded), and the
    prior built from it puts verifying 4 drafts per sequence at batch 32 near the measured 1.08x a plain step,
    where the CPU's figures put it above 2x (a GPU server would have started believing drafting a loss)."""
    results = json.loads(RESULTS.read_text())  # the stored H200 run
    fitted, errors = fit_prior(results)
    for field in ("bandwidth_bytes_s", "flops", "layer_overhead_s", "sequence_overhead_s"):
        assert getattr(GPU_HARDWARE, field) == pytest.approx(getattr(fitted, field), rel=0.1), field
    assert errors["target_rms_error"] < 0.1 and errors["draft_max_error"] < 0.1
    mixtral, draft = model_config("mixtral-8x7b"), model_config("qwen2-0.5b")
    points = {
        (p["batch_size"], p["num_spec_tokens"]): p["graph_s"]
        for p in results["models"]["mixtral-8x7b"]["points"]
    }
    measured = points[(32, 4)] / points[(32, 0)]

    def ratio(hardware: Hardware) -> float:
        prior = analytic_prior(mixtral, draft, 2, hardware)
        return predicted_s(prior, mixtral, 32, 4 * 32)[0] / predicted_s(prior, mixtral, 32, 0)[0]

    assert abs(ratio(GPU_HARDWARE) - measured) < 0.15 and ratio(Hardware()) > 2.0


@pytest.mark.parametrize(
    ("name", "params"), [("mixtral-8x7b", H200_MIXTRAL_PARAMS), ("qwen2-57b-a14b", H200_QWEN2_PARAMS)]
)
def test_the_h200_measured_presets_hold_the_fit_of_the_stored_run(name: str, params: CostParams) -> None:
    fitted, max_error = fit_cost_params(json.loads(RESULTS.read_text()), name)
    assert max_error < 0.06  # the cost model's form explains every replayed step within 6%
    for field, value in fitted.items():
        assert getattr(params, field) == pytest.approx(value, rel=1e-3, abs=1e-9), field


def test_the_command_prints_and_returns_both_fits() -> None:
    fits = main([str(RESULTS)])
    assert set(fits["cost_params"]) == {"mixtral-8x7b", "qwen2-57b-a14b"}
    assert fits["hardware"]["bandwidth_bytes_s"] == pytest.approx(GPU_HARDWARE.bandwidth_bytes_s, rel=0.1)
