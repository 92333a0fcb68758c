// The fused training loop of fusedtrain.fit and FusedTrainStep (see linear_mse_fit.h). After the
// checks, each step is the row loops of linear_mse_rows.h into reused buffers, then the active
// instruction set's Adam or SGD loop on weight and bias: no tensor is allocated per step, so a
// tiny model steps in nanoseconds rather than the microseconds of an eager step.
#include "linear_mse_fit.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../multi_tensor_checks.h"
#include "linear_mse_rows.h"

namespace fusedtrain {
namespace cpu {
namespace {

constexpr const char* kOp = "linear_mse_fit_";

// The optimizer's view of weight and bias: pointers into their tensors and into the optimizer
// state, updated with the element loops of the multi-tensor kernels.
template <typename T>
class ParamUpdater {
 public:
  ParamUpdater(std::vector<at::Tensor> params, at::TensorList state, const FitOptimizer& o)
      : params_(std::move(params)), o_(o) {
    const size_t n = params_.size();
    if (o.adam) {
      check_list_length(kOp, "state", state, (o.amsgrad ? 4 : 3) * n);
      for (size_t i = 0; i < n; ++i) {
        check_like_param(kOp, "exp_avgs", state.slice(0, n), i, params_[i]);
        check_like_param(kOp, "exp_avg_sqs", state.slice(n, n), i, params_[i]);
        if (o.amsgrad) check_like_param(kOp, "max_exp_avg_sqs", state.slice(2 * n, n), i, params_[i]);
        steps_.push_back(state[(o.amsgrad ? 3 : 2) * n + i]);
        check_scalar_tensor(kOp, "steps", steps_.back(), at::kCPU, static_cast<int64_t>(i));
      }
    } else {
      check_list_length(kOp, "state", state, o.momentum != 0.0 ? n : 0);
      for (size_t i = 0; i < n && o.momentum != 0.0; ++i) {
        check_like_param(kOp, "momentum_buffers", state, i, params_[i]);
      }
    }
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = params_[i];
      TORCH_CHECK_VALUE(p.is_contiguous(), kOp, ": params must be contiguous");
      for (const at::Tensor& s : state) {
        TORCH_CHECK_VALUE(s.numel() == 1 || s.is_contiguous(), kOp, ": optimizer state must be contiguous");
      }
      grads_.emplace_back(p.numel(), T(0));
      numels_.push_back(p.numel());
      if (o.adam) {
        adam_.push_back(AdamTensor{storage_of(p.scalar_type()), p.data_ptr(), grads_[i].data(),
                                   state[i].data_ptr(), state[n + i].data_ptr(),
                                   o.amsgrad ? state[2 * n + i].data_ptr() : nullptr, {}, {}});
      } else {
        sgd_.push_back(SgdTensor{storage_of(p.scalar_type()), p.data_ptr(), grads_[i].data(),
                                 o.momentum != 0.0 ? state[i].data_ptr() : nullptr});
      }
    }
    first_sgd_step_ = o.first_step;
  }

  T* grad(size_t i) { return grads_[i].data(); }

  void step() {
    const IsaKernels& kernels = active_kernels();
    if (o_.adam) {
      const AdamOptions options{o_.amsgrad, o_.weight_decay != 0.0 && !o_.decoupled, false, 1.0};
      for (size_t i = 0; i < adam_.size(); ++i) {
        const double t = read_scalar(steps_[i]) + 1.0;
        write_scalar(steps_[i], t);
        if (t != coeffs_step_) {  // weight and bias share a step count: fold it once
          // A loop of tiny steps spends much of its time in pow(): from one step to the next,
          // one multiplication gives beta^t to within a few ulps of a double.
          if (t == coeffs_step_ + 1.0) {
            beta1_pow_ *= o_.beta1;
            beta2_pow_ *= o_.beta2;
          } else {
            beta1_pow_ = std::pow(o_.beta1, t);
            beta2_pow_ = std::pow(o_.beta2, t);
          }
          coeffs_step_ = t;
          coeffs_ = math::make_adam_coeffs_from_powers<T>(o_.lr, o_.beta1, o_.beta2, o_.eps,
                                                          o_.weight_decay, o_.decoupled,
                                                          o_.maximize, beta1_pow_, beta2_pow_);
        }
        set_coeffs(adam_[i], coeffs_);
        kernels.adam(options, adam_[i], 0, numels_[i]);
      }
    } else {
      const SgdOptions options{o_.weight_decay != 0.0, o_.momentum != 0.0, first_sgd_step_,
                               o_.nesterov, false, 1.0,
                               math::make_sgd_coeffs<float>(o_.lr, o_.momentum, o_.dampening,
                                                            o_.weight_decay, o_.maximize),
                               math::make_sgd_coeffs<double>(o_.lr, o_.momentum, o_.dampening,
                                                             o_.weight_decay, o_.maximize)};
      for (size_t i = 0; i < sgd_.size(); ++i) kernels.sgd(options, sgd_[i], 0, numels_[i]);
      first_sgd_step_ = false;
    }
  }

 private:
  std::vector<at::Tensor> params_;
  FitOptimizer o_;
  static void set_coeffs(AdamTensor& t, const math::AdamCoeffs<float>& c) { t.coeffs_f32 = c; }
  static void set_coeffs(AdamTensor& t, const math::AdamCoeffs<double>& c) { t.coeffs_f64 = c; }

  std::vector<std::vector<T>> grads_;
  std::vector<int64_t> numels_;
  double coeffs_step_ = -2.0;  // the step count coeffs_ was folded for
  double beta1_pow_ = 1.0;
  double beta2_pow_ = 1.0;
  math::AdamCoeffs<T> coeffs_{};
  std::vector<at::Tensor> steps_;
  std::vector<AdamTensor> adam_;
  std::vector<SgdTensor> sgd_;
  bool first_sgd_step_;
};

template <typename T>
class Trainer {
 public:
  Trainer(const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t reduction,
          at::TensorList state, const FitOptimizer& o)
      : weight_(weight),
        bias_(bias.has_value() ? *bias : at::Tensor()),
        mean_(reduction == at::Reduction::Mean),
        updater_(bias_.defined() ? std::vector<at::Tensor>{weight, bias_}
                                 : std::vector<at::Tensor>{weight},
                 state, o) {}

  // One optimizer step on `rows` rows; returns their loss.
  double train(const at::Tensor& x, const at::Tensor& target) {
    return run(x, target, updater_.grad(0), bias_.defined() ? updater_.grad(1) : nullptr, true);
  }

  double evaluate(const at::Tensor& x, const at::Tensor& target) {
    return run(x, target, nullptr, nullptr, false);
  }

 private:
  double run(const at::Tensor& x, const at::Tensor& target, T* grad_weight, T* grad_bias,
             bool update) {
    const int64_t n = x.size(0), in = x.size(1), out = weight_.size(0);
    const double count = mean_ ? static_cast<double>(n * out) : 1.0;
    double loss_sum;
    if (out <= kMaxFusedOut) {
      loss_sum = fused_linear_mse_rows<T>(
          x.data_ptr<T>(), weight_.data_ptr<T>(), bias_.defined() ? bias_.data_ptr<T>() : nullptr,
          target.data_ptr<T>(), n, in, out, static_cast<T>(2.0 / count), grad_weight, grad_bias,
          nullptr, workspace_);
    } else {
      auto [loss, gw, gb, gx] = linear_mse_fwd_bwd_cpu(
          x, weight_, bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt, target,
          mean_ ? at::Reduction::Mean : at::Reduction::Sum, false, update);
      if (update) {
        std::copy(gw.data_ptr<T>(), gw.data_ptr<T>() + gw.numel(), grad_weight);
        if (grad_bias != nullptr) std::copy(gb.data_ptr<T>(), gb.data_ptr<T>() + gb.numel(), grad_bias);
      }
      loss_sum = loss.item<double>() * count;
    }
    if (update) updater_.step();
    return loss_sum / count;
  }

  at::Tensor weight_;
  at::Tensor bias_;
  bool mean_;
  ParamUpdater<T> updater_;
  std::vector<T> workspace_;
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> fit(const at::Tensor& x, const at::Tensor& target,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, int64_t reduction,
                                       int64_t epochs, int64_t batch_size,
                                       std::optional<at::Generator> generator,
                                       const std::optional<at::Tensor>& val_x,
                                       const std::optional<at::Tensor>& val_target,
                                       at::TensorList state, const FitOptimizer& o) {
  Trainer<T> trainer(weight, bias, reduction, state, o);
  const int64_t n = x.size(0);
  const int64_t batch = batch_size > 0 ? std::min(batch_size, n) : n;
  at::Tensor train_losses = at::empty({epochs}, x.options());
  at::Tensor val_losses = at::empty({val_x.has_value() ? epochs : 0}, x.options());
  at::Tensor batch_x, batch_target;  // gathered rows of a shuffled batch, reused
  for (int64_t epoch = 0; epoch < epochs; ++epoch) {
    at::Tensor order = generator.has_value() ? at::randperm(n, *generator, at::kLong) : at::Tensor();
    double loss_total = 0.0;
    int64_t batches = 0;
    // do-while: an empty set is one empty batch, as the stock loop's order.split(...) gives, and
    // so one step on zero gradients (Adam still moves by its moments).
    int64_t first = 0;
    do {
      const int64_t rows = std::min(batch, n - first);
      if (!order.defined()) {
        loss_total += rows == n ? trainer.train(x, target)
                                : trainer.train(x.narrow(0, first, rows), target.narrow(0, first, rows));
      } else {
        const at::Tensor index = order.narrow(0, first, rows);
        batch_x = at::index_select(x, 0, index);
        batch_target = at::index_select(target, 0, index);
        loss_total += trainer.train(batch_x, batch_target);
      }
      first += batch;
      ++batches;
    } while (first < n);
    train_losses.data_ptr<T>()[epoch] = static_cast<T>(loss_total / static_cast<double>(batches));
    if (val_x.has_value()) {
      val_losses.data_ptr<T>()[epoch] = static_cast<T>(trainer.evaluate(*val_x, *val_target));
    }
  }
  return {train_losses, val_losses};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_mse_fit_cpu(
    const at::Tensor& x, const at::Tensor& target, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t reduction, int64_t epochs,
    int64_t batch_size, std::optional<at::Generator> generator,
    const std::optional<at::Tensor>& val_x, const std::optional<at::Tensor>& val_target,
    at::TensorList state, const FitOptimizer& optimizer) {
  check_linear_mse_inputs(kOp, x, weight, bias, target, reduction);
  TORCH_CHECK_VALUE(x.is_contiguous() && target.is_contiguous(), kOp,
                    ": x and target must be contiguous");
  TORCH_CHECK_VALUE(epochs >= 0, kOp, ": epochs must be >= 0, got ", epochs);
  TORCH_CHECK_VALUE(batch_size >= 0, kOp, ": batch_size must be >= 0 (0: full batch), got ",
                    batch_size);
  TORCH_CHECK_VALUE(val_x.has_value() == val_target.has_value(), kOp,
                    ": val_x and val_target come together");
  if (val_x.has_value()) {
    check_linear_mse_inputs(kOp, *val_x, weight, bias, *val_target, reduction);
    TORCH_CHECK_VALUE(val_x->is_contiguous() && val_target->is_contiguous(), kOp,
                      ": val_x and val_target must be contiguous");
  }
  const at::NoGradGuard no_grad;  // the params are updated in place, outside autograd
  if (x.scalar_type() == at::kDouble) {
    return fit<double>(x, target, weight, bias, reduction, epochs, batch_size, generator, val_x,
                       val_target, state, optimizer);
  }
  return fit<float>(x, target, weight, bias, reduction, epochs, batch_size, generator, val_x,
                    val_target, state, optimizer);
}

namespace {

at::Tensor linear_mse_train_step_cpu(const at::Tensor& x, const at::Tensor& target,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t reduction,
                                     at::TensorList state, bool adam, double lr,
                                     double weight_decay, bool maximize, double beta1,
                                     double beta2, double eps, bool decoupled, bool amsgrad,
                                     double momentum, double dampening, bool nesterov,
                                     bool first_step) {
  const FitOptimizer optimizer{adam,      lr,      weight_decay, maximize, beta1,
                               beta2,     eps,     decoupled,    amsgrad,  momentum,
                               dampening, nesterov, first_step};
  auto [losses, unused] = linear_mse_fit_cpu(x, target, weight, bias, reduction, 1, 0,
                                             std::nullopt, std::nullopt, std::nullopt, state,
                                             optimizer);
  return losses.squeeze(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("linear_mse_train_step_", &linear_mse_train_step_cpu);
}

}  // namespace cpu
}  // namespace fusedtrain
