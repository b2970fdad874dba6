// Direct HetConv convolution for CPUs: one pass over a channels-last float32 input.
//
// HetConv (Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120): filter n of
// group g has KxK kernels on the group's Mg = M/P input channels and 1x1 kernels,
// read under the window's centre, on the other M - Mg channels.
//
// The kernel computes, for a block of NP output pixels (flattened over batch, rows and
// columns, so small maps and borders need no special case) and one tile of NV vectors
// of a group's filters, both parts in the same registers:
//
//   acc[i][f] = bias[f]
//             + sum over taps (kh, kw), channels j < Mg:  x[pixel i + tap, c0 + j*cs] * wk[tap][j][f]
//             + sum over k < Mp (the other channels):      x[centre of pixel i, pc[k]] * wp[k][f]
//
// then applies the optional ReLU and stores the tile. Every input value is a scalar
// broadcast; every weight load is one vector of filters reused by NP pixels. A tap that
// falls into the zero padding reads a buffer of zeros. The readable statement of the
// same function is leanconv's "reference" backend (one dense convolution); the tests
// compare the two on awkward shapes.
//
// The vector width follows the compiler's target (built with -march=native where the
// compiler supports it): 16 floats with AVX-512, 8 with AVX/AVX2, 4 otherwise (SSE,
// NEON or plain scalar code: GCC/Clang vector extensions lower to whatever exists).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
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
  const float* x;      // (B, H, W, M)
  const float* wk;     // (P, T, KH*KW, Mg, FT)
  const float* wp;     // (P, T, Mp, FT)
  const float* bias;   // (N,) in filter order, or null
  const int32_t* pc;   // (P, Mp): the input channel of pointwise row k of group g
  const float* zeros;  // M zeros: what a tap in the padding reads
  float* out;          // (B, Ho, Wo, N)
  int64_t B, H, W, M, N, Ho, Wo;
  int64_t KH, KW, sh, sw, ph, pw, dh, dw, ch, cw;  // ch, cw: the centre's offset in the window
  int64_t P, Mg, Ng, Mp, T, FT;
  int64_t kxk_stride;     // channel j of group g is g*kxk_base + j*kxk_stride
  int64_t kxk_base;
  int64_t filter_stride;  // filter i of group g is g*filter_base + i*filter_stride
  int64_t filter_base;
  bool relu;
  // Pixel order: row-major (image, row, column), or position-major (row, column, image)
  // for small maps, where every image's pixel at one position has the same taps in the
  // padding: blocks of one position skip those taps (a 2x2 map has 5/9 of its taps there).
  bool position_major;
};

// The input row each of NP pixels from `pixel` (the first `valid` of them real) reads at
// each tap, then at the window's centre: (KH*KW + 1) x NP pointers, the zero buffer where
// the tap falls into the padding; and each pixel's output offset. Computed once per
// block, used by every group and tile.
template <int NP>
void gather_rows(const Call& c, int64_t pixel, int valid, const float** rows, int64_t* outs) {
  const int64_t taps = c.KH * c.KW;
  for (int i = 0; i < NP; ++i) {
    const int64_t q = pixel + (i < valid ? i : 0);
    int64_t image, oh, ow;
    if (c.position_major) {
      image = q % c.B; ow = (q / c.B) % c.Wo; oh = q / (c.B * c.Wo);
    } else {
      ow = q % c.Wo; oh = (q / c.Wo) % c.Ho; image = q / (c.Wo * c.Ho);
    }
    outs[i] = ((image * c.Ho + oh) * c.Wo + ow) * c.N;
    const int64_t row0 = oh * c.sh - c.ph, col0 = ow * c.sw - c.pw;
    auto at = [&](int64_t dy, int64_t dx) -> const float* {
      const int64_t ih = row0 + dy, iw = col0 + dx;
      if (i >= valid || ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) return c.zeros;
      return c.x + ((image * c.H + ih) * c.W + iw) * c.M;
    };
    for (int64_t kh = 0; kh < c.KH; ++kh)
      for (int64_t kw = 0; kw < c.KW; ++kw) rows[(kh * c.KW + kw) * NP + i] = at(kh * c.dh, kw * c.dw);
    rows[taps * NP + i] = at(c.ch, c.cw);
  }
}

// One block: the NP pixels whose rows are `rows` (the first `valid` real) x NV vectors
// of filters of tile t of group g; a tap in the padding for all of them is skipped.
template <int NP, int NV>
void block(const Call& c, int64_t g, int64_t t, int valid, const float* const* rows, const int64_t* outs) {
  const int64_t FT = c.FT;
  const int64_t first = t * FT, count = std::min<int64_t>(FT, c.Ng - first);
  const int64_t n0 = g * c.filter_base + first * c.filter_stride;
  vec acc[NP][NV];
  {
    float lanes[NV * kLanes] = {};
    if (c.bias != nullptr)
      for (int64_t f = 0; f < count; ++f) lanes[f] = c.bias[n0 + f * c.filter_stride];
    for (int v = 0; v < NV; ++v) {
      const vec start = load(lanes + v * kLanes);
      for (int i = 0; i < NP; ++i) acc[i][v] = start;
    }
  }

  // KxK part: the group's channels, every tap.
  const int64_t c0 = g * c.kxk_base, cs = c.kxk_stride, Mg = c.Mg;
  const float* wk = c.wk + (g * c.T + t) * c.KH * c.KW * Mg * FT;
  const int64_t taps = c.KH * c.KW;
  for (int64_t tap = 0; tap < taps; ++tap) {
    bool reads = false;
    for (int i = 0; i < NP; ++i) reads |= rows[tap * NP + i] != c.zeros;
    if (reads) {
      const float* src[NP];
      for (int i = 0; i < NP; ++i) src[i] = rows[tap * NP + i] + c0;
      const float* w = wk + tap * Mg * FT;
      for (int64_t j = 0; j < Mg; ++j) {
        vec wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = load(w + j * FT + v * kLanes);
        for (int i = 0; i < NP; ++i) {
          const float xs = src[i][j * cs];  // broadcast by the vector-scalar product
          for (int v = 0; v < NV; ++v) acc[i][v] += xs * wv[v];
        }
      }
    }
  }
  // 1x1 part: the other channels, under the window's centre.
  {
    const float* src[NP];
    for (int i = 0; i < NP; ++i) src[i] = rows[taps * NP + i];
    const float* w = c.wp + (g * c.T + t) * c.Mp * FT;
    const int32_t* pc = c.pc + g * c.Mp;
    for (int64_t k = 0; k < c.Mp; ++k) {
      const int64_t channel = pc[k];
      vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load(w + k * FT + v * kLanes);
      for (int i = 0; i < NP; ++i) {
        const float xs = src[i][channel];
        for (int v = 0; v < NV; ++v) acc[i][v] += xs * wv[v];
      }
    }
  }
  if (c.relu) {
    const vec zero = vec{};
    for (int i = 0; i < NP; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = acc[i][v] > zero ? acc[i][v] : zero;
  }
  // Store the real pixels and the real filters of the tile.
  for (int i = 0; i < valid; ++i) {
    float* o = c.out + outs[i] + n0;
    if (c.filter_stride == 1 && count == FT) {
      for (int v = 0; v < NV; ++v) store(o + v * kLanes, acc[i][v]);
    } else {
      float lanes[NV * kLanes];
      for (int v = 0; v < NV; ++v) store(lanes + v * kLanes, acc[i][v]);
      for (int64_t f = 0; f < count; ++f) o[f * c.filter_stride] = lanes[f];
    }
  }
}

template <int NP, int NV>
void run(const Call& c) {
  const int64_t pixels = c.B * c.Ho * c.Wo;
  const int64_t blocks = (pixels + NP - 1) / NP;
  // A task is a run of pixel blocks. Where all packed weights fit in the L2 cache, each
  // block runs every group and tile while its input is in L1; otherwise each group and
  // tile runs over the task's blocks, so a tile's weights stay in L1 across the run.
  constexpr int64_t kBlocksPerTask = 8;
  constexpr int64_t kL2WeightBytes = 256 * 1024;
  const bool block_outer = (c.KH * c.KW * c.Mg + c.Mp) * c.FT * c.T * c.P * int64_t(sizeof(float)) <= kL2WeightBytes;
  const int64_t tasks = (blocks + kBlocksPerTask - 1) / kBlocksPerTask;
  const int64_t table = (c.KH * c.KW + 1) * NP;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> rows(kBlocksPerTask * table);
    std::vector<int64_t> outs(kBlocksPerTask * NP);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b0 = task * kBlocksPerTask, b1 = std::min(blocks, b0 + kBlocksPerTask);
      auto valid = [&](int64_t b) { return static_cast<int>(std::min<int64_t>(NP, pixels - b * NP)); };
      for (int64_t b = b0; b < b1; ++b)
        gather_rows<NP>(c, b * NP, valid(b), rows.data() + (b - b0) * table, outs.data() + (b - b0) * NP);
      auto one = [&](int64_t g, int64_t t, int64_t b) {
        block<NP, NV>(c, g, t, valid(b), rows.data() + (b - b0) * table, outs.data() + (b - b0) * NP);
      };
      if (block_outer) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t g = 0; g < c.P; ++g)
            for (int64_t t = 0; t < c.T; ++t) one(g, t, b);
      } else {
        for (int64_t g = 0; g < c.P; ++g)
          for (int64_t t = 0; t < c.T; ++t)
            for (int64_t b = b0; b < b1; ++b) one(g, t, b);
      }
    }
  });
}


}  // namespace

// The tile width in floats for a group of `ng` filters: one vector for groups of at most
// one vector's width, else two (tiles of three and four vectors, with fewer pixels per
// block, measured 1.3-2x slower on AVX2).
int64_t tile_width(int64_t ng) {
  if (ng <= kLanes) return kLanes;
  return 2 * kLanes;
}

int64_t lanes() { return kLanes; }

torch::Tensor forward(
    const torch::Tensor& x, const torch::Tensor& wk, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias,
    const torch::Tensor& pc, int64_t out_channels, std::vector<int64_t> kernel, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t p, bool shifted, bool relu) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4, "hetconv_direct: x must be a 4-D CPU float32 tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "hetconv_direct: x must be channels-last");
  TORCH_CHECK(wk.is_contiguous() && wp.is_contiguous() && pc.is_contiguous(), "hetconv_direct: packed operands must be contiguous");
  TORCH_CHECK(pc.scalar_type() == at::kInt, "hetconv_direct: pc must be int32");
  Call c;
  c.B = x.size(0); c.M = x.size(1); c.H = x.size(2); c.W = x.size(3); c.N = out_channels;
  c.KH = kernel[0]; c.KW = kernel[1]; c.sh = stride[0]; c.sw = stride[1];
  c.ph = padding[0]; c.pw = padding[1]; c.dh = dilation[0]; c.dw = dilation[1];
  c.Ho = (c.H + 2 * c.ph - c.dh * (c.KH - 1) - 1) / c.sh + 1;
  c.Wo = (c.W + 2 * c.pw - c.dw * (c.KW - 1) - 1) / c.sw + 1;
  c.ch = c.dh * (c.KH - 1) / 2; c.cw = c.dw * (c.KW - 1) / 2;
  c.P = p; c.Mg = c.M / p; c.Ng = c.N / p; c.Mp = c.M - c.Mg;
  c.FT = wk.size(-1); c.T = wk.size(1);
  TORCH_CHECK(c.FT == tile_width(c.Ng) && c.T == (c.Ng + c.FT - 1) / c.FT, "hetconv_direct: packed tile shape");
  TORCH_CHECK(wk.numel() == c.P * c.T * c.KH * c.KW * c.Mg * c.FT && wp.numel() == c.P * c.T * c.Mp * c.FT
              && pc.numel() == c.P * c.Mp, "hetconv_direct: packed operand sizes");
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == c.N, "hetconv_direct: bias must be float32 with N entries");
  }
  c.kxk_base = shifted ? 1 : c.Mg; c.kxk_stride = shifted ? p : 1;
  c.filter_base = shifted ? 1 : c.Ng; c.filter_stride = shifted ? p : 1;
  c.relu = relu;
  constexpr int64_t kSmallMap = 64;  // output pixels per image up to which blocks run position-major
  c.position_major = c.B > 1 && std::max<int64_t>(c.Ho, 0) * std::max<int64_t>(c.Wo, 0) <= kSmallMap;
  auto out = torch::empty({c.B, c.N, std::max<int64_t>(c.Ho, 0), std::max<int64_t>(c.Wo, 0)},
                          x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  auto zeros = torch::zeros({c.M}, x.options());
  c.x = x.data_ptr<float>(); c.wk = wk.data_ptr<float>(); c.wp = wp.data_ptr<float>();
  c.bias = b.defined() ? b.data_ptr<float>() : nullptr; c.pc = pc.data_ptr<int32_t>(); c.zeros = zeros.data_ptr<float>();
  c.out = out.data_ptr<float>();
  // Register blocking: NP pixels x NV vectors of accumulators, leaving registers for the
  // weights and the broadcast value.
  const int nv = static_cast<int>(c.FT / kLanes);
  if (kRegisters >= 32) {
    if (nv == 1) run<12, 1>(c); else run<8, 2>(c);
  } else {
    if (nv == 1) run<12, 1>(c); else run<6, 2>(c);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "direct HetConv forward (channels-last float32)");
  m.def("tile_width", &tile_width, "filters per register tile for a group of ng filters");
  m.def("lanes", &lanes, "floats per vector register in this build");
}
