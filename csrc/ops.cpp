// The op contract: one schema per op, registered once. Device kernels live in csrc/cpu/ (and
// csrc/cuda/); the fake kernels that let torch.compile trace the ops are in fusedtrain/_fake.py.
//
// The python module `fusedtrain._C` also binds the few helpers that are not ops.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/linear_mse_cpu.h"
#include "cpu/optim_cpu.h"
#include "cpu/stack_cpu.h"
#include "optim_python.h"
#if defined(FUSEDTRAIN_WITH_CUDA)
#include "cuda/stack_fit.h"
#endif

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
  // adam_step_ and sgd_step_ for torch.compile (csrc/optim_traced.cpp): the float
  // hyperparameters come in one float64 CPU tensor, `hyper`, read on the host (adam: lr, beta1,
  // beta2, eps, weight_decay; sgd: lr, momentum, dampening, weight_decay), everything else as
  // there. Dynamo specializes a float argument of an op, compiling the step again for every value
  // a scheduler sets (OneCycleLR changes lr and beta1 or momentum at every step); a tensor
  // computed from the floats is an input of one graph instead.
  m.def(
      "adam_step_hyper_tensor_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, Tensor hyper, "
      "bool decoupled, bool amsgrad, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? lr_tensor=None) -> ()");
  m.def(
      "sgd_step_hyper_tensor_(Tensor(a!)[] params, Tensor(b!)[] grads, "
      "Tensor(c!)[] momentum_buffers, Tensor hyper, bool nesterov, bool maximize, "
      "bool first_step, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? lr_tensor=None) -> ()");
  // Linear layer + MSE loss: the loss of x @ weight.T + bias against target (N, out; expanded
  // by the caller) under reduction 1 (mean) or 2 (sum), and in the same pass its gradients
  // with respect to weight and bias (need_grad_params) and x (need_grad_x); gradients not asked
  // for come back as empty tensors. The prediction is never stored.
  m.def(
      "linear_mse_fwd_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor target, int reduction, "
      "bool need_grad_x, bool need_grad_params=True) -> (Tensor loss, Tensor grad_weight, "
      "Tensor grad_bias, Tensor grad_x)");
  // Layer stacks: params are each layer's weight (out, in) and, if it has one, its bias (out),
  // layer by layer; the stack is described by the arguments of kStackSpecSchema (csrc/stack_spec.h,
  // fusedtrain.stacks.StackSpec). target: (N, out) in x's dtype, or (N,) int64 classes for cross
  // entropy. stack_fwd_bwd: the loss and every param's gradient (none unless need_grads), the
  // activations never handed back. The train steps: the same, then the optimizer's update of params
  // and state in place, as adam_step_ / sgd_step_ (same hyperparameters, lr_tensor replacing lr);
  // they return the loss before the update.
  const std::string spec = fusedtrain::kStackSpecSchema;
  m.def(("stack_fwd_bwd(Tensor x, Tensor target, Tensor[] params, " + spec +
         ", bool need_grads=True) -> (Tensor loss, Tensor[] grads)").c_str());
  m.def(("stack_adam_step_(Tensor x, Tensor target, Tensor(a!)[] params, " + spec +
         ", Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
         "Tensor(e!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, "
         "bool decoupled, bool amsgrad, bool maximize, Tensor? lr_tensor=None) -> Tensor").c_str());
  m.def(("stack_sgd_step_(Tensor x, Tensor target, Tensor(a!)[] params, " + spec +
         ", Tensor(b!)[] momentum_buffers, float lr, float momentum, float dampening, "
         "float weight_decay, bool nesterov, bool maximize, bool first_step, "
         "Tensor? lr_tensor=None) -> Tensor").c_str());
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
  // The native training loop over a stack (fusedtrain.fit): the description and the optimizer's
  // hyperparameters as objects built once, with fields named as the ops' arguments.
  namespace cpu = fusedtrain::cpu;
  using fusedtrain::AdamHyper;
  using fusedtrain::SgdHyper;
  py::class_<fusedtrain::StackSpec>(m, "StackSpec", "A layer stack's description (fusedtrain.stacks.StackSpec).")
      .def(py::init([](std::vector<bool> has_bias, std::vector<int64_t> layer_params,
                       std::vector<int64_t> activations, std::vector<double> activation_params, int64_t loss,
                       int64_t reduction, double loss_param, int64_t ignore_index, double label_smoothing) {
             return fusedtrain::make_stack_spec("StackSpec", has_bias, layer_params, activations,
                                                activation_params, loss, reduction, loss_param, ignore_index,
                                                label_smoothing);
           }),
           py::arg("has_bias"), py::arg("layer_params"), py::arg("activations"), py::arg("activation_params"), py::arg("loss"),
           py::arg("reduction"), py::arg("loss_param"), py::arg("ignore_index"), py::arg("label_smoothing"));
  py::class_<AdamHyper>(m, "AdamHyper", "adam_step_'s hyperparameters.")
      .def(py::init<>())
      .def_readwrite("lr", &AdamHyper::lr)
      .def_readwrite("beta1", &AdamHyper::beta1)
      .def_readwrite("beta2", &AdamHyper::beta2)
      .def_readwrite("eps", &AdamHyper::eps)
      .def_readwrite("weight_decay", &AdamHyper::weight_decay)
      .def_readwrite("decoupled", &AdamHyper::decoupled)
      .def_readwrite("amsgrad", &AdamHyper::amsgrad)
      .def_readwrite("maximize", &AdamHyper::maximize);
  py::class_<SgdHyper>(m, "SgdHyper", "sgd_step_'s hyperparameters.")
      .def(py::init<>())
      .def_readwrite("lr", &SgdHyper::lr)
      .def_readwrite("momentum", &SgdHyper::momentum)
      .def_readwrite("dampening", &SgdHyper::dampening)
      .def_readwrite("weight_decay", &SgdHyper::weight_decay)
      .def_readwrite("nesterov", &SgdHyper::nesterov)
      .def_readwrite("maximize", &SgdHyper::maximize)
      .def_readwrite("first_step", &SgdHyper::first_step);
  py::class_<fusedtrain::FitData>(m, "FitData", "The rows, epochs and batches of one stack fit.")
      .def(py::init([](at::Tensor x, at::Tensor target, int64_t epochs, int64_t batch_size,
                       std::optional<at::Tensor> orders, std::optional<at::Generator> generator,
                       std::optional<at::Tensor> val_x, std::optional<at::Tensor> val_target) {
             return fusedtrain::FitData{std::move(x), std::move(target), epochs, batch_size,
                                        std::move(orders), std::move(generator), std::move(val_x),
                                        std::move(val_target)};
           }),
           py::arg("x"), py::arg("target"), py::arg("epochs"), py::arg("batch_size"), py::arg("orders"),
           py::arg("generator"), py::arg("val_x"), py::arg("val_target"));
  // The train steps of one stack with their buffers kept between calls (FusedTrainStep's eager
  // path on the CPU): the lists borrowed from Python, the kernel run without the GIL.
  py::class_<cpu::StackTrainer>(m, "StackTrainer", "Train steps of one stack (csrc/cpu/stack_cpu.h).")
      .def(py::init<fusedtrain::StackSpec>(), py::arg("spec"))
      .def("adam_step",
           [](cpu::StackTrainer& trainer, const at::Tensor& x, const at::Tensor& target, py::handle params,
              py::handle exp_avgs, py::handle exp_avg_sqs, py::handle max_exp_avg_sqs, py::handle steps,
              const AdamHyper& hyper) {
             constexpr const char* kName = "stack_adam_step_";
             const BorrowedTensors p(params, kName, "params"), m1(exp_avgs, kName, "exp_avgs"),
                 m2(exp_avg_sqs, kName, "exp_avg_sqs"), m2_max(max_exp_avg_sqs, kName, "max_exp_avg_sqs"),
                 s(steps, kName, "steps");
             py::gil_scoped_release release;
             return trainer.adam_step(x, target, p.list(), m1.list(), m2.list(), m2_max.list(), s.list(), hyper);
           })
      .def("sgd_step",
           [](cpu::StackTrainer& trainer, const at::Tensor& x, const at::Tensor& target, py::handle params,
              py::handle momentum_buffers, const SgdHyper& hyper) {
             constexpr const char* kName = "stack_sgd_step_";
             const BorrowedTensors p(params, kName, "params"), b(momentum_buffers, kName, "momentum_buffers");
             py::gil_scoped_release release;
             return trainer.sgd_step(x, target, p.list(), b.list(), hyper);
           });
  m.def("stack_fit_adam_cpu",
        [](const fusedtrain::FitData& data, const Tensors& params, const fusedtrain::StackSpec& spec,
           const Tensors& exp_avgs, const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
           const Tensors& steps, const AdamHyper& hyper) {
          return cpu::stack_fit_adam_cpu(data, params, spec, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper);
        },
        py::call_guard<py::gil_scoped_release>());
  m.def("stack_fit_sgd_cpu",
        [](const fusedtrain::FitData& data, const Tensors& params, const fusedtrain::StackSpec& spec,
           const Tensors& momentum_buffers, const SgdHyper& hyper) {
          return cpu::stack_fit_sgd_cpu(data, params, spec, momentum_buffers, hyper);
        },
        py::call_guard<py::gil_scoped_release>());
#if defined(FUSEDTRAIN_WITH_CUDA)
  // The whole fit of a small stack in one CUDA kernel launch (cuda/stack_fit.h), taking the same
  // objects as the CPU loop; stack_fit_supported_cuda says whether a stack and batch size fit it.
  m.def("stack_fit_supported_cuda",
        [](const fusedtrain::StackSpec& spec, const Tensors& params, const at::Tensor& x, int64_t batch_size,
           int64_t optimizer_state_lists) {
          return fusedtrain::cuda::stack_fit_supported_cuda(spec, params, x, batch_size, optimizer_state_lists);
        },
        py::arg("spec"), py::arg("params"), py::arg("x"), py::arg("batch_size"), py::arg("optimizer_state_lists"),
        py::call_guard<py::gil_scoped_release>());
  m.def("stack_fit_adam_cuda",
        [](const fusedtrain::FitData& data, const Tensors& params, const fusedtrain::StackSpec& spec,
           const Tensors& exp_avgs, const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
           const Tensors& steps, const AdamHyper& hyper) {
          return fusedtrain::cuda::stack_fit_adam_cuda(data, params, spec, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                                       steps, hyper);
        },
        py::call_guard<py::gil_scoped_release>());
  m.def("stack_fit_sgd_cuda",
        [](const fusedtrain::FitData& data, const Tensors& params, const fusedtrain::StackSpec& spec,
           const Tensors& momentum_buffers, const SgdHyper& hyper) {
          return fusedtrain::cuda::stack_fit_sgd_cuda(data, params, spec, momentum_buffers, hyper);
        },
        py::call_guard<py::gil_scoped_release>());
#endif
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
