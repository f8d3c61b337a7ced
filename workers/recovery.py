"""Target recovery: a target that lost its caches (a dead expert-parallel rank, a replaced replica) is
re-prefilled from the engine's token histories, the truth every cache is rebuilt from."""

from __future__ import annotations

import logging
import time

from workers.backends import TargetBackend
from workers.sequence import Sequence

logger = logging.getLogger(__name__)


def restore_target(target: TargetBackend, batch: list[Sequence], error: Exception, timeout_s: float) -> None:
    """Rebuild the target's caches of `batch` after `error`, retrying each second; past `timeout_s`, raise a
    RuntimeError naming both failures."""
    deadline = time.monotonic() + timeout_s
    logger.warning("target failed (%s); re-prefilling %d sequences", error, len(batch))
    while True:
        try:
            target.restore(
                [s.seq_id for s in batch], [s.token_ids[:-1] for s in batch], [s.params for s in batch]
            )
            return
        except Exception as retry_error:  # noqa: BLE001 (retried until the deadline)
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"the target failed ({error}) and could not be restored within "
                    f"{timeout_s:.0f} s ({retry_error})"
                ) from error
            time.sleep(1.0)
