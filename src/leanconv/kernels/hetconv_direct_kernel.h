// The direct HetConv kernel (the algorithm: hetconv_direct.h), written once for a vector
// of kLanes floats with kRegisters vector registers. Not a header of its own:
// hetconv_direct_isa.h includes it inside an ISA's namespace, after the includes of
// hetconv_direct.h and with the ISA's target options on, and defines kRegisters; kLanes is
// declared in hetconv_direct.h. GCC/Clang vector extensions lower to the ISA's registers
// (SSE, NEON or scalar code in the portable build).

typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float vec_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));

typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef int32_t ivec_unaligned __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(alignof(int32_t))));

inline vec load(const float* p) { return *reinterpret_cast<const vec_unaligned*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec_unaligned*>(p) = v; }
inline ivec load_index(const int32_t* p) { return *reinterpret_cast<const ivec_unaligned*>(p); }

// Lane f of the result is lane index[f] of v (one vpermps with AVX-512 or AVX2).
inline vec permute(vec v, ivec index) {
#if defined(__clang__)
  vec out;
  for (int f = 0; f < kLanes; ++f) out[f] = v[index[f]];
  return out;
#else
  return __builtin_shuffle(v, index);
#endif
}

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

// A tile whose vectors hold several groups: for each of the groups' `count` channels j,
// vector v adds, per pixel, the kLanes channels loaded at offsets[v*count + j], permuted so
// that each lane holds its own group's channel j, times the weights w[j][v].
template <int NP, int NV>
inline void permuted_channels(vec (&acc)[NP][NV], const float* const* rows, const int32_t* offsets,
                              const int32_t* index, int64_t count, const float* w, int64_t FT) {
  for (int64_t j = 0; j < count; ++j)
    for (int v = 0; v < NV; ++v) {
      const vec wv = load(w + j * FT + v * kLanes);
      const ivec iv = load_index(index + (v * count + j) * kLanes);
      const int64_t at = offsets[v * count + j];
      for (int i = 0; i < NP; ++i) acc[i][v] += permute(load(rows[i] + at), iv) * wv;
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
  if (c.lane_index != nullptr) {  // one pass of permuted loads (hetconv_direct.h)
    const int32_t* offsets = c.lane_offsets + t * NV * Mg;
    const int32_t* index = c.lane_index + t * NV * Mg * kLanes;
    const float* w = c.wn + t * pass_size;
    for (int64_t tap = 0, k = 0; tap < taps; ++tap) {
      if (tap == centre) continue;
      const float* wt = w + (k++) * Mg * FT;
      if (reads[tap]) permuted_channels<NP, NV>(acc, rows + tap * NP, offsets, index, Mg, wt, FT);
    }
  } else {
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
  }
  if (c.relu) {
    const vec zero = vec{};
    for (int i = 0; i < NP; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = acc[i][v] > zero ? acc[i][v] : zero;
  }
  // Store the real pixels and the real filters of the tile: whole vectors where the tile's
  // filters are consecutive in the output (channels-last), else filter by filter, each
  // filter's pixels in turn (in NCHW, a row-major block's pixels are adjacent there).
  if (!c.shifted && count == FT && c.os[1] == 1) {
    for (int i = 0; i < valid; ++i)
      for (int v = 0; v < NV; ++v) store(c.out + outs[i] + first + v * kLanes, acc[i][v]);
  } else {
    float lanes[NP][NV * kLanes];
    for (int i = 0; i < NP; ++i)
      for (int v = 0; v < NV; ++v) store(lanes[i] + v * kLanes, acc[i][v]);
    for (int64_t f = 0; f < count; ++f) {
      float* o = c.out + filter_of(c, first + f) * c.os[1];
      for (int i = 0; i < valid; ++i) o[outs[i]] = lanes[i][f];
    }
  }
}

template <int NP, int NV>
void run_blocks(const Call& c) {
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


// dst[b] = src[b]^T for B row-major (rows x cols) matrices (NCHW <-> channels-last copies):
// blocks of 32 x 32, each as 8 x 8 tiles transposed in registers by three rounds of
// two-vector shuffles (unpack, pair, swap halves); partial tiles element by element.
typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
typedef float v8_unaligned __attribute__((vector_size(8 * sizeof(float)), aligned(alignof(float))));
typedef int32_t i8 __attribute__((vector_size(8 * sizeof(int32_t))));
#ifndef LEANCONV_SHUFFLE8  // a two-vector shuffle with constant lanes, as Clang and GCC spell it
#if defined(__clang__)
#define LEANCONV_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define LEANCONV_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, i8{__VA_ARGS__})
#endif
#endif

inline void transpose_8x8(const float* s, int64_t s_stride, float* d, int64_t d_stride) {
  v8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const v8_unaligned*>(s + i * s_stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = LEANCONV_SHUFFLE8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = LEANCONV_SHUFFLE8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int k = 0; k < 2; ++k) {
      u[i + 2 * k] = LEANCONV_SHUFFLE8(t[i + k], t[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * k + 1] = LEANCONV_SHUFFLE8(t[i + k], t[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int k = 0; k < 4; ++k) {
    *reinterpret_cast<v8_unaligned*>(d + k * d_stride) = LEANCONV_SHUFFLE8(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    *reinterpret_cast<v8_unaligned*>(d + (k + 4) * d_stride) =
        LEANCONV_SHUFFLE8(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

void transpose(const float* src, float* dst, int64_t B, int64_t rows, int64_t cols) {
  constexpr int64_t kBlock = 32;
  const int64_t row_blocks = (rows + kBlock - 1) / kBlock, col_blocks = (cols + kBlock - 1) / kBlock;
  at::parallel_for(0, B * row_blocks * col_blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t b = k / (row_blocks * col_blocks), rb = (k / col_blocks) % row_blocks, cb = k % col_blocks;
      const float* s = src + b * rows * cols;
      float* d = dst + b * rows * cols;
      const int64_t r0 = rb * kBlock, r1 = std::min(rows, r0 + kBlock);
      const int64_t c0 = cb * kBlock, c1 = std::min(cols, c0 + kBlock);
      for (int64_t i = r0; i < r1; i += 8)
        for (int64_t j = c0; j < c1; j += 8) {
          if (i + 8 <= r1 && j + 8 <= c1) {
            transpose_8x8(s + i * cols + j, cols, d + j * rows + i, rows);
          } else {
            for (int64_t jj = j; jj < std::min(c1, j + 8); ++jj)
              for (int64_t ii = i; ii < std::min(r1, i + 8); ++ii) d[jj * rows + ii] = s[ii * cols + jj];
          }
        }
    }
  });
}

// Register blocking: NP pixels x NV vectors of accumulators, leaving registers for the
// weights and the broadcast values.
void run(const Call& c) {
  if (c.FT == kLanes) run_blocks<12, 1>(c);
  else if (kRegisters >= 32) run_blocks<8, 2>(c);
  else run_blocks<6, 2>(c);
}
