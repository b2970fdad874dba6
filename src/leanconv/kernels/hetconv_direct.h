// Direct HetConv convolution for CPUs: one pass over a float32 input, channels-last or
// contiguous (NCHW); the output has the input's memory format.
//
// HetConv (Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120): filter n of
// group g has KxK kernels on the group's Mg = M/P input channels and 1x1 kernels,
// read under the window's centre, on the other M - Mg channels.
//
// The kernel splits the same sum by tap rather than by kernel kind:
//
//   * the centre tap: a dense 1x1 over all M channels. Its (N, M) matrix holds the
//     1x1 kernels and, on each group's own channels, the centre of the KxK kernels;
//     no entry of it is zero, and its input values are shared by every filter;
//   * the other KxK - 1 taps: each group's Mg channels, as in a grouped convolution.
//
// For a block of NP output pixels (flattened over batch, rows and columns, so small
// maps and borders need no special case) and one tile of NV vectors of filters, both
// parts accumulate in the same registers:
//
//   acc[i][f] = bias[f] + sum over channels k:            x[centre of pixel i, k] * wc[k][f]
//                       + sum over other taps, j < Mg:     x[pixel i + tap, channel j of f's group] * wn[tap][j][f]
//
// then the optional ReLU, and one store. Every input value is a scalar broadcast;
// every weight load is one vector of filters reused by the block's pixels. A tile's
// filters are consecutive in group order, so a tile can hold parts of several groups:
// its grouped part runs in passes, each pass giving every vector of the tile at most
// one group (two groups in one pass keep twice as many independent accumulators busy
// where a group is one vector wide); a lane outside its pass's group has weight zero.
// Where a group has fewer filters than a vector has lanes (16-32 channels at P = 4-8,
// say), such passes would leave most lanes' products zero: there the tile's grouped part
// runs as one pass instead, each lane reading its own group's channel from one vector
// load of the pixel's channels, permuted (channels-last only; an NCHW input is read
// through a channels-last copy).
// A tap that falls into the zero padding reads a buffer of zeros, and a tap in the
// padding for the whole block is skipped.
//
// Memory formats: every input value is read through its tensor strides, so both
// formats run the same code; channels-last keeps a pixel's channels in one cache line
// and stores whole vectors, NCHW stores the tile's filters one by one (and is read and
// written through channels-last copies where the kernel would read it badly:
// hetconv_direct.cpp).
//
// The readable statement of the same function is leanconv's "reference" backend (one
// dense convolution); the tests compare the two on awkward shapes.
//
// Files: hetconv_direct.h (the call's geometry and packed operands, and each ISA's entry
// point), hetconv_direct_kernel.h (this kernel, written once for a vector of kLanes
// floats), hetconv_direct_isa.h (compiles it for one ISA), hetconv_direct_{avx512,avx2,
// portable}.cpp (each ISA's options), hetconv_direct.cpp (the torch glue and the run-time
// choice of ISA).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace leanconv_direct {

// The geometry and the packed operands of one call.
struct Call {
  const float* x;        // (B, M, H, W) through the strides xs
  const float* wc;       // (T, M, FT): the centre tap, every channel
  const float* wn;       // (passes, KH*KW - 1, Mg, FT): the other taps, one pass's groups
  const int32_t* pass_groups;  // (passes, 2): the group of vector 0 and of vector 1 (-1: none)
  const int32_t* tile_passes;  // (T + 1,): tile t's passes are tile_passes[t] .. tile_passes[t+1]-1
  // Vectors of several groups (null where unused): tile t's grouped taps run as one pass
  // (wn: (T, KH*KW - 1, Mg, FT)); for channel j, vector v of tile t loads kLanes channels
  // from channel lane_offsets[(t*NV + v)*Mg + j] of each pixel and permutes them by
  // lane_index[((t*NV + v)*Mg + j)*kLanes ...]. Channels-last input only.
  const int32_t* lane_offsets;
  const int32_t* lane_index;
  const float* bias;     // (T, FT): each tile's bias in its lane order (zeros without a bias)
  const float* zeros;    // zeros at every channel's offset: what a tap in the padding reads
  float* out;            // (B, N, Ho, Wo) through the strides os
  int64_t xs[4], os[4];  // strides in floats: batch, channel, row, column
  int64_t B, H, W, M, N, Ho, Wo;
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t P, Mg, Ng, T, FT;
  int64_t kxk_base, kxk_stride;  // channel j of group g is at g*kxk_base + j*kxk_stride (floats)
  const int64_t* tap_offsets;    // (KH*KW,): each tap relative to a pixel's first tap (floats)
  const int64_t* other_taps;     // ((KH*KW - 1) * Mg,): channel j at the k-th non-centre tap,
                                 // relative to a pixel's first tap (group 0)
  bool shifted;                  // filter i of group g is g + i*P (else g*Ng + i)
  bool relu;
  // Pixel order: row-major (image, row, column), or position-major (row, column, image)
  // for small maps, where every image's pixel at one position has the same taps in the
  // padding: blocks of one position skip those taps (a 2x2 map has 5/9 of its taps there).
  bool position_major;
};

// The filter (in the layer's order) of position q in group order.
inline int64_t filter_of(const Call& c, int64_t q) { return c.shifted ? (q % c.Ng) * c.P + q / c.Ng : q; }

// The kernel for one vector ISA: c.FT is one or two of its vectors (kLanes floats each),
// and the packed operands were laid out for that width. Each is compiled in a file of
// its own for its ISA (hetconv_direct_<isa>.cpp) and called only where the CPU has it
// (hetconv_direct.cpp), so one build runs on any x86 CPU; ARM and other CPUs get the
// portable kernel only.
// transpose: dst[b] = src[b]^T for B row-major (rows x cols) float matrices (the NCHW <->
// channels-last copies of hetconv_direct.cpp).
namespace avx512 {
constexpr int kLanes = 16;
void run(const Call& c);
void transpose(const float* src, float* dst, int64_t B, int64_t rows, int64_t cols);
}  // namespace avx512
namespace avx2 {
constexpr int kLanes = 8;
void run(const Call& c);
void transpose(const float* src, float* dst, int64_t B, int64_t rows, int64_t cols);
}  // namespace avx2
namespace portable {
constexpr int kLanes = 4;
void run(const Call& c);
void transpose(const float* src, float* dst, int64_t B, int64_t rows, int64_t cols);
}  // namespace portable

}  // namespace leanconv_direct
