// arm64 kernels: one body (kernels_neon_body.h) compiled three times, for plain NEON, for ARMv8.2
// dotprod (sdot) and for i8mm (smmla on two weight rows × two activation rows, sdot for M = 1).
// Each copy carries its own target attribute, as the x86 code does, so one binary runs on every
// arm64 CPU and the path is chosen per context from the CPU's features (cpu_features.h).
//
// Same C ABI, same job, same activation layout (act.h) and the weights as stored: the inner loop
// of a 64-byte block of int4 weights is 2 loads, 4 × (and, shift) to split the nibbles, and per
// activation row 8 sdot (8 × smull/smlal2/sadalp without dotprod) into int32 lanes that start from
// the activation's offset-correction lanes, 3 pairwise adds down to one lane per group (or lane
// pair), one convert and one FMA by (weight × activation scale).
#include "kernels_neon.h"

#if defined(__aarch64__)

#include <arm_neon.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "act.h"

// GCC's arm_neon.h guards sdot/smmla with these exact arch strings; clang names the features.
// clang before LLVM 16 (Apple clang before 15) declares those intrinsics only when the whole file
// is built for the feature: there the instructions are written as inline asm, which it accepts in
// a function carrying the feature's target attribute (the body's sdot() and smmla()).
#if defined(__clang__) && ((defined(__apple_build_version__) && __clang_major__ < 15) || \
                           (!defined(__apple_build_version__) && __clang_major__ < 16))
#define TV_NEON_ASM 1
#else
#define TV_NEON_ASM 0
#endif
#if defined(__clang__)
#define TV_TARGET_DOTPROD __attribute__((target("dotprod")))
#define TV_TARGET_I8MM __attribute__((target("dotprod,i8mm")))
#else
#define TV_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#define TV_TARGET_I8MM __attribute__((target("arch=armv8.2-a+dotprod+i8mm")))
#endif

namespace tinyv {
namespace {

namespace neon_plain {
#define TV_NEON_TARGET
#define TV_NEON_SDOT 0
#define TV_NEON_SMMLA 0
#include "kernels_neon_body.h"
#undef TV_NEON_TARGET
#undef TV_NEON_SDOT
#undef TV_NEON_SMMLA
}  // namespace neon_plain

namespace neon_dotprod {
#define TV_NEON_TARGET TV_TARGET_DOTPROD
#define TV_NEON_SDOT 1
#define TV_NEON_SMMLA 0
#include "kernels_neon_body.h"
#undef TV_NEON_TARGET
#undef TV_NEON_SDOT
#undef TV_NEON_SMMLA
}  // namespace neon_dotprod

namespace neon_i8mm {
#define TV_NEON_TARGET TV_TARGET_I8MM
#define TV_NEON_SDOT 1
#define TV_NEON_SMMLA 1
#include "kernels_neon_body.h"
#undef TV_NEON_TARGET
#undef TV_NEON_SDOT
#undef TV_NEON_SMMLA
}  // namespace neon_i8mm

}  // namespace

void rows_neon(const Job& j, int n0, int n1) {
    if (j.isa == ISA_NEON_I8MM) return neon_i8mm::rows(j, n0, n1);
    if (j.isa == ISA_NEON_DOTPROD) return neon_dotprod::rows(j, n0, n1);
    return neon_plain::rows(j, n0, n1);
}

}  // namespace tinyv

#endif  // __aarch64__
