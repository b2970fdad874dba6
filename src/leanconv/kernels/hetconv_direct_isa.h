// Compiles the direct kernels (HetConv: hetconv_direct_kernel.h; depthwise-separable:
// separable_direct_kernel.h) for one vector ISA. The
// including file defines LEANCONV_ISA (the namespace: leanconv_direct::LEANCONV_ISA, whose
// kLanes hetconv_direct.h declares), LEANCONV_REGISTERS (its vector registers) and, for an
// x86 ISA, LEANCONV_TARGET (its target options). Those options apply to this kernel's
// functions only (GCC's target pragma, Clang's attribute pragma; the rest of the build
// targets the baseline), and the kernel is called only on CPUs that report the ISA
// (hetconv_direct.cpp): a build, or a build cache, that moves between hosts never runs an
// instruction its CPU lacks. An x86 ISA's file compiles to nothing elsewhere than x86.

#include "hetconv_direct.h"
#include "separable_direct.h"

#if !defined(LEANCONV_TARGET) || defined(__x86_64__) || defined(__i386__)
#if defined(LEANCONV_TARGET)
#define LEANCONV_PRAGMA(...) _Pragma(#__VA_ARGS__)
#define LEANCONV_EXPANDED_PRAGMA(...) LEANCONV_PRAGMA(__VA_ARGS__)  // LEANCONV_TARGET expanded first
#if defined(__clang__)
LEANCONV_EXPANDED_PRAGMA(clang attribute push(__attribute__((target(LEANCONV_TARGET))), apply_to = function))
#else
#pragma GCC push_options
LEANCONV_EXPANDED_PRAGMA(GCC target(LEANCONV_TARGET))
#endif
#endif

namespace leanconv_direct::LEANCONV_ISA {
constexpr int kRegisters = LEANCONV_REGISTERS;
#include "hetconv_direct_kernel.h"
#include "separable_direct_kernel.h"
}  // namespace leanconv_direct::LEANCONV_ISA

#if defined(LEANCONV_TARGET)
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
#endif
