"""Checkpoints of converted models: the state_dict plus what rebuilds the
model (its source and the conversion's options), written atomically and
loaded with ``weights_only=True``."""

from __future__ import annotations

import importlib
import os
import sys

import torch
import torch.nn as nn

from ..files import read_torch_file, write_atomic
from .pipeline import convert
from .report import ConversionReport

__all__ = [
    "CHECKPOINT_FORMAT", "build_source", "load_callable", "load_converted", "read_converted", "save_converted",
]

CHECKPOINT_FORMAT = "leanconv.convert/1"


def save_converted(path, model: nn.Module, source: dict, kind: str, options: dict, report: ConversionReport | None = None) -> None:
    """Save a converted model atomically: its state_dict and what
    :func:`load_converted` needs to rebuild it.

    ``source`` is ``{"zoo": name, "create_kwargs": {...}}`` or
    ``{"callable": "module:function"}``; ``options`` are :func:`convert`'s
    (include ``input_size`` when the conversion used one: the stem is then
    found by execution order, and the rebuild must find the same one)."""
    from .. import __version__

    payload = {
        "format": CHECKPOINT_FORMAT,
        "source": source,
        "kind": kind,
        "options": options,
        "state_dict": model.state_dict(),
        "report": None if report is None else report.to_dict(),
        "leanconv_version": __version__,
    }
    write_atomic(path, lambda handle: torch.save(payload, handle))


def build_source(source: dict) -> nn.Module:
    """The unconverted model a checkpoint's ``source`` describes."""
    if "zoo" in source:
        from .. import models

        return models.create(source["zoo"], **source.get("create_kwargs", {}))
    if "callable" in source:
        return load_callable(source["callable"])()
    raise ValueError(f"checkpoint source must name a zoo model or a module:function, got {source!r}")


def load_callable(spec: str):
    """``"package.module:function"`` -> the function. The module is looked up
    on ``sys.path`` and in the current directory (as ``python -m`` would)."""
    if ":" not in spec:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} from {spec!r}: {error}") from error
    function = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        function = getattr(function, part)
    if not callable(function):
        raise ValueError(f"{spec!r} is not callable")
    return function


def read_converted(path, map_location="cpu") -> dict:
    """The payload of a convert checkpoint (state_dict, source, kind, options, report), checked."""
    payload = read_torch_file(path, "leanconv convert checkpoint", map_location)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a leanconv convert checkpoint (expected a dict with format "
                         f"{CHECKPOINT_FORMAT!r}; `leanconv convert --out` writes one)")
    return payload


def load_converted(path, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by ``leanconv convert --out`` / :func:`save_converted`.

    Example::

        from leanconv.conversion import load_converted
        model = load_converted("vgg16_hetconv_p4.pt")
    """
    payload = read_converted(path, map_location)
    model = build_source(payload["source"])
    options = dict(payload["options"])
    options.pop("transfer_weights", None)
    options.pop("verbose", None)
    options.pop("return_report", None)
    if options.get("input_size") is not None:
        options["input_size"] = tuple(options["input_size"])
    converted = convert(model, payload["kind"], inplace=True, **options)
    converted.load_state_dict(payload["state_dict"])
    return converted
