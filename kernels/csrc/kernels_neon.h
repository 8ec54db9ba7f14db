// arm64 kernels: the GEMM/GEMV rows for the NEON paths (kernels_neon.cpp), behind the same Job
// as the x86 ones, on the weights exactly as stored (no repacked copy).
#pragma once

#include "job.h"

namespace tinyv {

// Output rows [n0, n1) of a job whose ISA is ISA_NEON, ISA_NEON_DOTPROD or ISA_NEON_I8MM
// (defined on aarch64 only; qgemm.cpp's run_rows calls it there).
void rows_neon(const Job& j, int n0, int n1);

}  // namespace tinyv
