"""The train / held-out split of the demo corpus: a pure function of a source's name.

A source is a stdlib file (its path relative to the stdlib root), a pydoc topic, a synthetic first name or
an arithmetic problem. Hashing the name (not the content, not a random draw) makes the split identical on
every machine and for every Python version, and keeps a whole file on one side.
"""

from __future__ import annotations

import hashlib

HELDOUT_BUCKETS = 16  # 1 source in 16 is held out


def is_heldout(key: str) -> bool:
    digest = hashlib.sha256(f"moespec-demo-split:{key}".encode()).digest()
    return digest[0] % HELDOUT_BUCKETS == 0
