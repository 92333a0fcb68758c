// The hyperparameters of adam_step_ and sgd_step_ (their float and bool arguments, in their
// order), as the typed structs every fused step and loop takes, on every device.
#pragma once

namespace fusedtrain {

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, amsgrad, maximize;
};

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;  // first_step: the momentum buffers start as the gradient
};

}  // namespace fusedtrain
