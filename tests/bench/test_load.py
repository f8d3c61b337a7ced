"""bench.load's aggregation of repeated phases and its argument checks (no server needed)."""

from __future__ import annotations

import pytest

from bench.http_load import PhaseResult, median_phase
from bench.load import main


def _phase(throughput: float, tpot: float, drafted: float, accepted: float) -> PhaseResult:
    return PhaseResult(
        concurrency=4,
        mode="auto",
        throughput=throughput,
        ttft_p50=0.1,
        ttft_p99=0.2,
        tpot_p50=tpot,
        tpot_p99=2 * tpot,
        acceptance=accepted / drafted,
        overhead_share=0.1,
        num_errors=1,
        elapsed_s=2.0,
        metrics={
            "spec_decode_num_draft_tokens_total": drafted,
            "spec_decode_num_accepted_tokens_total": accepted,
        },
    )


def test_a_cell_is_the_median_of_its_phases_with_counters_summed() -> None:
    cell = median_phase([_phase(10.0, 0.05, 10, 9), _phase(30.0, 0.01, 30, 3), _phase(20.0, 0.03, 60, 30)])
    assert (cell.throughput, cell.tpot_p50, cell.tpot_p99) == (20.0, 0.03, 0.06)
    assert cell.acceptance == pytest.approx(42 / 100)  # pooled counts, not the median of the three rates
    assert (cell.num_errors, cell.elapsed_s) == (3, 6.0)


def test_an_unknown_workload_is_refused_before_any_server_starts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--workloads", "code,poetry", "--url", "http://127.0.0.1:9"])
    assert "unknown workload ['poetry']" in capsys.readouterr().err


def test_process_cpu_charges_a_child_process_by_iteration() -> None:
    import subprocess
    import sys
    import time

    from bench.process_cpu import ProcessCpu

    cpu = ProcessCpu()
    burn = (
        "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        before = cpu.snapshot()  # the child is seen from its start: its role is named now
        deadline = time.monotonic() + 20
        while (
            time.monotonic() < deadline
            and cpu.snapshot().get(child.pid, 0.0) - before.get(child.pid, 0.0) < 0.25
        ):
            time.sleep(0.05)
        per_iteration = cpu.per_iteration_ms(before, cpu.snapshot(), iterations=10)
    finally:
        child.kill()
    assert per_iteration["other"] >= 25.0  # >= 0.25 s of the child's CPU over 10 iterations
    assert "load generator" in per_iteration  # this process is counted under its own role
