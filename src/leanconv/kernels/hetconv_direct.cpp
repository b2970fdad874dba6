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
// A tap that falls into the zero padding reads a buffer of zeros, and a tap in the
// padding for the whole block is skipped.
//
// Memory formats: every input value is read through its tensor strides, so both
// formats run the same code; channels-last keeps a pixel's channels in one cache line
// and stores whole vectors, NCHW stores the tile's filters one by one.
//
// The readable statement of the same function is leanconv's "reference" backend (one
// dense convolution); the tests compare the two on awkward shapes.
//
// The vector width follows the compiler's target (built with -march=native where the
// compiler supports it): 16 floats with AVX-512, 8 with AVX/AVX2, 4 otherwise (SSE,
// NEON or plain scalar code: GCC/Clang vector extensions lower to whatever exists).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
#else
constexpr int kLanes = 4;
constexpr int kRegisters = 16;
#endif

typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float vec_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));

inline vec load(const float* p) { return *reinterpret_cast<const vec_unaligned*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec_unaligned*>(p) = v; }

// The geometry and the packed operands of one call.
struct Call {
  const float* x;        // (B, M, H, W) through the strides xs
  const float* wc;       // (T, M, FT): the centre tap, every channel
  const float* wn;       // (passes, KH*KW - 1, Mg, FT): the other taps, one pass's groups
  const int32_t* pass_groups;  // (passes, 2): the group of vector 0 and of vector 1 (-1: none)
  const int32_t* tile_passes;  // (T + 1,): tile t's passes are tile_passes[t] .. tile_passes[t+1]-1
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

// The input row each of NP pixels from `pixel` (the first `valid` of them real) reads at
// each tap: KH*KW x NP pointers, the zero buffer where the tap falls into the padding;
// whether any of them reads the input at each tap (`reads`, KH*KW flags); each pixel's
// output offset; and whether the block is interior (NP real pixels, no tap in the
// padding), where `bases` holds each pixel's first tap (c.other_taps is relative to
// it). Computed once per block, used by every tile. A pixel whose taps are all inside
// takes its pointers from one offset table without a test per tap (measured: the
// gather of a 64-channel 32x32 layer, batch 64, 1.65 -> 0.6-0.8 ms of a 14 ms call).
template <int NP>
bool gather_rows(const Call& c, int64_t pixel, int valid, const float** rows, char* reads, int64_t* outs,
                 const float** bases) {
  // Locals: the stores below (pointers, chars) may alias any field of c.
  const int64_t KH = c.KH, KW = c.KW, H = c.H, W = c.W, dh = c.dh, dw = c.dw, taps = KH * KW;
  const int64_t xs0 = c.xs[0], xs2 = c.xs[2], xs3 = c.xs[3];
  const int64_t reach_h = (KH - 1) * dh, reach_w = (KW - 1) * dw;
  const float* const x = c.x;
  const float* const zeros = c.zeros;
  const int64_t* const tap_offsets = c.tap_offsets;
  // The first pixel's coordinates by division, the others by counting on; pixels past
  // `valid` keep the last real one's and read nothing.
  int64_t image, oh, ow;
  if (c.position_major) {
    image = pixel % c.B; ow = (pixel / c.B) % c.Wo; oh = pixel / (c.B * c.Wo);
  } else {
    ow = pixel % c.Wo; oh = (pixel / c.Wo) % c.Ho; image = pixel / (c.Wo * c.Ho);
  }
  std::fill(reads, reads + taps, 0);
  bool interior = valid == NP, any_whole = false;
  for (int i = 0; i < NP; ++i) {
    if (i > 0 && i < valid) {
      if (c.position_major) {
        if (++image == c.B) { image = 0; if (++ow == c.Wo) { ow = 0; ++oh; } }
      } else if (++ow == c.Wo) {
        ow = 0; if (++oh == c.Ho) { oh = 0; ++image; }
      }
    }
    outs[i] = image * c.os[0] + oh * c.os[2] + ow * c.os[3];
    const int64_t row0 = oh * c.sh - c.ph, col0 = ow * c.sw - c.pw;
    if (i < valid && row0 >= 0 && row0 + reach_h < H && col0 >= 0 && col0 + reach_w < W) {
      // Every tap inside the input: the first tap plus each tap's offset.
      const float* first = x + image * xs0 + row0 * xs2 + col0 * xs3;
      for (int64_t tap = 0; tap < taps; ++tap) rows[tap * NP + i] = first + tap_offsets[tap];
      any_whole = true;
      continue;
    }
    interior = false;
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t ih = row0 + kh * dh, iw = col0 + kw * dw;
        const bool inside = i < valid && ih >= 0 && ih < H && iw >= 0 && iw < W;
        rows[(kh * KW + kw) * NP + i] = inside ? x + image * xs0 + ih * xs2 + iw * xs3 : zeros;
        reads[kh * KW + kw] |= inside;
      }
  }
  if (any_whole) std::fill(reads, reads + taps, 1);
  for (int i = 0; i < NP; ++i) bases[i] = rows[i];
  return interior;
}


// Where the j-th input value of a run of products is, relative to a pixel's pointer:
// evenly spaced (one tap's channels), or listed (every other tap's channels of an
// interior block, from the pixel's first tap).
struct Spaced {
  int64_t stride;
  int64_t operator()(int64_t j) const { return j * stride; }
};
struct Listed {
  const int64_t* at;
  int64_t operator()(int64_t j) const { return at[j]; }
};

// acc[i][v] += x[rows[i] + offset + index(j)] * w[j][v], j < count: both vectors from one value.
template <int NP, int NV, class Index>
inline void shared_channels(vec (&acc)[NP][NV], const float* const* rows, int64_t offset, Index index,
                            int64_t count, const float* w, int64_t FT) {
  const float* src[NP];
  for (int i = 0; i < NP; ++i) src[i] = rows[i] + offset;
  for (int64_t j = 0; j < count; ++j) {
    vec wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load(w + j * FT + v * kLanes);
    const int64_t at = index(j);
    for (int i = 0; i < NP; ++i) {
      const float xs = src[i][at];  // broadcast by the vector-scalar product
      for (int v = 0; v < NV; ++v) acc[i][v] += xs * wv[v];
    }
  }
}

// Two vectors of two different groups (NV == 2): vector 0 reads offset + index(j),
// vector 1 the value `gap` further on.
template <int NP, class Index>
inline void paired_channels(vec (&acc)[NP][2], const float* const* rows, int64_t offset, int64_t gap, Index index,
                            int64_t count, const float* w, int64_t FT) {
  const float* src[NP];
  for (int i = 0; i < NP; ++i) src[i] = rows[i] + offset;
  for (int64_t j = 0; j < count; ++j) {
    const vec w0 = load(w + j * FT), w1 = load(w + j * FT + kLanes);
    const int64_t at = index(j);
    for (int i = 0; i < NP; ++i) {
      const float a = src[i][at];
      acc[i][0] += a * w0;
      const float b = src[i][at + gap];
      acc[i][1] += b * w1;
    }
  }
}

// One vector of the tile (V) alone.
template <int NP, int NV, int V, class Index>
inline void single_channels(vec (&acc)[NP][NV], const float* const* rows, int64_t offset, Index index,
                            int64_t count, const float* w, int64_t FT) {
  const float* src[NP];
  for (int i = 0; i < NP; ++i) src[i] = rows[i] + offset;
  for (int64_t j = 0; j < count; ++j) {
    const vec wv = load(w + j * FT + V * kLanes);
    const int64_t at = index(j);
    for (int i = 0; i < NP; ++i) acc[i][V] += src[i][at] * wv;
  }
}

// The products of one pass's groups (g0 for vector 0, g1 for vector 1) over `count`
// weights rows: from the pixels' pointers `rows`, input values at index(j).
template <int NP, int NV, class Index>
inline void grouped_channels(const Call& c, vec (&acc)[NP][NV], int32_t g0, int32_t g1, const float* const* rows,
                             Index index, int64_t count, const float* w) {
  if (g0 == g1) {
    shared_channels<NP, NV>(acc, rows, g0 * c.kxk_base, index, count, w, c.FT);
  } else if constexpr (NV == 2) {
    if (g0 >= 0 && g1 >= 0) paired_channels<NP>(acc, rows, g0 * c.kxk_base, (g1 - g0) * c.kxk_base, index, count, w, c.FT);
    else if (g0 >= 0) single_channels<NP, NV, 0>(acc, rows, g0 * c.kxk_base, index, count, w, c.FT);
    else single_channels<NP, NV, 1>(acc, rows, g1 * c.kxk_base, index, count, w, c.FT);
  }
}

// One block: the NP pixels whose rows are `rows` (the first `valid` real) x the NV
// vectors of filter tile t.
template <int NP, int NV>
void block(const Call& c, int64_t t, int valid, const float* const* rows, const char* reads, const int64_t* outs,
           const float* const* bases, bool interior) {
  const int64_t FT = c.FT;
  const int64_t first = t * FT, count = std::min<int64_t>(FT, c.N - first);
  vec acc[NP][NV];
  for (int v = 0; v < NV; ++v) {
    const vec start = load(c.bias + first + v * kLanes);
    for (int i = 0; i < NP; ++i) acc[i][v] = start;
  }
  const int64_t taps = c.KH * c.KW;
  const int64_t centre = ((c.KH - 1) / 2) * c.KW + (c.KW - 1) / 2;
  // The centre tap: every channel, shared by all filters of the tile.
  if (reads[centre])
    shared_channels<NP, NV>(acc, rows + centre * NP, 0, Spaced{c.xs[1]}, c.M, c.wc + t * c.M * FT, FT);
  // The other taps: each pass's groups. In an interior block, groups of at most 8
  // channels run all of a pass's taps as one run of products: each tap's run would be
  // as short as starting it (measured: 5-20% faster at 4-8 channels per group, 5% slower
  // at 16).
  const int64_t Mg = c.Mg, pass_size = (taps - 1) * Mg * FT;
  interior = interior && Mg <= 8;
  for (int64_t pass = c.tile_passes[t]; pass < c.tile_passes[t + 1]; ++pass) {
    const int32_t g0 = c.pass_groups[2 * pass], g1 = c.pass_groups[2 * pass + 1];
    const float* w = c.wn + pass * pass_size;
    if (interior) {
      grouped_channels<NP, NV>(c, acc, g0, g1, bases, Listed{c.other_taps}, (taps - 1) * Mg, w);
      continue;
    }
    for (int64_t tap = 0, k = 0; tap < taps; ++tap) {
      if (tap == centre) continue;
      const float* wt = w + (k++) * Mg * FT;
      const float* const* r = rows + tap * NP;
      if (reads[tap]) grouped_channels<NP, NV>(c, acc, g0, g1, r, Spaced{c.kxk_stride}, Mg, wt);
    }
  }
  if (c.relu) {
    const vec zero = vec{};
    for (int i = 0; i < NP; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = acc[i][v] > zero ? acc[i][v] : zero;
  }
  // Store the real pixels and the real filters of the tile.
  for (int i = 0; i < valid; ++i) {
    if (!c.shifted && count == FT && c.os[1] == 1) {
      float* o = c.out + outs[i] + first;
      for (int v = 0; v < NV; ++v) store(o + v * kLanes, acc[i][v]);
    } else {
      float lanes[NV * kLanes];
      for (int v = 0; v < NV; ++v) store(lanes + v * kLanes, acc[i][v]);
      float* o = c.out + outs[i];
      for (int64_t f = 0; f < count; ++f) o[filter_of(c, first + f) * c.os[1]] = lanes[f];
    }
  }
}

template <int NP, int NV>
void run(const Call& c) {
  const int64_t pixels = c.B * c.Ho * c.Wo;
  const int64_t blocks = (pixels + NP - 1) / NP;
  // A task is a run of pixel blocks. Where all packed weights fit in the L2 cache, each
  // block runs every tile while its input is in L1; otherwise each tile runs over the
  // task's blocks, so a tile's weights stay in L1 across the run.
  constexpr int64_t kBlocksPerTask = 8;
  constexpr int64_t kL2WeightBytes = 256 * 1024;
  const int64_t passes = c.tile_passes[c.T];
  const int64_t weight_bytes = (c.M * c.T + (c.KH * c.KW - 1) * c.Mg * passes) * c.FT * int64_t(sizeof(float));
  const bool block_outer = weight_bytes <= kL2WeightBytes;
  const int64_t tasks = (blocks + kBlocksPerTask - 1) / kBlocksPerTask;
  const int64_t table = c.KH * c.KW * NP;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> rows(kBlocksPerTask * table), bases(kBlocksPerTask * NP);
    std::vector<char> reads(kBlocksPerTask * c.KH * c.KW);
    std::vector<int64_t> outs(kBlocksPerTask * NP);
    bool interior[kBlocksPerTask];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b0 = task * kBlocksPerTask, b1 = std::min(blocks, b0 + kBlocksPerTask);
      auto valid = [&](int64_t b) { return static_cast<int>(std::min<int64_t>(NP, pixels - b * NP)); };
      for (int64_t b = b0; b < b1; ++b)
        interior[b - b0] = gather_rows<NP>(c, b * NP, valid(b), rows.data() + (b - b0) * table,
                                           reads.data() + (b - b0) * c.KH * c.KW, outs.data() + (b - b0) * NP,
                                           bases.data() + (b - b0) * NP);
      auto one = [&](int64_t t, int64_t b) {
        block<NP, NV>(c, t, valid(b), rows.data() + (b - b0) * table, reads.data() + (b - b0) * c.KH * c.KW,
                      outs.data() + (b - b0) * NP, bases.data() + (b - b0) * NP, interior[b - b0]);
      };
      if (block_outer) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t t = 0; t < c.T; ++t) one(t, b);
      } else {
        for (int64_t t = 0; t < c.T; ++t)
          for (int64_t b = b0; b < b1; ++b) one(t, b);
      }
    }
  });
}

}  // namespace

// The tile width in floats for a layer of n filters: one vector where one holds them
// all, else two (tiles of three and four vectors, with fewer pixels per block,
// measured 1.3-2x slower on AVX2).
int64_t tile_width(int64_t n) { return n <= kLanes ? kLanes : 2 * kLanes; }

int64_t lanes() { return kLanes; }

torch::Tensor forward(
    const torch::Tensor& x, const torch::Tensor& wc, const torch::Tensor& wn, const torch::Tensor& pass_groups,
    const torch::Tensor& tile_passes, const c10::optional<torch::Tensor>& bias, int64_t out_channels,
    std::vector<int64_t> kernel, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, int64_t p, bool shifted, bool relu) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4, "hetconv_direct: x must be a 4-D CPU float32 tensor");
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || x.is_contiguous(), "hetconv_direct: x must be channels-last or contiguous");
  TORCH_CHECK(wc.is_contiguous() && wn.is_contiguous() && pass_groups.is_contiguous() && tile_passes.is_contiguous(),
              "hetconv_direct: packed operands must be contiguous");
  TORCH_CHECK(pass_groups.scalar_type() == at::kInt && tile_passes.scalar_type() == at::kInt,
              "hetconv_direct: the pass tables must be int32");
  TORCH_CHECK(kernel[0] % 2 == 1 && kernel[1] % 2 == 1, "hetconv_direct: the kernel size must be odd");
  Call c;
  c.B = x.size(0); c.M = x.size(1); c.H = x.size(2); c.W = x.size(3); c.N = out_channels;
  c.KH = kernel[0]; c.KW = kernel[1]; c.sh = stride[0]; c.sw = stride[1];
  c.ph = padding[0]; c.pw = padding[1]; c.dh = dilation[0]; c.dw = dilation[1];
  c.Ho = (c.H + 2 * c.ph - c.dh * (c.KH - 1) - 1) / c.sh + 1;
  c.Wo = (c.W + 2 * c.pw - c.dw * (c.KW - 1) - 1) / c.sw + 1;
  c.P = p; c.Mg = c.M / p; c.Ng = c.N / p;
  c.FT = tile_width(c.N); c.T = (c.N + c.FT - 1) / c.FT;
  TORCH_CHECK(tile_passes.numel() == c.T + 1, "hetconv_direct: tile_passes must have T + 1 entries");
  const int64_t passes = tile_passes[c.T].item<int32_t>();
  TORCH_CHECK(wc.numel() == c.T * c.M * c.FT && pass_groups.numel() == 2 * passes
              && wn.numel() == passes * (c.KH * c.KW - 1) * c.Mg * c.FT, "hetconv_direct: packed operand sizes");
  c.shifted = shifted;
  // The bias in each tile's lane order (group order), zero in padded lanes.
  std::vector<float> bias_tiles(c.T * c.FT, 0.0f);
  if (bias.has_value()) {
    const torch::Tensor b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == c.N, "hetconv_direct: bias must be float32 with N entries");
    const float* values = b.data_ptr<float>();
    for (int64_t q = 0; q < c.N; ++q) bias_tiles[q] = values[filter_of(c, q)];
  }
  for (int d = 0; d < 4; ++d) c.xs[d] = x.stride(d);
  c.kxk_base = (shifted ? 1 : c.Mg) * c.xs[1]; c.kxk_stride = (shifted ? p : 1) * c.xs[1];
  std::vector<int64_t> tap_offsets, other_taps;
  for (int64_t kh = 0; kh < c.KH; ++kh)
    for (int64_t kw = 0; kw < c.KW; ++kw) tap_offsets.push_back(kh * c.dh * c.xs[2] + kw * c.dw * c.xs[3]);
  const int64_t centre_tap = ((c.KH - 1) / 2) * c.KW + (c.KW - 1) / 2;
  for (int64_t tap = 0; tap < c.KH * c.KW; ++tap)
    if (tap != centre_tap)
      for (int64_t j = 0; j < c.Mg; ++j) other_taps.push_back(tap_offsets[tap] + j * c.kxk_stride);
  c.tap_offsets = tap_offsets.data();
  c.other_taps = other_taps.data();
  c.relu = relu;
  // Blocks run position-major on maps of at most 4x4 output pixels, in either format
  // (measured: 2x2 and 4x4 maps faster that way, 8x8 maps faster row-major, where a
  // block's pixels share most of their input).
  constexpr int64_t kSmallMap = 16;
  c.position_major = c.B > 1 && std::max<int64_t>(c.Ho, 0) * std::max<int64_t>(c.Wo, 0) <= kSmallMap;
  auto out = torch::empty({c.B, c.N, std::max<int64_t>(c.Ho, 0), std::max<int64_t>(c.Wo, 0)},
                          x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                  : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  for (int d = 0; d < 4; ++d) c.os[d] = out.stride(d);
  // Zeros wherever a padded tap reads: channel k at k * xs[1]. For NCHW that spans an
  // image plane per channel; calloc leaves large buffers to the system's zero pages.
  std::unique_ptr<float, decltype(&std::free)> zeros(
      static_cast<float*>(std::calloc((c.M - 1) * c.xs[1] + 1, sizeof(float))), &std::free);
  TORCH_CHECK(zeros != nullptr, "hetconv_direct: out of memory for the padding buffer");
  c.x = x.data_ptr<float>(); c.wc = wc.data_ptr<float>(); c.wn = wn.data_ptr<float>();
  c.pass_groups = pass_groups.data_ptr<int32_t>(); c.tile_passes = tile_passes.data_ptr<int32_t>();
  c.bias = bias_tiles.data(); c.zeros = zeros.get();
  c.out = out.data_ptr<float>();
  // Register blocking: NP pixels x NV vectors of accumulators, leaving registers for the
  // weights and the broadcast values.
  if (c.FT == kLanes) run<12, 1>(c);
  else if (kRegisters >= 32) run<8, 2>(c);
  else run<6, 2>(c);
  return out;
}

// The kernel as the CPU implementation of the torch op leanconv::hetconv_direct_packed
// (its schema and fake implementation are defined in Python, leanconv/ops/hetconv_direct.py):
// a dispatcher call of a few microseconds, where a Python-implemented op costs tens.
torch::Tensor packed_op(
    const torch::Tensor& x, const torch::Tensor& wc, const torch::Tensor& wn, const torch::Tensor& pass_groups,
    const torch::Tensor& tile_passes, const c10::optional<torch::Tensor>& bias, int64_t out_channels,
    c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    int64_t p, c10::string_view layout, bool relu) {
  const bool readable = x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.is_contiguous();
  return forward(readable ? x : x.contiguous(), wc, wn, pass_groups, tile_passes, bias, out_channels, kernel.vec(),
                 stride.vec(), padding.vec(), dilation.vec(), p, layout == "shifted", relu);
}

TORCH_LIBRARY_IMPL(leanconv, CPU, m) {
  m.impl("hetconv_direct_packed", &packed_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "direct HetConv forward (float32, channels-last or contiguous)");
  m.def("tile_width", &tile_width, "filters per register tile for a layer of n filters");
  m.def("lanes", &lanes, "floats per vector register in this build");
}
