"""Training checkpoints: written atomically, loadable with ``weights_only=True``.

A checkpoint is a dict: ``model`` (state_dict), ``optimizer``, ``scheduler``,
``scaler`` (fp16 only), ``epoch`` (epochs completed), ``rng`` (torch, CUDA,
numpy and python generator states), ``data`` (the seed and next epoch, which
fix the data order and augmentation), ``config`` (the resolved TrainConfig),
``model_spec`` (what :func:`leanconv.train.build_model` needs to rebuild the
network) and ``metrics`` (the last epoch's). Everything is tensors, numbers,
strings, lists and dicts, so a checkpoint loads without unpickling code.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..files import read_torch_file, write_atomic

__all__ = ["save_checkpoint", "load_checkpoint", "rng_states", "restore_rng_states"]

FORMAT = "leanconv-train-1"


def rng_states() -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """``torch.save`` atomically (:func:`leanconv.files.write_atomic`)."""
    write_atomic(path, lambda handle: torch.save({"format": FORMAT, **checkpoint}, handle))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    checkpoint = read_torch_file(path, "training checkpoint", map_location)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT or "model" not in checkpoint:
        raise ValueError(f"{path}: not a leanconv training checkpoint (expected a dict with format {FORMAT!r})")
    return checkpoint
