"""Random-number-generator states for exact resume: Python's, NumPy's and torch's, on every rank.

Under DDP each process samples its own responses, so each must get its own states back: a
checkpoint holds the states of all ranks (gathered to rank 0, which writes the file).
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in types that ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states of :func:`rng_state`."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states_of_all_ranks() -> list[dict[str, Any]]:
    """Every process's :func:`rng_state`, indexed by global rank (one entry without a process
    group). A collective: every rank must call it."""
    state = rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return [state]
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as bytes: all_gather_object cannot pickle every tensor dtype
    payloads: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(payloads, buffer.getvalue())
    return [torch.load(io.BytesIO(payload), weights_only=True) for payload in payloads]


def restore_rank_state(states: dict[str, Any] | list[dict[str, Any]], rank: int) -> None:
    """Restore this ``rank``'s entry of :func:`rng_states_of_all_ranks` (a run resumed on more
    ranks than it was saved from reuses rank 0's; a single dict is every rank's)."""
    if isinstance(states, list):
        states = states[rank] if rank < len(states) else states[0]
    set_rng_state(states)
