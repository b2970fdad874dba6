"""How calibration samples and solves, and what it reports per layer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CalibrationSettings", "LayerFit"]

@dataclass(frozen=True)
class CalibrationSettings:
    """How :func:`calibrate` samples and solves (see the module docstring)."""

    pixels_per_image: int = 64
    ridge: float = 1e-3  # relative to the mean diagonal of each solve's Gram matrix
    als_iterations: int = 10
    max_features: int = 6144  # M*kh*kw (and joint KxK unknowns) beyond this: not fitted
    batch_size: int = 128  # images per forward pass
    seed: int = 0
    # BatchNorm after a fitted layer: re-estimate its statistics where that lowers the error
    # ("auto"), always, or never; after a layer that was not fitted they are always re-estimated.
    batchnorm: str = "auto"
    fit: bool = True  # False: no layer is fitted, only the BatchNorms after them re-estimated
    # Layers followed by BatchNorm + ReLU: passes of the ReLU-aware refinement after the linear fit (0: none)
    relu_iterations: int = 0

    def __post_init__(self) -> None:
        for name, low in (("pixels_per_image", 1), ("als_iterations", 0), ("relu_iterations", 0), ("max_features", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"calibration setting {name} must be an integer >= {low}, got {value!r}")
        if self.batchnorm not in ("auto", "always", "never"):
            raise ValueError(f"calibration setting batchnorm must be 'auto', 'always' or 'never', got "
                             f"{self.batchnorm!r}")
        if not isinstance(self.ridge, (int, float)) or isinstance(self.ridge, bool) or not self.ridge >= 0:
            raise ValueError(f"calibration setting ridge must be a number >= 0, got {self.ridge!r}")


@dataclass
class LayerFit:
    """What calibration did to one replaced layer: relative output errors on the
    calibration sample with the transferred weights and after the fit (None
    when not fitted), how it was fitted or why not, and the BatchNorm decision."""

    method: str
    error_transfer: float | None = None
    error_fit: float | None = None
    batchnorm: str | None = None  # name of the BatchNorm fed by the layer
    bn_error_kept: float | None = None  # its output error with the teacher's statistics
    bn_error_reestimated: float | None = None
    bn_reestimated: bool = False
    samples: int = 0
    # layers followed by BatchNorm + ReLU, with relu_iterations: relative error of the activations
    # (distance from the exact ones, an upper bound of the error after the ReLU) before and after
    relu_error_linear: float | None = None
    relu_error_refined: float | None = None

    def describe(self) -> str:
        parts = [self.method]
        if self.error_transfer is not None:
            after = "" if self.error_fit is None else f" -> {self.error_fit:.3g}"
            parts.append(f"output error {self.error_transfer:.3g}{after}")
        if self.relu_error_linear is not None:
            parts.append(f"activation error {self.relu_error_linear:.3g} -> {self.relu_error_refined:.3g}")
        if self.batchnorm is not None:
            action = "re-estimated" if self.bn_reestimated else "kept"
            errors = ""
            if self.bn_error_kept is not None:
                errors = f" (error kept {self.bn_error_kept:.3g}, re-estimated {self.bn_error_reestimated:.3g})"
            parts.append(f"{self.batchnorm} statistics {action}{errors}")
        return "; ".join(parts)
