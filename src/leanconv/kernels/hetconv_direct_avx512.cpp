// The direct HetConv kernel for AVX-512 (F, VL, BW, DQ) with FMA: 16 floats a vector, 32 registers.
// Compiled with this ISA's target options for this file's functions only (the rest of the
// build targets the baseline x86-64), and called only on CPUs that report the ISA
// (hetconv_direct.cpp): a build, or a build cache, that moves between hosts never runs
// an instruction its CPU lacks. Elsewhere than x86 this file compiles to nothing.

#include "hetconv_direct.h"

#if defined(__x86_64__) || defined(__i386__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#endif

namespace leanconv_direct::avx512 {
constexpr int kRegisters = 32;
#include "hetconv_direct_kernel.h"
}  // namespace leanconv_direct::avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
