// What the arm64 CPU offers, and how a requested ISA is capped to what a CPU has (both families).
// The x86 detection stays in qgemm.cpp (cpu_best_isa); this module serves the arm64 paths.
#pragma once

namespace tinyv {

// The best arm64 path this CPU runs: ISA_NEON_I8MM (dotprod + i8mm), ISA_NEON_DOTPROD or ISA_NEON;
// ISA_SCALAR on any other architecture. Linux/Android: getauxval(AT_HWCAP, AT_HWCAP2); macOS:
// sysctlbyname("hw.optional.arm.FEAT_DotProd" / "FEAT_I8MM"); elsewhere plain NEON.
int arm_best_isa();

// The ISA a context runs when `requested` is asked for on a CPU whose best is `best`: `best` for a
// negative request; otherwise the request capped at `best` within its family (x86 or arm64), and
// scalar for a request from the other family (as an AVX2 request on a CPU without AVX2 gets).
int cap_isa(int requested, int best);

// tv_cpu_features' bit set for a CPU whose best ISA is `best`: 1 AVX2, 2 AVX-512 VNNI, 4 NEON,
// 8 NEON dotprod, 16 NEON i8mm (each path includes the ones below it in its family).
int isa_feature_bits(int best);

}  // namespace tinyv
