// The direct separable kernels (the algorithms: separable_direct.h), written once for a
// vector of kLanes floats. Not a header of its own: hetconv_direct_isa.h includes it
// inside an ISA's namespace after hetconv_direct_kernel.h (whose vec, load and store it
// uses), with the ISA's target options on.

// Pixels per block: NP x NV accumulators plus NV weight vectors fit the registers.
constexpr int kSeparablePixels = kRegisters >= 32 ? 12 : 6;

// The input each of NP output pixels from `first` reads at each tap, rows[tap * NP + i],
// from a channels-last source of strides ss (the zero buffer where the tap falls into the
// padding, and for pixels past `valid`), and each real pixel's output offset. Returns valid.
inline int block_taps(const SeparableCall& c, const float* source, const int64_t* ss, int64_t first,
                      const float** rows, int64_t* outs) {
  constexpr int NP = kSeparablePixels;
  const int valid = static_cast<int>(std::min<int64_t>(NP, c.B * c.Ho * c.Wo - first));
  int64_t ow = first % c.Wo, oh = (first / c.Wo) % c.Ho, image = first / (c.Wo * c.Ho);
  for (int i = 0; i < NP; ++i) {
    if (i > 0 && i < valid && ++ow == c.Wo) { ow = 0; if (++oh == c.Ho) { oh = 0; ++image; } }
    outs[i] = image * c.os[0] + oh * c.os[2] + ow * c.os[3];
    const int64_t row0 = oh * c.sh - c.ph, col0 = ow * c.sw - c.pw;
    for (int64_t kh = 0; kh < c.KH; ++kh)
      for (int64_t kw = 0; kw < c.KW; ++kw) {
        const int64_t ih = row0 + kh * c.dh, iw = col0 + kw * c.dw;
        const bool inside = i < valid && ih >= 0 && ih < c.H && iw >= 0 && iw < c.W;
        rows[(kh * c.KW + kw) * NP + i] = inside ? source + image * ss[0] + ih * ss[2] + iw * ss[3] : c.zeros;
      }
  }
  return valid;
}

// dst[i][k] = bias[k] + sum over taps rows[tap * NP + i][k] * wdw[tap][k], k < c.D, for
// the first `count` pixels (then the optional ReLU): R <= NP independent accumulators per
// vector of channels (R rows computed: a block of fewer pixels computes fewer), one weight
// load per tap.
template <int R>
void depthwise_pixels(const SeparableCall& c, const float* const* rows, const float* bias, bool relu,
                      float* const* dst, int count) {
  constexpr int NP = kSeparablePixels;
  const int64_t taps = c.KH * c.KW, D = c.D, Dv = c.Dv;
  const vec zero = vec{};
  int64_t k = 0;
  for (; k + kLanes <= D; k += kLanes) {
    vec acc[R];
    const vec b = bias != nullptr ? load(bias + k) : zero;
    for (int i = 0; i < R; ++i) acc[i] = b;
    for (int64_t tap = 0; tap < taps; ++tap) {
      const vec w = load(c.wdw + tap * Dv + k);
      const float* const* r = rows + tap * NP;
      for (int i = 0; i < R; ++i) acc[i] += load(r[i] + k) * w;
    }
    for (int i = 0; i < count; ++i) store(dst[i] + k, relu ? (acc[i] > zero ? acc[i] : zero) : acc[i]);
  }
  for (; k < D; ++k)  // the channels past the last whole vector: a vector load would leave the pixel
    for (int i = 0; i < count; ++i) {
      float acc = bias != nullptr ? bias[k] : 0.0f;
      for (int64_t tap = 0; tap < taps; ++tap) acc += rows[tap * NP + i][k] * c.wdw[tap * Dv + k];
      dst[i][k] = relu && acc < 0.0f ? 0.0f : acc;
    }
}

// For tiles [tile_begin, tile_end) of the 1x1 p: dst[i][f] = p.bias[f] + sum over k < p.K
// of src[i][k] * p.w[tile][k][f], f < p.N, for the first `count` pixels (then the optional
// ReLU): NP x NV accumulators in registers (NP rows computed); whole vectors stored where
// the tile's filters are all real.
template <int NV, int NP>
void pointwise_tiles(const Pointwise& p, const float* const* src, int64_t tile_begin, int64_t tile_end, bool relu,
                     float* const* dst, int count) {
  const int64_t FT = p.FT, K = p.K;
  const vec zero = vec{};
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const float* w = p.w + t * K * FT;
    vec acc[NP][NV];
    for (int v = 0; v < NV; ++v) {
      const vec b = load(p.bias + t * FT + v * kLanes);
      for (int i = 0; i < NP; ++i) acc[i][v] = b;
    }
    for (int64_t k = 0; k < K; ++k) {
      vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load(w + k * FT + v * kLanes);
      for (int i = 0; i < NP; ++i) {
        const float s = src[i][k];
        for (int v = 0; v < NV; ++v) acc[i][v] += s * wv[v];
      }
    }
    const int64_t filter0 = t * FT;
    const bool whole = filter0 + FT <= p.N;
    for (int i = 0; i < count; ++i) {
      float* o = dst[i] + filter0;
      for (int v = 0; v < NV; ++v) {
        const vec r = relu ? (acc[i][v] > zero ? acc[i][v] : zero) : acc[i][v];
        if (whole) {
          store(o + v * kLanes, r);
        } else {
          for (int f = 0; f < kLanes; ++f)
            if (filter0 + v * kLanes + f < p.N) o[v * kLanes + f] = r[f];
        }
      }
    }
  }
}

// The rows a block of `count` real pixels computes: 4, 8 or all kSeparablePixels (a 2x2 map
// at batch 1 is one block of 4 pixels; computing 12 rows for it took three times the work).
template <class Call>
void by_rows(int count, const Call& call) {
  if (count <= 4) {
    call(std::integral_constant<int, 4>{});
  } else if constexpr (kSeparablePixels > 8) {
    if (count <= 8) call(std::integral_constant<int, 8>{});
    else call(std::integral_constant<int, kSeparablePixels>{});
  } else {
    call(std::integral_constant<int, kSeparablePixels>{});
  }
}

// Items of `blocks` blocks x groups of tiles of the 1x1 p, group-major (a thread's run of
// items mostly shares one group's weights): body(block, tile_begin, tile_end). A group's
// weights stay in L2 (128 KiB); where there are few blocks (batch 1, small maps), groups are
// smaller, so that every thread gets at least two items.
template <class Body>
void for_tiles_and_blocks(const Pointwise& p, int64_t blocks, const Body& body) {
  const int64_t tile_bytes = p.K * p.FT * static_cast<int64_t>(sizeof(float));
  int64_t per_group = std::max<int64_t>(1, std::min<int64_t>(p.T, (128 << 10) / std::max<int64_t>(tile_bytes, 1)));
  const int64_t wanted = 2 * at::get_num_threads();
  if (blocks < wanted) {
    const int64_t groups = std::min<int64_t>(p.T, (wanted + blocks - 1) / blocks);
    per_group = std::min<int64_t>(per_group, (p.T + groups - 1) / groups);
  }
  const int64_t groups = (p.T + per_group - 1) / per_group;
  at::parallel_for(0, groups * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / blocks, block = item % blocks;
      const int64_t tile_begin = group * per_group;
      body(block, tile_begin, std::min<int64_t>(p.T, tile_begin + per_group));
    }
  });
}

// The 1x1 p of every input pixel: rows of `source` (channels-last input, strides ss, or a
// scratch buffer of rows of `source_row` floats when ss is null) into rows of `row` floats of dst.
template <int NV>
void pointwise_all_pixels(const SeparableCall& c, const Pointwise& p, const float* source, const int64_t* ss,
                          int64_t source_row, float* dst, int64_t row) {
  constexpr int NP = kSeparablePixels;
  const int64_t pixels = c.B * c.H * c.W;
  for_tiles_and_blocks(p, (pixels + NP - 1) / NP, [&](int64_t block, int64_t tile_begin, int64_t tile_end) {
    const float* src[NP];
    float* out[NP];
    const int64_t first = block * NP;
    const int valid = static_cast<int>(std::min<int64_t>(NP, pixels - first));
    int64_t w = first % c.W, h = (first / c.W) % c.H, image = first / (c.W * c.H);
    for (int i = 0; i < NP; ++i) {
      if (i > 0 && i < valid && ++w == c.W) { w = 0; if (++h == c.H) { h = 0; ++image; } }
      const float* at = ss != nullptr ? source + image * ss[0] + h * ss[2] + w * ss[3] : source + (first + i) * source_row;
      src[i] = i < valid ? at : c.zeros;
      out[i] = dst + (first + i) * row;
    }
    by_rows(valid, [&](auto rows) { pointwise_tiles<NV, decltype(rows)::value>(p, src, tile_begin, tile_end, false, out, valid); });
  });
}

template <int NV>
void run_depthwise_first(const SeparableCall& c) {
  constexpr int NP = kSeparablePixels;
  const int64_t blocks = (c.B * c.Ho * c.Wo + NP - 1) / NP;
  for_tiles_and_blocks(c.pointwise, blocks, [&](int64_t block, int64_t tile_begin, int64_t tile_end) {
    thread_local std::vector<float> buffer;
    if (static_cast<int64_t>(buffer.size()) < NP * c.Dv) buffer.resize(NP * c.Dv);
    const float* rows[kSeparableMaxTaps * NP];
    int64_t outs[NP];
    const int valid = block_taps(c, c.x, c.xs, block * NP, rows, outs);
    float* mid[NP];
    float* dst[NP];
    for (int i = 0; i < NP; ++i) { mid[i] = buffer.data() + i * c.Dv; dst[i] = c.out + outs[i]; }
    by_rows(valid, [&](auto computed) {
      depthwise_pixels<decltype(computed)::value>(c, rows, nullptr, false, mid, decltype(computed)::value);
      pointwise_tiles<NV, decltype(computed)::value>(c.pointwise, mid, tile_begin, tile_end, c.relu, dst, valid);
    });
  });
}

template <int NV, int NV0>
void run_pointwise_first(const SeparableCall& c) {
  constexpr int NP = kSeparablePixels;
  // 1. The 1x1 convolution(s) of every input pixel into the scratch buffer(s).
  if (c.two_pointwise) {
    pointwise_all_pixels<NV0>(c, c.first_pointwise, c.x, c.xs, 0, c.scratch0, c.Kv0);
    pointwise_all_pixels<NV>(c, c.pointwise, c.scratch0, nullptr, c.Kv0, c.scratch, c.Dv);
  } else {
    pointwise_all_pixels<NV>(c, c.pointwise, c.x, c.xs, 0, c.scratch, c.Dv);
  }
  // 2. The depthwise convolution over it, with its bias and the ReLU.
  const int64_t ss[4] = {c.H * c.W * c.Dv, 1, c.W * c.Dv, c.Dv};
  const int64_t blocks = (c.B * c.Ho * c.Wo + NP - 1) / NP;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const float* rows[kSeparableMaxTaps * NP];
    int64_t outs[NP];
    float* dst[NP];
    for (int64_t block = begin; block < end; ++block) {
      const int valid = block_taps(c, c.scratch, ss, block * NP, rows, outs);
      for (int i = 0; i < NP; ++i) dst[i] = c.out + outs[i];
      by_rows(valid, [&](auto computed) { depthwise_pixels<decltype(computed)::value>(c, rows, c.depthwise_bias, c.relu, dst, valid); });
    }
  });
}

void run_separable(const SeparableCall& c) {
  const bool one = c.pointwise.FT == kLanes, one0 = !c.two_pointwise || c.first_pointwise.FT == kLanes;
  if (!c.pointwise_first) {
    if (one) run_depthwise_first<1>(c); else run_depthwise_first<2>(c);
  } else if (one) {
    if (one0) run_pointwise_first<1, 1>(c); else run_pointwise_first<1, 2>(c);
  } else {
    if (one0) run_pointwise_first<2, 1>(c); else run_pointwise_first<2, 2>(c);
  }
}
