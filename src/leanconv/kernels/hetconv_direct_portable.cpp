// The direct HetConv kernel for any CPU: vectors of 4 floats, which the compiler lowers
// to the build's baseline (SSE2 on x86-64, NEON on AArch64, scalar code elsewhere); no
// target options (hetconv_direct_isa.h).
#define LEANCONV_ISA portable
#define LEANCONV_REGISTERS 16
#include "hetconv_direct_isa.h"
