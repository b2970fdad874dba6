// The direct HetConv kernel for AVX2 with FMA: 8 floats a vector, 16 registers (how an
// ISA's file is compiled: hetconv_direct_isa.h).
#define LEANCONV_ISA avx2
#define LEANCONV_TARGET "avx2,fma"
#define LEANCONV_REGISTERS 16
#include "hetconv_direct_isa.h"
