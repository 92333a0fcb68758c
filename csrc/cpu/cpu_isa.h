// Which element loops the CPU kernels run: the widest instruction set this CPU supports, chosen
// at run time (the build never uses -march=native), or one picked by name for tests and
// benchmarks (FUSEDTRAIN_CPU_ISA=avx512|avx2|baseline, or set_cpu_isa()).
#pragma once

#include <string>
#include <vector>

#include "kernel_table.h"

namespace fusedtrain {
namespace cpu {

const IsaKernels& active_kernels();

// Names this CPU can run, widest first; the last is always "baseline".
std::vector<std::string> supported_isas();

// Switches the active loops; throws if this CPU cannot run `name`.
void set_cpu_isa(const std::string& name);

}  // namespace cpu
}  // namespace fusedtrain
