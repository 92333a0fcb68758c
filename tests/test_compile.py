"""torch.compile traces the ops through their fake kernels (aot_eager: the fake kernels and
functionalization are exercised without paying for code generation)."""

import pytest
import torch

import fusedtrain
from fusedtrain.nn.functional import linear_mse_loss

pytestmark = pytest.mark.skipif(not fusedtrain._extension.native_available(), reason="native extension not built")


def adam_inputs():
    g = torch.Generator().manual_seed(0)
    return ([torch.randn(5, generator=g)], [torch.randn(5, generator=g)], [torch.zeros(5)], [torch.zeros(5)],
            [torch.tensor(0.0)])


def test_compiled_adam_step_equals_eager():
    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        torch.ops.fusedtrain.adam_step_(params, grads, exp_avgs, exp_avg_sqs, [], steps, 0.01, 0.9,
                                        0.999, 1e-8, 0.0, False, False, False)
        return params[0] * 2

    eager, compiled = adam_inputs(), adam_inputs()
    want = step(*eager)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    torch.testing.assert_close(got, want)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b[0], a[0])


def test_compiled_linear_mse_loss_and_backward():
    x, target = torch.randn(8, 3), torch.randn(8, 2)
    weight = torch.randn(2, 3, requires_grad=True)
    loss_fn = torch.compile(lambda a, w, y: linear_mse_loss(a, w, None, y), backend="aot_eager", fullgraph=True)
    loss = loss_fn(x, weight, target)
    loss.backward()
    want = torch.nn.functional.mse_loss(x @ weight.T, target)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(weight.grad, torch.autograd.grad(want, weight)[0])
