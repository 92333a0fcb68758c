// The op contract: one schema per op, registered once. Device kernels live in csrc/cpu/ (and
// csrc/cuda/); the fake kernels that let torch.compile trace the ops are in fusedtrain/_fake.py.
//
// The python module `fusedtrain._C` also binds the few helpers that are not ops.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/linear_mse_cpu.h"
#include "cpu/linear_mse_fit.h"
#include "cpu/optim_cpu.h"
#include "optim_python.h"

namespace fusedtrain {
// The digest of the csrc/ this build compiled, defined in a file that the build generates
// (fusedtrain/_sources.py).
extern const char kSourceDigest[];
}  // namespace fusedtrain

TORCH_LIBRARY(fusedtrain, m) {
  // Adam / AdamW over lists of tensors, in place: increments each steps[i], then updates
  // params, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs when amsgrad). With grad_scale, grads are
  // divided by it and stored back; with found_inf != 0 nothing at all is changed. With lr_tensor
  // (one element, on the params' device) the learning rate is its value, read by the kernel, and
  // the float lr is ignored: a step that CUDA graph capture records then follows later changes.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, "
      "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? lr_tensor=None) -> ()");
  // SGD over lists of tensors, in place. momentum_buffers is empty when momentum == 0; with
  // first_step they are overwritten with the (decayed) gradient, as torch initialises them.
  // grad_scale, found_inf and lr_tensor as for adam_step_.
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool first_step, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? lr_tensor=None) -> ()");
  // Linear layer + MSE loss: the loss of x @ weight.T + bias against target (N, out; expanded
  // by the caller) under reduction 1 (mean) or 2 (sum), and in the same pass its gradients
  // with respect to weight and bias (need_grad_params) and x (need_grad_x); gradients not asked
  // for come back as empty tensors. The prediction is never stored.
  m.def(
      "linear_mse_fwd_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor target, int reduction, "
      "bool need_grad_x, bool need_grad_params=True) -> (Tensor loss, Tensor grad_weight, "
      "Tensor grad_bias, Tensor grad_x)");
  // One training step of a linear layer with an MSE loss: forward, loss, gradients and the
  // update of weight and bias by SGD (adam=False) or Adam/AdamW, in place, with the optimizer's
  // state tensors (see csrc/cpu/linear_mse_fit.h for their order). Returns the loss before the
  // update.
  m.def(
      "linear_mse_train_step_(Tensor x, Tensor target, Tensor(a!) weight, Tensor(b!)? bias, "
      "int reduction, Tensor(c!)[] state, bool adam, float lr, float weight_decay, bool maximize, "
      "float beta1, float beta2, float eps, bool decoupled, bool amsgrad, float momentum, "
      "float dampening, bool nesterov, bool first_step) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The CPU kernels without the dispatcher, for eager steps (see cpu/optim_cpu.h). Like
  // torch's fused optimizers they leave the tensors' version counters alone. The lists are
  // borrowed from Python (see BorrowedTensors), the kernel runs without the GIL.
  using fusedtrain::BorrowedTensors;
  using Tensors = std::vector<at::Tensor>;
  using OptionalTensor = std::optional<at::Tensor>;
  m.def(
      "adam_step_cpu",
      [](py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
         py::handle max_exp_avg_sqs, py::handle steps, double lr, double beta1, double beta2,
         double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
         const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
         const OptionalTensor& lr_tensor) {
        constexpr const char* kName = "adam_step_cpu";
        const BorrowedTensors p(params, kName, "params"), g(grads, kName, "grads"),
            m1(exp_avgs, kName, "exp_avgs"), m2(exp_avg_sqs, kName, "exp_avg_sqs"),
            m2_max(max_exp_avg_sqs, kName, "max_exp_avg_sqs"), s(steps, kName, "steps");
        py::gil_scoped_release release;
        fusedtrain::cpu::adam_step_cpu(p.list(), g.list(), m1.list(), m2.list(), m2_max.list(),
                                       s.list(), lr, beta1, beta2, eps, weight_decay, decoupled,
                                       amsgrad, maximize, grad_scale, found_inf, lr_tensor);
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
      py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("lr"), py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"),
      py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_scale") = py::none(),
      py::arg("found_inf") = py::none(), py::arg("lr_tensor") = py::none());
  m.def(
      "sgd_step_cpu",
      [](py::handle params, py::handle grads, py::handle momentum_buffers, double lr,
         double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
         bool first_step, const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
         const OptionalTensor& lr_tensor) {
        constexpr const char* kName = "sgd_step_cpu";
        const BorrowedTensors p(params, kName, "params"), g(grads, kName, "grads"),
            b(momentum_buffers, kName, "momentum_buffers");
        py::gil_scoped_release release;
        fusedtrain::cpu::sgd_step_cpu(p.list(), g.list(), b.list(), lr, momentum, dampening,
                                      weight_decay, nesterov, maximize, first_step, grad_scale,
                                      found_inf, lr_tensor);
      },
      py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"), py::arg("lr"),
      py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
      py::arg("maximize"), py::arg("first_step"), py::arg("grad_scale") = py::none(),
      py::arg("found_inf") = py::none(), py::arg("lr_tensor") = py::none());
  fusedtrain::bind_step_plan_checks(m);
  m.def("linear_mse_fwd_bwd_cpu", &fusedtrain::cpu::linear_mse_fwd_bwd_cpu,
        py::call_guard<py::gil_scoped_release>());
  py::class_<fusedtrain::cpu::FitOptimizer>(m, "FitOptimizer",
                                            "Hyperparameters of linear_mse_fit's optimizer.")
      .def(py::init<>())
      .def_readwrite("adam", &fusedtrain::cpu::FitOptimizer::adam)
      .def_readwrite("lr", &fusedtrain::cpu::FitOptimizer::lr)
      .def_readwrite("weight_decay", &fusedtrain::cpu::FitOptimizer::weight_decay)
      .def_readwrite("maximize", &fusedtrain::cpu::FitOptimizer::maximize)
      .def_readwrite("beta1", &fusedtrain::cpu::FitOptimizer::beta1)
      .def_readwrite("beta2", &fusedtrain::cpu::FitOptimizer::beta2)
      .def_readwrite("eps", &fusedtrain::cpu::FitOptimizer::eps)
      .def_readwrite("decoupled", &fusedtrain::cpu::FitOptimizer::decoupled)
      .def_readwrite("amsgrad", &fusedtrain::cpu::FitOptimizer::amsgrad)
      .def_readwrite("momentum", &fusedtrain::cpu::FitOptimizer::momentum)
      .def_readwrite("dampening", &fusedtrain::cpu::FitOptimizer::dampening)
      .def_readwrite("nesterov", &fusedtrain::cpu::FitOptimizer::nesterov)
      .def_readwrite("first_step", &fusedtrain::cpu::FitOptimizer::first_step);
  m.def(
      "linear_mse_fit_cpu",
      [](const at::Tensor& x, const at::Tensor& target, const at::Tensor& weight,
         const OptionalTensor& bias, int64_t reduction, int64_t epochs, int64_t batch_size,
         std::optional<at::Generator> generator, const OptionalTensor& val_x,
         const OptionalTensor& val_target, const Tensors& state,
         const fusedtrain::cpu::FitOptimizer& optimizer) {
        return fusedtrain::cpu::linear_mse_fit_cpu(x, target, weight, bias, reduction, epochs,
                                                   batch_size, generator, val_x, val_target,
                                                   state, optimizer);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("has_cuda_kernels", [] {
#if defined(FUSEDTRAIN_WITH_CUDA)
    return true;
#else
    return false;
#endif
  }, "Whether this build compiled the CUDA kernels.");
  m.def("source_digest", [] { return std::string(fusedtrain::kSourceDigest); },
        "SHA-256 of the C++/CUDA sources this extension was built from (fusedtrain/_sources.py).");
  m.def("cpu_isa", [] { return std::string(fusedtrain::cpu::active_kernels().name); },
        "The instruction set the CPU kernels run.");
  m.def("supported_cpu_isas", &fusedtrain::cpu::supported_isas,
        "Instruction sets this CPU can run, widest first.");
  m.def("set_cpu_isa", &fusedtrain::cpu::set_cpu_isa,
        "Make the CPU kernels run the named instruction set (for tests and benchmarks).");
}
