// arm64 CPU features and ISA capping (cpu_features.h).
#include "cpu_features.h"

#include "job.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#include <sys/types.h>
#endif

namespace tinyv {
namespace {

#if defined(__aarch64__) && defined(__linux__)
// The kernel's bit numbers (asm/hwcap.h), spelled out: older C libraries lack the newer names.
constexpr unsigned long kHwcapAsimdDp = 1ul << 20;  // AT_HWCAP: HWCAP_ASIMDDP (sdot/udot)
constexpr unsigned long kHwcap2I8mm = 1ul << 13;    // AT_HWCAP2: HWCAP2_I8MM (smmla)
#endif

bool is_arm(int isa) { return isa >= ISA_NEON && isa <= ISA_NEON_I8MM; }
bool is_x86(int isa) { return isa == ISA_AVX2 || isa == ISA_AVX512VNNI; }

#if defined(__aarch64__) && defined(__APPLE__)
bool sysctl_flag(const char* name) {
    int value = 0;
    size_t size = sizeof(value);
    return sysctlbyname(name, &value, &size, nullptr, 0) == 0 && value != 0;
}
#endif

}  // namespace

int arm_best_isa() {
#if defined(__aarch64__) && defined(__linux__)
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    const bool dotprod = hw & kHwcapAsimdDp, i8mm = hw2 & kHwcap2I8mm;
#elif defined(__aarch64__) && defined(__APPLE__)
    const bool dotprod = sysctl_flag("hw.optional.arm.FEAT_DotProd"), i8mm = sysctl_flag("hw.optional.arm.FEAT_I8MM");
#elif defined(__aarch64__)
    const bool dotprod = false, i8mm = false;  // NEON is part of every arm64 CPU; the rest is unknown here
#endif
#if defined(__aarch64__)
    // the i8mm path runs sdot for single rows, so it needs both
    return dotprod && i8mm ? ISA_NEON_I8MM : dotprod ? ISA_NEON_DOTPROD : ISA_NEON;
#else
    return ISA_SCALAR;
#endif
}

int cap_isa(int requested, int best) {
    if (requested < 0) return best;
    if ((is_arm(requested) && is_arm(best)) || (is_x86(requested) && is_x86(best))) return requested < best ? requested : best;
    return ISA_SCALAR;
}

int isa_feature_bits(int best) {
    if (is_x86(best)) return 1 | (best >= ISA_AVX512VNNI ? 2 : 0);
    if (is_arm(best)) return 4 | (best >= ISA_NEON_DOTPROD ? 8 : 0) | (best >= ISA_NEON_I8MM ? 16 : 0);
    return 0;
}

}  // namespace tinyv
