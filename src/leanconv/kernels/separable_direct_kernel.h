// The direct depthwise-separable kernel (the algorithm: separable_direct.h), written once
// for a vector of kLanes floats. Not a header of its own: hetconv_direct_isa.h includes it
// inside an ISA's namespace after hetconv_direct_kernel.h (whose vec, load and store it
// uses), with the ISA's target options on.

// Pixels per block: NP x NV accumulators plus NV weight vectors fit the registers.
constexpr int kSeparablePixels = kRegisters >= 32 ? 12 : 6;

// Block `block` of pixels against filter tiles [tile_begin, tile_end): the depthwise
// results into `buffer` (kSeparablePixels x c.Mv floats), then each tile's pointwise sums.
template <int NV>
void separable_block(const SeparableCall& c, int64_t block, int64_t tile_begin, int64_t tile_end, float* buffer) {
  constexpr int NP = kSeparablePixels;
  const int64_t taps = c.KH * c.KW, pixels = c.B * c.Ho * c.Wo, M = c.M, Mv = c.Mv, FT = c.FT;
  const int64_t first = block * NP;
  const int valid = static_cast<int>(std::min<int64_t>(NP, pixels - first));
  const float* rows[kSeparableMaxTaps * NP];  // rows[tap * NP + i]: pixel i's input at the tap
  int64_t outs[NP];
  // 1. Depthwise: each pixel's taps through pointers (pixels past `valid` read zeros), then
  // per vector of channels NP independent accumulators, one weight load per tap.
  int64_t ow = first % c.Wo, oh = (first / c.Wo) % c.Ho, image = first / (c.Wo * c.Ho);
  for (int i = 0; i < NP; ++i) {
    if (i > 0 && i < valid && ++ow == c.Wo) { ow = 0; if (++oh == c.Ho) { oh = 0; ++image; } }
    outs[i] = image * c.os[0] + oh * c.os[2] + ow * c.os[3];
    const int64_t row0 = oh * c.sh - c.ph, col0 = ow * c.sw - c.pw;
    for (int64_t kh = 0; kh < c.KH; ++kh)
      for (int64_t kw = 0; kw < c.KW; ++kw) {
        const int64_t ih = row0 + kh * c.dh, iw = col0 + kw * c.dw;
        const bool inside = i < valid && ih >= 0 && ih < c.H && iw >= 0 && iw < c.W;
        rows[(kh * c.KW + kw) * NP + i] = inside ? c.x + image * c.xs[0] + ih * c.xs[2] + iw * c.xs[3] : c.zeros;
      }
  }
  int64_t k = 0;
  for (; k + kLanes <= M; k += kLanes) {
    vec acc[NP] = {};
    for (int64_t tap = 0; tap < taps; ++tap) {
      const vec w = load(c.wdw + tap * Mv + k);
      const float* const* r = rows + tap * NP;
      for (int i = 0; i < NP; ++i) acc[i] += load(r[i] + k) * w;
    }
    for (int i = 0; i < NP; ++i) store(buffer + i * Mv + k, acc[i]);
  }
  for (; k < M; ++k)  // the channels past the last whole vector: a vector load would leave the pixel
    for (int i = 0; i < NP; ++i) {
      float acc = 0.0f;
      for (int64_t tap = 0; tap < taps; ++tap) acc += rows[tap * NP + i][k] * c.wdw[tap * Mv + k];
      buffer[i * Mv + k] = acc;
    }
  // 2. Pointwise, tile by tile: NP x NV accumulators over the buffer's channels.
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const float* w = c.wpw + t * M * FT;
    vec acc[NP][NV];
    for (int v = 0; v < NV; ++v) {
      const vec b = load(c.bias + t * FT + v * kLanes);
      for (int i = 0; i < NP; ++i) acc[i][v] = b;
    }
    for (int64_t k = 0; k < M; ++k) {
      vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load(w + k * FT + v * kLanes);
      for (int i = 0; i < NP; ++i) {
        const float s = buffer[i * Mv + k];
        for (int v = 0; v < NV; ++v) acc[i][v] += s * wv[v];
      }
    }
    const int64_t filter0 = t * FT;
    const vec zero = vec{};
    const bool whole = filter0 + FT <= c.N && c.os[1] == 1;
    for (int i = 0; i < valid; ++i) {
      float* o = c.out + outs[i] + filter0 * c.os[1];
      for (int v = 0; v < NV; ++v) {
        vec r = acc[i][v];
        if (c.relu) r = r > zero ? r : zero;
        if (whole) {
          store(o + v * kLanes, r);
        } else {
          for (int f = 0; f < kLanes; ++f)
            if (filter0 + v * kLanes + f < c.N) o[(v * kLanes + f) * c.os[1]] = r[f];
        }
      }
    }
  }
}

void run_separable(const SeparableCall& c) {
  constexpr int NP = kSeparablePixels;
  const int64_t pixels = c.B * c.Ho * c.Wo;
  const int64_t blocks = (pixels + NP - 1) / NP;
  const int64_t groups = (c.T + c.tiles_per_group - 1) / c.tiles_per_group;
  const int NV = static_cast<int>(c.FT / kLanes);
  // Items group-major: a thread's run of items mostly shares one group's weights.
  at::parallel_for(0, groups * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(NP * c.Mv);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / blocks, block = item % blocks;
      const int64_t tile_begin = group * c.tiles_per_group;
      const int64_t tile_end = std::min<int64_t>(c.T, tile_begin + c.tiles_per_group);
      if (NV == 1) separable_block<1>(c, block, tile_begin, tile_end, buffer.data());
      else separable_block<2>(c, block, tile_begin, tile_end, buffer.data());
    }
  });
}
