// The op contract: one schema per op, registered once. Device kernels live in csrc/cpu/ (and
// csrc/cuda/); the fake kernels that let torch.compile trace the ops are in fusedtrain/_fake.py.
//
// The python module `fusedtrain._C` also binds the few helpers that are not ops.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"

TORCH_LIBRARY(fusedtrain, m) {
  // Adam / AdamW over lists of tensors, in place: increments each steps[i], then updates
  // params, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs when amsgrad). With grad_scale, grads are
  // divided by it and stored back; with found_inf != 0 nothing at all is changed.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, "
      "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // SGD over lists of tensors, in place. momentum_buffers is empty when momentum == 0; with
  // first_step they are overwritten with the (decayed) gradient, as torch initialises them.
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool first_step, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", [] { return std::string(fusedtrain::cpu::active_kernels().name); },
        "The instruction set the CPU kernels run.");
  m.def("supported_cpu_isas", &fusedtrain::cpu::supported_isas,
        "Instruction sets this CPU can run, widest first.");
  m.def("set_cpu_isa", &fusedtrain::cpu::set_cpu_isa,
        "Make the CPU kernels run the named instruction set (for tests and benchmarks).");
}
