"""Fake (meta) kernels of the torch.ops.fusedtrain ops, so torch.compile and FakeTensor tracing
see their effect without running them: the optimizer ops mutate their inputs and return
nothing; the others return new tensors of the shapes computed here."""

import torch


@torch.library.register_fake("fusedtrain::adam_step_")
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1,
                    beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None,
                    found_inf=None, lr_tensor=None):
    return None


@torch.library.register_fake("fusedtrain::sgd_step_")
def _sgd_step_fake(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                   nesterov, maximize, first_step, grad_scale=None, found_inf=None,
                   lr_tensor=None):
    return None


@torch.library.register_fake("fusedtrain::adam_step_hyper_tensor_")
def _adam_step_hyper_tensor_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                                 hyper, decoupled, amsgrad, maximize, grad_scale=None,
                                 found_inf=None, lr_tensor=None):
    return None


@torch.library.register_fake("fusedtrain::sgd_step_hyper_tensor_")
def _sgd_step_hyper_tensor_fake(params, grads, momentum_buffers, hyper, nesterov, maximize,
                                first_step, grad_scale=None, found_inf=None, lr_tensor=None):
    return None


@torch.library.register_fake("fusedtrain::linear_mse_fwd_bwd")
def _linear_mse_fwd_bwd_fake(x, weight, bias, target, reduction, need_grad_x, need_grad_params=True):
    return (
        x.new_empty(()),
        weight.new_empty(weight.shape if need_grad_params else (0,)),
        x.new_empty(bias.shape if need_grad_params and bias is not None else (0,)),
        x.new_empty(x.shape if need_grad_x else (0,)),
    )


@torch.library.register_fake("fusedtrain::stack_fwd_bwd")
def _stack_fwd_bwd_fake(x, target, params, has_bias, layer_params, activations, activation_params, loss,
                        reduction, loss_param, ignore_index, label_smoothing, need_grads=True):
    return x.new_empty(()), [p.new_empty(p.shape) for p in params] if need_grads else []


@torch.library.register_fake("fusedtrain::stack_adam_step_")
def _stack_adam_step_fake(x, target, params, *args, **kwargs):
    return x.new_empty(())


@torch.library.register_fake("fusedtrain::stack_sgd_step_")
def _stack_sgd_step_fake(x, target, params, *args, **kwargs):
    return x.new_empty(())
