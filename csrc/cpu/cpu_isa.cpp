#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace fusedtrain {
namespace cpu {
namespace {

std::vector<const IsaKernels*> supported_kernels() {
  std::vector<const IsaKernels*> kernels;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    kernels.push_back(&kAvx512Kernels);
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    kernels.push_back(&kAvx2Kernels);
  }
#endif
  kernels.push_back(&kBaselineKernels);
  return kernels;
}

const IsaKernels* find_supported(const std::string& name) {
  for (const IsaKernels* k : supported_kernels()) {
    if (name == k->name) return k;
  }
  return nullptr;
}

const IsaKernels* initial_kernels() {
  const char* requested = std::getenv("FUSEDTRAIN_CPU_ISA");
  if (requested != nullptr && *requested != '\0') {
    const IsaKernels* k = find_supported(requested);
    TORCH_CHECK(k != nullptr, "FUSEDTRAIN_CPU_ISA=", requested,
                " is not supported by this CPU; supported: ", c10::Join(", ", supported_isas()));
    return k;
  }
  return supported_kernels().front();
}

std::atomic<const IsaKernels*>& active() {
  static std::atomic<const IsaKernels*> kernels{initial_kernels()};
  return kernels;
}

}  // namespace

const IsaKernels& active_kernels() { return *active().load(std::memory_order_relaxed); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const IsaKernels* k : supported_kernels()) names.emplace_back(k->name);
  return names;
}

void set_cpu_isa(const std::string& name) {
  const IsaKernels* k = find_supported(name);
  TORCH_CHECK_VALUE(k != nullptr, "set_cpu_isa: '", name,
                    "' is not supported by this CPU; supported: ", c10::Join(", ", supported_isas()));
  active().store(k, std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace fusedtrain
