"""Fake (meta) kernels of the torch.ops.fusedtrain ops, so torch.compile and FakeTensor tracing
see their effect without running them: every op here mutates its inputs and returns nothing."""

import torch


@torch.library.register_fake("fusedtrain::adam_step_")
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1,
                    beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None,
                    found_inf=None):
    return None


@torch.library.register_fake("fusedtrain::sgd_step_")
def _sgd_step_fake(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                   nesterov, maximize, first_step, grad_scale=None, found_inf=None):
    return None
