// The direct HetConv kernel for AVX-512 (F, VL, BW, DQ) with FMA: 16 floats a vector, 32
// registers (how an ISA's file is compiled: hetconv_direct_isa.h).
#define LEANCONV_ISA avx512
#define LEANCONV_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
#define LEANCONV_REGISTERS 32
#include "hetconv_direct_isa.h"
