"""Token streams of the demo corpus and the training batches drawn from them.

Each kind of text becomes one stream: its documents encoded and concatenated, each document as
BOS + text (+ EOS for code and prose; synthetic conversations already end every answer with EOS).
A batch is `batch_size` windows of `seq_len + 1` tokens at random offsets; the kind of each window is drawn
with the mixture weights. The window offsets of step `s` depend only on (seed, stage, s), so a resumed
run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from training.corpus import KINDS, Document
from training.tokenizer import BOS_ID, EOS_ID


def encode_documents(tokenizer: Tokenizer, documents: list[Document]) -> np.ndarray:
    """One uint16 stream of all `documents`, in order."""
    encodings = tokenizer.encode_batch([d.text for d in documents], add_special_tokens=False)
    pieces = []
    for document, encoding in zip(documents, encodings, strict=True):
        tail = [] if document.kind == "synthetic" else [EOS_ID]
        pieces.append(np.asarray([BOS_ID, *encoding.ids, *tail], dtype=np.uint16))
    return np.concatenate(pieces)


def save_streams(path: Path, streams: dict[str, np.ndarray]) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **streams)  # type: ignore[arg-type]  # numpy's stub types **kwds as the allow_pickle flag
    tmp.replace(path)


def load_streams(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {kind: archive[kind] for kind in KINDS}


def sample_batch(
    streams: dict[str, np.ndarray],
    mix: tuple[float, ...],
    batch_size: int,
    seq_len: int,
    rng: np.random.Generator,
) -> torch.Tensor:
    """(batch_size, seq_len + 1) int64 token ids; row i is a window of the stream of kind `KINDS[j]`."""
    kinds = rng.choice(len(KINDS), size=batch_size, p=np.asarray(mix) / sum(mix))
    rows = []
    for j in kinds:
        stream = streams[KINDS[j]]
        start = int(rng.integers(0, len(stream) - seq_len - 1))
        rows.append(stream[start : start + seq_len + 1].astype(np.int64))
    return torch.from_numpy(np.stack(rows))


def eval_windows(stream: np.ndarray, num_windows: int, seq_len: int) -> torch.Tensor:
    """(num_windows, seq_len + 1) evenly spaced windows of `stream`, for a fixed held-out loss."""
    span = len(stream) - seq_len - 1
    if span < 0:
        raise ValueError(
            f"held-out stream of {len(stream)} tokens is shorter than seq_len + 1 = {seq_len + 1}"
        )
    starts = np.linspace(0, span, num=num_windows).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s : s + seq_len + 1].astype(np.int64) for s in starts]))
