// Direct separable convolutions for CPUs (inference), in one call over a float32
// channels-last input: a depthwise KxK convolution and a pointwise 1x1, in either order.
//
// * depthwise first, DSC (Howard et al., "MobileNets", 2017,
//   https://arxiv.org/abs/1704.04861): y[p, n] = b[n] + sum_k wpw[n, k] * (sum_taps
//   x[p + tap, k] * wdw[k, tap]); the depthwise bias is folded into b when the weights
//   are packed (b = b_pw + wpw @ b_dw). For a block of NP output pixels (flattened over
//   batch, rows and columns), the depthwise results of every channel go to a buffer of
//   NP x M floats that stays in L1; then, for each tile of FT filters, NP x FT accumulators
//   in registers take the pointwise sum over the buffer's channels (one weight vector load
//   reused by the NP pixels, one buffer value broadcast per pixel), then the bias, the
//   optional ReLU, one store. Work items are (group of filter tiles, block of pixels): the
//   tiles of a group share a slice of the pointwise weights small enough to stay in L2; a
//   block's depthwise results are computed again for each group it meets (K*K/FT of the
//   group's pointwise MACs), so small maps at batch 1 still spread over every thread. A block
//   of fewer real pixels (the last one, or a whole 2x2 map at batch 1) computes 4 or 8 rows
//   instead of NP.
// * pointwise first, BSConv-U (Haase & Amthor, CVPR 2020, https://arxiv.org/abs/2003.13549):
//   y[p, n] = b_dw[n] + sum_taps wdw[n, tap] * (b_pw[n] + sum_k wpw[n, k] x[p + tap, k]).
//   The pointwise results of every input pixel go to a scratch buffer (batch x rows x
//   columns x N floats, kept by the calling thread: the calls the layers send here are
//   small, so it stays in L2), blocks of NP pixels x tiles of FT filters as above; then the
//   depthwise convolution reads it, vectors of channels, with its bias and the optional
//   ReLU. (The pointwise bias cannot fold into the depthwise one: a border pixel's taps in
//   the zero padding do not see it.)
// * two pointwise first, BSConv-S (same paper): a first 1x1 into a bottleneck of M'
//   channels (into a second scratch buffer, the same way), then BSConv-U on it.
//
// The readable statement of the same functions is the two convolutions
// (leanconv.ops.separable_direct.reference); the tests compare them on awkward shapes.
#pragma once

#include <cstdint>
#include <type_traits>

namespace leanconv_direct {

// One pointwise (1x1) convolution of a call: packed weights (T, K, FT) over K inputs, the
// bias (T * FT), N outputs. (How many of its tiles a work item takes, the kernel chooses.)
struct Pointwise {
  const float* w;
  const float* bias;
  int64_t K, N, T, FT;
};

struct SeparableCall {
  const float* x;              // (B, C, H, W) channels-last, through the strides xs
  const float* wdw;            // (KH*KW, Dv): each tap's weights of the D depthwise channels, zero beyond D
  Pointwise pointwise;         // the 1x1 next to the depthwise convolution (its bias: depthwise first,
                               // b_pw + wpw @ b_dw; pointwise first, b_pw)
  Pointwise first_pointwise;   // two pointwise first: the first 1x1, M -> M' (`pointwise` then reads M')
  const float* depthwise_bias; // (T * FT,): pointwise first: b_dw (unused depthwise first)
  const float* zeros;          // max(M, M'v, Dv) zeros: what a tap in the padding, or a pixel past the end, reads
  float* scratch;              // pointwise first: (B*H*W, Dv) floats for the pointwise results
  float* scratch0;             // two pointwise first: (B*H*W, M'v) floats for the first 1x1's results
  int64_t Kv0;                 // M' rounded to vectors (scratch0's row)
  float* out;                  // (B, N, Ho, Wo) channels-last, through the strides os
  int64_t xs[4], os[4];        // strides in floats: batch, channel, row, column
  int64_t B, H, W, M, N, Ho, Wo;  // M input channels, N output channels
  int64_t D, Dv;               // the depthwise convolution's channels (M or N) and that rounded to vectors
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  bool pointwise_first;
  bool two_pointwise;
  bool relu;
};

// The largest kernel window the kernel takes (a block's tap pointers live on the stack).
constexpr int64_t kSeparableMaxTaps = 121;

namespace avx512 { void run_separable(const SeparableCall& c); }
namespace avx2 { void run_separable(const SeparableCall& c); }
namespace portable { void run_separable(const SeparableCall& c); }

}  // namespace leanconv_direct
