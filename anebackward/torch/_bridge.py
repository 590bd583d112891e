"""Tensor checks and zero-copy views between PyTorch and the C kernels.

A CPU float32 C-contiguous tensor becomes a NumPy array over the same memory
(`t.detach().numpy()`), which the kernel wrappers hand to C as a float*: no
copy in either direction. Outputs are allocated as torch tensors and written
by C through such a view.

What is refused, and the error names the way out:
  - tensors not on the CPU (CUDA, MPS, ...)          -> NotImplementedError
  - float16 / bfloat16 (and any non-float) tensors   -> TypeError
  - non-contiguous float inputs                       -> ValueError (the fix is
    .contiguous(), which copies: the package never copies a float buffer
    behind the caller's back)
  - float64 tensors                                  -> TypeError (the kernels
    are float32; a float64 reference is plain torch ops under autograd, as
    the tests use)
"""
import torch

F32 = torch.float32


def _device_check(fn, name, t):
    if t.device.type != "cpu":
        raise NotImplementedError(
            f"{fn}: {name} is on {t.device}; anebackward's kernels run on the CPU only. "
            f"Move the model and data to the CPU (.cpu()), or use plain PyTorch "
            f"(llama2.c's model.py) for {t.device.type} training")


_DTYPE_HINTS = {
    torch.float16: " anebackward computes in float32; for float16/bfloat16 (autocast) training "
                   "use plain PyTorch (llama2.c's model.py)",
    torch.float64: " anebackward computes in float32; for a float64 reference differentiate "
                   "plain torch ops with autograd"}
_DTYPE_HINTS[torch.bfloat16] = _DTYPE_HINTS[torch.float16]


def float32_check(fn, **tensors):
    """Check the input tensors of one call: CPU, float32, contiguous."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        _device_check(fn, name, t)
        if t.dtype != F32:
            raise TypeError(f"{fn}: {name} must be float32, got {t.dtype}; convert with "
                            f"{name}.float().{_DTYPE_HINTS.get(t.dtype, '')}")
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous (got shape {tuple(t.shape)}, "
                             f"strides {t.stride()}); pass {name}.contiguous() (this copies)")
        if t.is_conj() or t.is_neg():
            raise ValueError(f"{fn}: {name} has a lazy conj/neg bit; pass {name}.resolve_neg()")


def targets_check(fn, name, t, shape):
    """Integer target/token ids on the CPU with the given shape (returns a
    NumPy view; the kernel wrapper converts int64 to int32, a small copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of integer ids, got {type(t).__name__}")
    _device_check(fn, name, t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must hold integer ids (torch.long or torch.int32), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        if t.numel() == torch.Size(shape).numel():
            t = t.reshape(shape)
        else:
            raise ValueError(f"{fn}: {name} must have shape {tuple(shape)} (the leading axes of the "
                             f"input), got {tuple(t.shape)}")
    return t.detach().contiguous().numpy()


def np_view(t):
    """The NumPy array over a checked tensor's memory (no copy)."""
    return t.detach().numpy()


def grad_view(g):
    """An incoming gradient as a contiguous tensor. Autograd may hand over an
    expanded (stride-0) or otherwise strided gradient, e.g. from .sum(); only
    then is it copied."""
    return g if g.is_contiguous() else g.contiguous()
