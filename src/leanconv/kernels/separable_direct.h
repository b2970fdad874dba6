// Direct depthwise-separable convolution for CPUs (inference): a depthwise KxK
// convolution then a pointwise 1x1, in one pass over a float32 channels-last input.
//
// DSC (Howard et al., "MobileNets", 2017, https://arxiv.org/abs/1704.04861): the layer is
// y[p, n] = b[n] + sum_k wpw[n, k] * (sum_taps x[p + tap, k] * wdw[k, tap]); the depthwise
// bias is folded into b when the weights are packed (b = b_pw + wpw @ b_dw).
//
// For a block of NP output pixels (flattened over batch, rows and columns):
//
//   1. the depthwise results of every channel of those pixels go to a buffer of NP x M
//      floats that stays in L1 (vectors of channels, a pixel's taps read through
//      pointers; a tap in the zero padding reads a buffer of zeros);
//   2. for each tile of FT filters, NP x FT accumulators in registers take the pointwise
//      sum over the buffer's channels (one weight vector load reused by the NP pixels, one
//      buffer value broadcast per pixel), then the bias, the optional ReLU, one store.
//
// The intermediate never reaches memory beyond L1, and the layer is one call. Work items
// are (group of filter tiles, block of pixels): the tiles of a group share a slice of the
// pointwise weights small enough to stay in L2; a block's depthwise results are computed
// again for each group it meets (their MACs are K*K/FT of the group's pointwise ones).
// Small maps at batch 1 (one block) thus still spread over every thread.
//
// The readable statement of the same function is the two convolutions
// (leanconv.ops.separable_direct.reference); the tests compare the two on awkward shapes.
#pragma once

#include <cstdint>

namespace leanconv_direct {

struct SeparableCall {
  const float* x;        // (B, M, H, W) channels-last, through the strides xs
  const float* wdw;      // (KH*KW, Mv): each tap's weights of every channel, zero beyond M
  const float* wpw;      // (T, M, FT): tile t's pointwise weights, channel by channel, zero beyond N
  const float* bias;     // (T * FT,): the pointwise bias plus wpw @ the depthwise bias
  const float* zeros;    // Mv zeros: what a tap in the padding reads
  float* out;            // (B, N, Ho, Wo) channels-last, through the strides os
  int64_t xs[4], os[4];  // strides in floats: batch, channel, row, column
  int64_t B, H, W, M, Mv, N, Ho, Wo;
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t T, FT, tiles_per_group;
  bool relu;
};

// The largest kernel window the kernel takes (a block's tap pointers live on the stack).
constexpr int64_t kSeparableMaxTaps = 121;

namespace avx512 { void run_separable(const SeparableCall& c); }
namespace avx2 { void run_separable(const SeparableCall& c); }
namespace portable { void run_separable(const SeparableCall& c); }

}  // namespace leanconv_direct
