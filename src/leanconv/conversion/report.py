"""What :func:`leanconv.convert` did: each layer replaced (parameters and
MACs before and after, weight-transfer error) or left alone and why, and the
totals. MACs are multiply-accumulates per image (FLOPs = 2 x MACs); the
model totals are :func:`leanconv.count`'s, the figures ``leanconv profile``
prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ConversionReport", "ReplacedLayer", "SkippedLayer"]


@dataclass
class ReplacedLayer:
    """One replaced convolution. MACs are per image (FLOPs = 2 x MACs) and
    None when no ``input_size`` was given; ``calls`` counts how often the
    layer ran in the shape pass (a shared layer's MACs count every call)."""

    name: str
    before: str
    after: str
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    aliases: tuple[str, ...] = ()
    note: str = ""
    transfer_error: float | None = None
    calibration: Any = None  # a leanconv.conversion.calibrate.LayerFit when convert ran with calibration


@dataclass
class SkippedLayer:
    """One convolution left alone, and why."""

    name: str
    module: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert` did. ``str(report)`` is the printed table.

    Totals: ``params_before``/``params_after`` of the whole model; MACs of the
    replaced layers (``replaced_macs_*``) when a shape pass ran, and of the
    whole model (``model_macs_*``, via :mod:`leanconv.accounting` when it is
    available) - all multiply-accumulates per image, FLOPs = 2 x MACs.
    """

    kind: str
    options: dict
    replaced: list[ReplacedLayer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    input_size: tuple[int, ...] | None = None
    model_macs_before: int | None = None
    model_macs_after: int | None = None
    blocks: list = field(default_factory=list)  # leanconv.conversion.calibrate.BlockFit per reconstructed block

    @property
    def replaced_params_before(self) -> int:
        return sum(r.params_before for r in self.replaced)

    @property
    def replaced_params_after(self) -> int:
        return sum(r.params_after for r in self.replaced)

    @property
    def replaced_macs_before(self) -> int | None:
        values = [r.macs_before for r in self.replaced]
        return None if not values or None in values else sum(values)

    @property
    def replaced_macs_after(self) -> int | None:
        values = [r.macs_after for r in self.replaced]
        return None if not values or None in values else sum(values)

    def to_dict(self) -> dict:
        """Plain data (for ``--json`` and checkpoints)."""
        return {
            "kind": self.kind,
            "options": {k: v for k, v in self.options.items()},
            "input_size": None if self.input_size is None else list(self.input_size),
            "mac_unit": "multiply-accumulates per image (FLOPs = 2 x MACs)",
            "replaced": [r.__dict__ | {"aliases": list(r.aliases),
                                       "calibration": None if r.calibration is None else asdict(r.calibration)}
                         for r in self.replaced],
            "skipped": [s.__dict__ for s in self.skipped],
            "blocks": [asdict(b) for b in self.blocks],
            "totals": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "replaced_params_before": self.replaced_params_before,
                "replaced_params_after": self.replaced_params_after,
                "replaced_macs_before": self.replaced_macs_before,
                "replaced_macs_after": self.replaced_macs_after,
                "model_macs_before": self.model_macs_before,
                "model_macs_after": self.model_macs_after,
            },
        }

    def __str__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        lines = [f"leanconv.convert: kind={self.kind!r}" + (f" ({options})" if options else "")]
        size = "" if self.input_size is None else f", input {tuple(self.input_size)}"
        lines.append(f"MACs = multiply-accumulates per image (FLOPs = 2 x MACs){size}")

        def fmt(value) -> str:
            return "-" if value is None else f"{value:,}"

        if self.replaced:
            width = max(len(r.name) for r in self.replaced)
            width = max(width, 5)
            lines.append("")
            lines.append(f"replaced ({len(self.replaced)}):")
            lines.append(
                f"  {'layer':<{width}}  {'params before':>14}  {'params after':>13}  {'MACs before':>14}  {'MACs after':>14}  new layer"
            )
            for r in self.replaced:
                extra = f"  [{r.note}]" if r.note else ""
                if r.aliases:
                    extra += f"  (also {', '.join(r.aliases)})"
                if r.transfer_error is not None:
                    extra += f"  (weight transfer rel. error {r.transfer_error:.3g})"
                if r.calibration is not None:
                    extra += f"  (calibration: {r.calibration.describe()})"
                lines.append(
                    f"  {r.name:<{width}}  {r.params_before:>14,}  {r.params_after:>13,}  {fmt(r.macs_before):>14}  "
                    f"{fmt(r.macs_after):>14}  {r.after}{extra}"
                )
        else:
            lines.append("")
            lines.append("replaced: none")
        if self.skipped:
            width = max(max(len(s.name) for s in self.skipped), 5)
            lines.append("")
            lines.append(f"left alone ({len(self.skipped)}):")
            for s in self.skipped:
                lines.append(f"  {s.name:<{width}}  {s.module}: {s.reason}")
        if self.blocks:
            width = max(len(b.block) for b in self.blocks)
            lines.append("")
            lines.append(f"blocks reconstructed after the layer fits ({len(self.blocks)}):")
            for b in self.blocks:
                lines.append(f"  {b.block:<{width}}  {b.describe()}")
        lines.append("")
        lines.append("totals:")

        def ratio(after, before) -> str:
            return "" if not before or after is None or before is None else f"  ({after / before:.1%} of before)"

        totals = (("replaced layers: params", self.replaced_params_before, self.replaced_params_after),
                  ("replaced layers: MACs", self.replaced_macs_before, self.replaced_macs_after),
                  ("model: params", self.params_before, self.params_after),
                  ("model: MACs", self.model_macs_before, self.model_macs_after))
        for label, before, after in totals:
            if before is not None:
                lines.append(f"  {label} {before:,} -> {after:,}" + ratio(after, before))
        if self.model_macs_before is None and self.input_size is None:
            lines.append("  (MACs need input_size=(C, H, W) for a shape pass)")
        return "\n".join(lines)


