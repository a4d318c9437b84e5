"""dpolab.memory.saved_tensor_bytes against byte counts worked out by hand from what each torch op saves."""

import torch

from dpolab.memory import saved_tensor_bytes


def test_counts_what_each_op_saves_and_each_storage_once():
    x = torch.randn(1000, requires_grad=True)  # float32: 4,000 bytes
    w = torch.randn(1000, requires_grad=True)
    # exp saves its output (1000 floats)
    value, n = saved_tensor_bytes(lambda: x.exp())
    assert n == 4000

    # y * y saves y twice: one storage, counted once, and exp saved the same y
    def square_of_exp():
        y = x.exp()
        return y * y

    _, n = saved_tensor_bytes(square_of_exp)
    assert n == 4000
    # exp(x) * w saves exp's output and w (mul saves both operands); w excluded leaves 4,000
    _, n_all = saved_tensor_bytes(lambda: x.exp() * w)
    _, n_without_w = saved_tensor_bytes(lambda: x.exp() * w, exclude=[w])
    assert (n_all, n_without_w) == (8000, 4000)
    # nothing requires a gradient: nothing is saved
    _, n = saved_tensor_bytes(lambda: torch.randn(1000).exp())
    assert n == 0
    # the graph is kept: the backward still runs, d/dx sum(exp(x)) = exp(x)
    value.sum().backward()
    torch.testing.assert_close(x.grad, x.detach().exp())
