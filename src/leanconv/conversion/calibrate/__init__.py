"""Data-aware conversion: fit each replaced layer, in network order, to
reproduce the dense layer it replaced on calibration images, then each block
of replaced layers to reproduce the teacher's block.

For every replaced layer ``i`` (in the order the network runs them):

1. **Statistics.** The teacher (the unconverted network) runs up to its
   dense convolution and gives the target ``Y`` (the dense layer's output on
   the teacher's own input); the student (the converted network, layers
   ``< i`` already fitted) runs up to layer ``i`` and gives the input ``X`` it
   actually receives, so the fit compensates the errors of earlier layers.
   At a sample of output pixels (``pixels_per_image``; every pixel of small
   maps) the KxK patches ``u`` of ``X`` (the dense layer's geometry: stride,
   dilation, padding mode) and ``y`` of ``Y`` are accumulated into the
   moments ``G = sum u u^T``, ``C = sum u y^T`` (with a constant feature for
   the bias), ``sum y`` and ``sum y^2`` in float64. Memory is bounded by
   ``(M kh kw + 1)^2`` for ``G``, whatever the number of images or pixels.
2. **Fit.** Every kind computes ``W_eff u + b``, where ``W_eff`` (N, M kh kw)
   is the layer's effective dense weight, so its squared output error is the
   quadratic ``tr(W G W^T) - 2 tr(W C) + sum y^2`` of the moments alone:

   * HetConv's output is linear in all its weights: each filter is a ridge
     least-squares problem over the patch entries its pattern keeps (its
     group's KxK taps, the centre tap of every other channel), solved in
     closed form (Cholesky, float64); filters with the same pattern share one
     factorisation.
   * The separable kinds are bilinear and are fitted by alternating least
     squares from the SVD factors of the weight transfer, each half step an
     exact ridge least-squares solve: DSC and GWC+PWC alternate the pointwise
     weights (with the bias) and the KxK weights (a joint solve, skipped
     when it would exceed ``max_features`` unknowns: GWC+PWC with many
     channels per group fits its pointwise weights only); BSConv-U alternates,
     per filter, its pointwise row (with the bias) and its blueprint;
     BSConv-S keeps ``pw1`` (orthonormal rows from the SVD) and alternates
     ``pw2``'s row and the blueprint.
   * Layers with a BatchNorm inside (``with_bn``), with more than
     ``max_features`` patch entries, or that never ran on the calibration
     images are not fitted (the report says why).

   A layer without a bias whose output goes straight into a BatchNorm is
   fitted with one (the intercept of the least squares), folded into that
   BatchNorm's running mean. A fit is kept only where it lowers the sampled
   output error.
3. **ReLU-aware refinement** (``relu_iterations`` passes). Where the
   layer's output goes into a BatchNorm whose output only a ReLU reads (a
   module or a function; seen by watching every torch function during one
   forward pass), errors where both the teacher's and the layer's units are
   off cost nothing after the ReLU. The fit alternates (Zhang et al.,
   "Accelerating Very Deep Convolutional Networks for Classification and
   Detection", TPAMI 2016): project the layer's predictions onto the
   outputs that give the teacher's activations exactly (the teacher's
   output where its unit is on, the dead region where it is off), then
   refit the layer by the same least squares to the projected targets (the
   Gram matrix is reused; each pass recomputes only ``sum u z^T`` over the
   same sampled pixels). The weights with the smallest distance are kept,
   and that BatchNorm keeps the teacher's statistics (the dead region is
   defined by them).
4. **BatchNorm.** When the replaced layer's output goes straight into a
   BatchNorm, its statistics are re-estimated from the fitted layer's output
   only where that lowers the error of the BatchNorm's output against the
   teacher's, and always after a layer that was not fitted. Both errors are
   computed from the same moments and reported (``batchnorm="always"`` or
   ``"never"`` forces the choice after fitted layers, to measure both).

5. **Blocks** (``block_steps``, on by default). After the layer fits of a
   block (a residual block or a run of them, up to ``block_layers`` replaced
   layers; see :mod:`.blocks`), the block's parameters are optimised by Adam so
   that its output, after its addition and activation, matches the teacher's
   block on the inputs the converted network gives it (cached), and kept only
   where that lowers the error on held-out calibration images. The per-layer
   errors above are those after the layer fit, before this step; the report
   gives each block's error after every step. The layer fits of a block start
   from the block's cache (the teacher's and the student's inputs of the block)
   where it holds every calibration image: the block's modules run instead of
   the whole network up to the layer, so a network's layer fits cost about one
   pass through each block per layer, not one through every layer before it.

The package: :mod:`.settings` (what is asked, what is reported), :mod:`.moments`
(sampling and moments), :mod:`leanconv.graph` (which BatchNorm and ReLU follow a layer; fuse asks it too),
:mod:`.batchnorm`, :mod:`.relu` (the refinement), :mod:`.blocks` and :mod:`.driver`; each kind's fit
is its own (``calibration_fit`` in its layer file).

Errors are relative: ``||output - target|| / ||target||`` over the sampled
pixels of every calibration image.
"""

from .driver import calibrate
from .moments import as_batches
from .settings import BlockFit, CalibrationSettings, LayerFit

__all__ = ["BlockFit", "CalibrationSettings", "LayerFit", "as_batches", "calibrate"]
