// The direct HetConv kernel's torch glue: argument checks, the call's geometry, the
// choice of ISA at run time, and its registration as the CPU implementation of the op
// leanconv::hetconv_direct_packed. The algorithm: hetconv_direct.h.
//
// ISAs: "avx512", "avx2" and "portable" (hetconv_direct_<isa>.cpp). The caller names one
// (leanconv/ops/hetconv_direct.py chooses it from torch's CPU capability, which
// ATEN_CPU_CAPABILITY narrows, or LEANCONV_CPU_ISA) and packs the weights for its vector
// width; the call fails with a clear error, never an illegal instruction, where the CPU
// lacks it. This file is compiled for the baseline ISA.

#include <torch/extension.h>

#include "hetconv_direct.h"
#include "separable_direct.h"

#include <cstdlib>
#include <memory>
#include <string>

using leanconv_direct::Call;
using leanconv_direct::filter_of;

namespace {

// Whether this CPU (and its operating system, which must save the wider registers) runs
// `isa`'s code; GCC and Clang's __builtin_cpu_supports check both.
bool cpu_runs(const std::string& isa) {
  if (isa == "portable") return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx2") return avx2;
  if (isa == "avx512")
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
           && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

const std::vector<std::string> kIsas = {"avx512", "avx2", "portable"};

void check_isa(const std::string& isa) {
  TORCH_CHECK(std::find(kIsas.begin(), kIsas.end(), isa) != kIsas.end(),
              "hetconv_direct: isa must be one of 'avx512', 'avx2', 'portable', got '", isa, "'");
  TORCH_CHECK(cpu_runs(isa), "hetconv_direct: this CPU cannot run the '", isa,
              "' kernel (its weights were packed for it: pack them again on this machine); it runs ",
              cpu_runs("avx512") ? "avx512, " : "", cpu_runs("avx2") ? "avx2, " : "", "portable");
}

// dst[b] = src[b]^T for B row-major (rows x cols) matrices, by `isa`'s code: NCHW <->
// channels-last copies (at::Tensor::contiguous(ChannelsLast) measured 5.9 ms for a 16 MB
// NCHW tensor here).
void transpose_images(const std::string& isa, const float* src, float* dst, int64_t B, int64_t rows, int64_t cols) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == "avx512") return leanconv_direct::avx512::transpose(src, dst, B, rows, cols);
  if (isa == "avx2") return leanconv_direct::avx2::transpose(src, dst, B, rows, cols);
#endif
  leanconv_direct::portable::transpose(src, dst, B, rows, cols);
}

// Memory for the NCHW path's two channels-last temporaries that outlives the call (one
// buffer per calling thread, grown to the largest call's need and kept, as oneDNN keeps a
// scratchpad): fresh allocations of a few MB are new pages that fault on first touch in
// every call (measured: 16 channels 32x32 batch 64, interleaved with other calls, 5.8 ms
// per call with fresh temporaries against 1.2 ms channels-last).
float* scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

// A channels-last tensor over `data` (not owned).
torch::Tensor channels_last_view(float* data, at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t C = sizes[1], H = sizes[2], W = sizes[3];
  return torch::from_blob(data, sizes, {H * W * C, 1, W * C, C}, options);
}

// Blocks run position-major on maps of at most 4x4 output pixels, in either format
// (measured: 2x2 and 4x4 maps faster that way, 8x8 maps faster row-major, where a
// block's pixels share most of their input).
constexpr int64_t kSmallMap = 16;

}  // namespace

// Floats per vector register of an ISA's kernel.
int64_t lanes(const std::string& isa) {
  check_isa(isa);
  return isa == "avx512" ? leanconv_direct::avx512::kLanes
         : isa == "avx2" ? leanconv_direct::avx2::kLanes
                         : leanconv_direct::portable::kLanes;
}

// The ISAs this CPU runs, widest first ("portable" last, always).
std::vector<std::string> runnable_isas() {
  std::vector<std::string> out;
  for (const auto& isa : kIsas)
    if (cpu_runs(isa)) out.push_back(isa);
  return out;
}

// The tile width in floats for a layer of n filters: one vector where one holds them
// all, else two (tiles of three and four vectors, with fewer pixels per block,
// measured 1.3-2x slower on AVX2).
int64_t tile_width(int64_t n, const std::string& isa) {
  const int64_t width = lanes(isa);
  return n <= width ? width : 2 * width;
}

torch::Tensor forward(
    const torch::Tensor& input, const torch::Tensor& wc, const torch::Tensor& wn, const torch::Tensor& pass_groups,
    const torch::Tensor& tile_passes, const torch::Tensor& lane_offsets, const torch::Tensor& lane_index,
    const c10::optional<torch::Tensor>& bias, int64_t out_channels, std::vector<int64_t> kernel,
    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t p, bool shifted,
    bool relu, const std::string& isa) {
  check_isa(isa);
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4,
              "hetconv_direct: x must be a 4-D CPU float32 tensor");
  const bool channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || input.is_contiguous(), "hetconv_direct: x must be channels-last or contiguous");
  TORCH_CHECK(wc.is_contiguous() && wn.is_contiguous() && pass_groups.is_contiguous() && tile_passes.is_contiguous(),
              "hetconv_direct: packed operands must be contiguous");
  TORCH_CHECK(pass_groups.scalar_type() == at::kInt && tile_passes.scalar_type() == at::kInt,
              "hetconv_direct: the pass tables must be int32");
  TORCH_CHECK(kernel[0] % 2 == 1 && kernel[1] % 2 == 1, "hetconv_direct: the kernel size must be odd");
  Call c;
  c.B = input.size(0); c.M = input.size(1); c.H = input.size(2); c.W = input.size(3); c.N = out_channels;
  c.KH = kernel[0]; c.KW = kernel[1]; c.sh = stride[0]; c.sw = stride[1];
  c.ph = padding[0]; c.pw = padding[1]; c.dh = dilation[0]; c.dw = dilation[1];
  c.Ho = (c.H + 2 * c.ph - c.dh * (c.KH - 1) - 1) / c.sh + 1;
  c.Wo = (c.W + 2 * c.pw - c.dw * (c.KW - 1) - 1) / c.sw + 1;
  c.P = p; c.Mg = c.M / p; c.Ng = c.N / p;
  c.FT = tile_width(c.N, isa); c.T = (c.N + c.FT - 1) / c.FT;
  TORCH_CHECK(tile_passes.numel() == c.T + 1, "hetconv_direct: tile_passes must have T + 1 entries");
  const int64_t passes = tile_passes[c.T].item<int32_t>();
  TORCH_CHECK(wc.numel() == c.T * c.M * c.FT && pass_groups.numel() == 2 * passes
              && wn.numel() == passes * (c.KH * c.KW - 1) * c.Mg * c.FT, "hetconv_direct: packed operand sizes");
  const bool permuted = lane_index.numel() > 0;
  if (permuted) {  // every load must stay within a pixel's channels
    const int64_t width = lanes(isa);
    TORCH_CHECK(lane_offsets.scalar_type() == at::kInt && lane_index.scalar_type() == at::kInt
                && lane_offsets.is_contiguous() && lane_index.is_contiguous()
                && passes == c.T && lane_offsets.numel() == c.T * (c.FT / width) * c.Mg
                && lane_index.numel() == lane_offsets.numel() * width, "hetconv_direct: lane table sizes");
    const int32_t* offsets = lane_offsets.data_ptr<int32_t>();
    const int32_t* index = lane_index.data_ptr<int32_t>();
    for (int64_t k = 0; k < lane_offsets.numel(); ++k)
      TORCH_CHECK(offsets[k] >= 0 && offsets[k] + width <= c.M, "hetconv_direct: lane offset out of range");
    for (int64_t k = 0; k < lane_index.numel(); ++k)
      TORCH_CHECK(index[k] >= 0 && index[k] < width, "hetconv_direct: lane index out of range");
  }
  const std::vector<int64_t> out_sizes = {c.B, c.N, std::max<int64_t>(c.Ho, 0), std::max<int64_t>(c.Wo, 0)};
  const int64_t out_floats = c.B * c.N * out_sizes[2] * out_sizes[3];
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (out_floats == 0) return torch::empty(out_sizes, input.options().memory_format(format));
  c.position_major = c.B > 1 && out_sizes[2] * out_sizes[3] <= kSmallMap;
  // An NCHW input is read through a channels-last copy, and the output written through
  // one, where the kernel would read it badly: permuted loads read a pixel's channels as
  // one vector, and position-major blocks (maps of at most kSmallMap output pixels) hold
  // pixels of different images, far apart in NCHW (measured: 512 channels, 4x4 maps,
  // batch 64: 9.1 ms in place, 6.2 ms through the copies; at 8x8 to 56x56 maps in place
  // is 5-25% faster).
  const bool through_copies = !channels_last && (permuted || c.position_major);
  float* temporaries = through_copies ? scratch(input.numel() + out_floats) : nullptr;
  torch::Tensor x = input;
  if (through_copies) {
    x = channels_last_view(temporaries, input.sizes(), input.options());
    transpose_images(isa, input.data_ptr<float>(), x.data_ptr<float>(), c.B, c.M, c.H * c.W);
  }
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
  auto out = through_copies ? channels_last_view(temporaries + input.numel(), out_sizes, x.options())
                            : torch::empty(out_sizes, x.options().memory_format(format));
  for (int d = 0; d < 4; ++d) c.os[d] = out.stride(d);
  // Zeros wherever a padded tap reads: channel k at k * xs[1]. For NCHW that spans an
  // image plane per channel; calloc leaves large buffers to the system's zero pages.
  std::unique_ptr<float, decltype(&std::free)> zeros(
      static_cast<float*>(std::calloc((c.M - 1) * c.xs[1] + 1, sizeof(float))), &std::free);
  TORCH_CHECK(zeros != nullptr, "hetconv_direct: out of memory for the padding buffer");
  c.x = x.data_ptr<float>(); c.wc = wc.data_ptr<float>(); c.wn = wn.data_ptr<float>();
  c.pass_groups = pass_groups.data_ptr<int32_t>(); c.tile_passes = tile_passes.data_ptr<int32_t>();
  c.lane_offsets = permuted ? lane_offsets.data_ptr<int32_t>() : nullptr;
  c.lane_index = permuted ? lane_index.data_ptr<int32_t>() : nullptr;
  c.bias = bias_tiles.data(); c.zeros = zeros.get();
  c.out = out.data_ptr<float>();
#if defined(__x86_64__) || defined(__i386__)
  if (isa == "avx512") leanconv_direct::avx512::run(c);
  else if (isa == "avx2") leanconv_direct::avx2::run(c);
  else
#endif
    leanconv_direct::portable::run(c);
  if (through_copies) {
    auto nchw = torch::empty(out.sizes(), out.options());
    transpose_images(isa, out.data_ptr<float>(), nchw.data_ptr<float>(), c.B, c.Ho * c.Wo, c.N);
    return nchw;
  }
  return out;
}

// A copy of a 4-D float32 tensor in the other memory format (NCHW <-> channels-last),
// by `isa`'s transposition: the gradients of an NCHW layer run on channels-last copies.
torch::Tensor relayout(const torch::Tensor& x, const std::string& isa) {
  check_isa(isa);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "relayout: x must be a 4-D CPU float32 tensor");
  const int64_t B = x.size(0), C = x.size(1), pixels = x.size(2) * x.size(3);
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) {
    auto out = torch::empty(x.sizes(), x.options());
    transpose_images(isa, x.data_ptr<float>(), out.data_ptr<float>(), B, pixels, C);
    return out;
  }
  const torch::Tensor source = x.contiguous();
  auto out = torch::empty_like(source, at::MemoryFormat::ChannelsLast);
  transpose_images(isa, source.data_ptr<float>(), out.data_ptr<float>(), B, C, pixels);
  return out;
}

// The kernel as the CPU implementation of the torch op leanconv::hetconv_direct_packed
// (its schema and fake implementation are defined in Python, leanconv/ops/hetconv_direct.py):
// a dispatcher call of a few microseconds, where a Python-implemented op costs tens.
torch::Tensor packed_op(
    const torch::Tensor& x, const torch::Tensor& wc, const torch::Tensor& wn, const torch::Tensor& pass_groups,
    const torch::Tensor& tile_passes, const torch::Tensor& lane_offsets, const torch::Tensor& lane_index,
    const c10::optional<torch::Tensor>& bias, int64_t out_channels, c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    int64_t p, c10::string_view layout, bool relu, c10::string_view isa) {
  const bool readable = x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.is_contiguous();
  return forward(readable ? x : x.contiguous(), wc, wn, pass_groups, tile_passes, lane_offsets, lane_index, bias,
                 out_channels, kernel.vec(),
                 stride.vec(), padding.vec(), dilation.vec(), p, layout == "shifted", relu, std::string(isa));
}

namespace {

// A packed 1x1 convolution of a separable call: `w` (T, K, FT) for `isa`, its bias (T * FT).
leanconv_direct::Pointwise pointwise_operand(const torch::Tensor& w, const torch::Tensor& bias, int64_t K, int64_t N,
                                             const std::string& isa, const char* what) {
  leanconv_direct::Pointwise p;
  p.K = K; p.N = N; p.FT = tile_width(N, isa); p.T = (N + p.FT - 1) / p.FT;
  TORCH_CHECK(w.is_contiguous() && bias.is_contiguous() && w.scalar_type() == at::kFloat
              && bias.scalar_type() == at::kFloat, "separable_direct: packed operands must be contiguous float32");
  TORCH_CHECK(w.dim() == 3 && w.size(0) == p.T && w.size(1) == K && w.size(2) == p.FT && bias.numel() == p.T * p.FT,
              "separable_direct: the packed ", what, " does not match the input's channels and the ISA '", isa,
              "' (pack the weights for it)");
  p.w = w.data_ptr<float>(); p.bias = bias.data_ptr<float>();
  return p;
}

}  // namespace

// The direct separable kernels (separable_direct.h) on weights packed by
// leanconv/ops/separable_direct.py: `wdw` (KH*KW, Dv), each 1x1 (T, K, FT) with its bias
// (T * FT), `depthwise_bias` (T * FT). With `first_pointwise` (BSConv-S), a first 1x1 runs
// before the pointwise-first pair. An NCHW input is read through a channels-last copy and
// the output returned in NCHW.
torch::Tensor separable_op(const torch::Tensor& input, const torch::Tensor& wdw, const torch::Tensor& wpw,
                           const torch::Tensor& pointwise_bias, const torch::Tensor& depthwise_bias,
                           const c10::optional<torch::Tensor>& first_pointwise,
                           const c10::optional<torch::Tensor>& first_pointwise_bias, int64_t out_channels,
                           c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
                           c10::IntArrayRef dilation, bool pointwise_first, bool relu, c10::string_view isa_name) {
  const std::string isa(isa_name);
  check_isa(isa);
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4,
              "separable_direct: x must be a 4-D CPU float32 tensor");
  TORCH_CHECK(wdw.is_contiguous() && depthwise_bias.is_contiguous() && wdw.scalar_type() == at::kFloat
              && depthwise_bias.scalar_type() == at::kFloat, "separable_direct: packed operands must be contiguous float32");
  TORCH_CHECK(first_pointwise.has_value() == first_pointwise_bias.has_value(),
              "separable_direct: the first 1x1 needs its weights and its bias");
  TORCH_CHECK(!first_pointwise.has_value() || pointwise_first,
              "separable_direct: a first 1x1 runs only before a pointwise-first pair");
  leanconv_direct::SeparableCall c;
  c.B = input.size(0); c.M = input.size(1); c.H = input.size(2); c.W = input.size(3); c.N = out_channels;
  c.KH = kernel[0]; c.KW = kernel[1]; c.sh = stride[0]; c.sw = stride[1];
  c.ph = padding[0]; c.pw = padding[1]; c.dh = dilation[0]; c.dw = dilation[1];
  TORCH_CHECK(c.KH * c.KW <= leanconv_direct::kSeparableMaxTaps, "separable_direct: at most ",
              leanconv_direct::kSeparableMaxTaps, " taps, got a ", c.KH, "x", c.KW, " kernel");
  c.Ho = (c.H + 2 * c.ph - c.dh * (c.KH - 1) - 1) / c.sh + 1;
  c.Wo = (c.W + 2 * c.pw - c.dw * (c.KW - 1) - 1) / c.sw + 1;
  const int64_t width = lanes(isa);
  c.pointwise_first = pointwise_first;
  c.two_pointwise = first_pointwise.has_value();
  c.D = pointwise_first ? c.N : c.M;
  c.Dv = (c.D + width - 1) / width * width;
  int64_t pointwise_inputs = c.M;
  c.Kv0 = 0;
  if (c.two_pointwise) {
    TORCH_CHECK(first_pointwise->dim() == 3, "separable_direct: the packed first 1x1 must be 3-D");
    const int64_t mid = first_pointwise->size(1) == c.M ? wpw.size(1) : -1;  // M' = the second 1x1's inputs
    TORCH_CHECK(mid > 0, "separable_direct: the packed first 1x1 does not match the input's channels");
    c.first_pointwise = pointwise_operand(*first_pointwise, *first_pointwise_bias, c.M, mid, isa, "first 1x1");
    c.Kv0 = (mid + width - 1) / width * width;
    pointwise_inputs = mid;
  }
  c.pointwise = pointwise_operand(wpw, pointwise_bias, pointwise_inputs, c.N, isa, "1x1");
  TORCH_CHECK(wdw.dim() == 2 && wdw.size(0) == c.KH * c.KW && wdw.size(1) == c.Dv
              && depthwise_bias.numel() == c.pointwise.T * c.pointwise.FT,
              "separable_direct: the packed depthwise weights do not match the channels and the ISA '", isa,
              "' (pack the weights for it)");
  const std::vector<int64_t> out_sizes = {c.B, c.N, std::max<int64_t>(c.Ho, 0), std::max<int64_t>(c.Wo, 0)};
  auto out = torch::empty(out_sizes, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const bool channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (out.numel() == 0) return channels_last ? out : out.contiguous();
  const torch::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  for (int d = 0; d < 4; ++d) { c.xs[d] = x.stride(d); c.os[d] = out.stride(d); }
  std::vector<float> zeros(std::max({c.M, c.Dv, c.Kv0}), 0.0f);
  const int64_t scratch_floats = pointwise_first ? c.B * c.H * c.W * c.Dv : 0;
  float* buffers = pointwise_first ? scratch(scratch_floats + c.B * c.H * c.W * c.Kv0) : nullptr;
  c.scratch = buffers;
  c.scratch0 = c.two_pointwise ? buffers + scratch_floats : nullptr;
  c.x = x.data_ptr<float>(); c.wdw = wdw.data_ptr<float>(); c.depthwise_bias = depthwise_bias.data_ptr<float>();
  c.zeros = zeros.data(); c.out = out.data_ptr<float>(); c.relu = relu;
#if defined(__x86_64__) || defined(__i386__)
  if (isa == "avx512") leanconv_direct::avx512::run_separable(c);
  else if (isa == "avx2") leanconv_direct::avx2::run_separable(c);
  else
#endif
    leanconv_direct::portable::run_separable(c);
  return channels_last ? out : out.contiguous();
}

TORCH_LIBRARY_IMPL(leanconv, CPU, m) {
  m.impl("hetconv_direct_packed", &packed_op);
  m.impl("separable_direct_packed", &separable_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "direct HetConv forward (float32, channels-last or contiguous)");
  m.def("tile_width", &tile_width, "filters per register tile of an ISA's kernel for a layer of n filters");
  m.def("lanes", &lanes, "floats per vector register of an ISA's kernel");
  m.def("runnable_isas", &runnable_isas, "the ISAs this CPU runs, widest first");
  m.def("relayout", &relayout, "a copy in the other memory format (NCHW <-> channels-last)");
}
