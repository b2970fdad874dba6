"""How calibration samples and solves, and what it reports per layer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BlockFit", "CalibrationSettings", "LayerFit"]

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
    # Block reconstruction after the per-layer fits (see .blocks): Adam steps per block (0: none),
    # its learning rate relative to each tensor's root-mean-square value, images per step, most
    # cached inputs and outputs per block (MiB), and most replaced layers in one block.
    block_steps: int = 1500
    block_lr: float = 0.02
    block_batch_size: int = 32
    block_cache_mb: int = 1024
    block_layers: int = 6

    def __post_init__(self) -> None:
        for name, low in (("pixels_per_image", 1), ("als_iterations", 0), ("relu_iterations", 0), ("max_features", 1),
                          ("batch_size", 1), ("block_steps", 0), ("block_batch_size", 1), ("block_cache_mb", 1),
                          ("block_layers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"calibration setting {name} must be an integer >= {low}, got {value!r}")
        if self.batchnorm not in ("auto", "always", "never"):
            raise ValueError(f"calibration setting batchnorm must be 'auto', 'always' or 'never', got "
                             f"{self.batchnorm!r}")
        if not isinstance(self.ridge, (int, float)) or isinstance(self.ridge, bool) or not self.ridge >= 0:
            raise ValueError(f"calibration setting ridge must be a number >= 0, got {self.ridge!r}")
        if not isinstance(self.block_lr, (int, float)) or isinstance(self.block_lr, bool) or not self.block_lr > 0:
            raise ValueError(f"calibration setting block_lr must be a number > 0, got {self.block_lr!r}")


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


@dataclass
class BlockFit:
    """What calibration did to one block (see :mod:`.blocks`): its relative output error
    against the teacher's block on the held-out calibration images with the transferred
    weights, after the per-layer fits and after the block's optimisation (with its error
    on the images it was fitted to), and whether that optimisation was kept."""

    block: str
    layers: list[str]
    method: str = ""
    images: int = 0
    held_out: int = 0
    error_transfer: float | None = None
    error_layers: float | None = None
    error_block: float | None = None
    error_block_fitting: float | None = None
    kept: bool = False
    seconds: float = 0.0

    def describe(self) -> str:
        steps = [(label, value) for label, value in (("transfer", self.error_transfer), ("layer fits", self.error_layers),
                                                     ("optimised", self.error_block)) if value is not None]
        errors = " -> ".join(f"{value:.3g} ({label})" for label, value in steps)
        where = f" on {self.held_out} held-out samples ({self.images} images cached)" if self.images else ""
        return "; ".join(filter(None, (self.method, f"output error {errors}{where}" if errors else "",
                                       f"{self.seconds:.1f} s" if self.seconds else "")))
