// The direct HetConv kernel for any CPU: vectors of 4 floats, which the compiler lowers
// to the build's baseline (SSE2 on x86-64, NEON on AArch64, scalar code elsewhere).

#include "hetconv_direct.h"

namespace leanconv_direct::portable {
constexpr int kRegisters = 16;
#include "hetconv_direct_kernel.h"
}  // namespace leanconv_direct::portable
