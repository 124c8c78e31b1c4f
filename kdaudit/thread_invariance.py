"""The two CPU operators whose results depend on the thread count, kept at a fixed count.

The thread governor (`kdaudit.threads`) changes torch's thread count while a run is going.
Almost nothing a run computes depends on it: matmuls (MKL), attention over queries of 32 or
more tokens and its backward, embeddings, per-row and per-column reductions give the same bits
at one thread as at two (`tests/test_thread_invariance.py`). Two operators do not:

- LayerNorm's backward sums the weight and bias gradients in one buffer per OpenMP thread,
  each over that thread's share of the rows, and adds the buffers in thread order;
- the CPU flash-attention forward, on queries shorter than 32 tokens (each decoding step of
  generation), gives the work items of threads after the first a scratch buffer whose
  alignment changes the last bits.

A third kind is left as it is: the sum of a whole tensor of more than 32,768 elements, which
ATen cuts into one share per thread. kdaudit's losses sum one value per token of a batch, so it
would come in only with batches of more than 32,768 tokens on a CPU (the presets' have at most
16 × 160 = 2,560); per-row, per-column and norm reductions are not cut that way.

`install(count)` keeps both at `count` threads' bits while torch runs another count: the
LayerNorm gradients are computed as `count` threads would (the rows cut where
`at::parallel_for` cuts them, each share summed by the same kernel on one thread, the shares
added in thread order), and short-query attention runs on `count` threads. At `count` threads
both are the native operators. Only CPU tensors take these paths (LayerNorm: float32 and
float64 only).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_native_layer_norm = F.layer_norm
_native_attention = F.scaled_dot_product_attention
_count: int | None = None       # the thread count whose bits are kept; None: not installed
SHORT_QUERY = 32                # shorter queries: the attention forward runs at `_count`


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run the block on `count` torch threads, then go back to the count before."""
    before = torch.get_num_threads()
    if before != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if before != count:
            torch.set_num_threads(before)


def _backward(dy: Tensor, x: Tensor, shape: list[int], mean: Tensor, rstd: Tensor,
              weight: Tensor | None, bias: Tensor | None, mask: list[bool]):
    return torch.ops.aten.native_layer_norm_backward(dy, x, shape, mean, rstd, weight, bias,
                                                     mask)


def weight_grads_as(count: int, dy: Tensor, x: Tensor, shape: list[int], mean: Tensor,
                    rstd: Tensor, weight: Tensor | None, bias: Tensor | None,
                    mask: list[bool]) -> tuple[Tensor | None, Tensor | None]:
    """(d weight, d bias) as ATen computes them on `count` threads, computed on one: the M
    rows in min(count, M) shares of ceil(M / shares) rows, one buffer per share, the buffers
    added in order."""
    width = math.prod(shape)
    rows = x.numel() // width
    x2, dy2 = x.reshape(rows, width), dy.reshape(rows, width)
    mean2, rstd2 = mean.reshape(rows, 1), rstd.reshape(rows, 1)
    w = weight.reshape(width) if weight is not None else None
    b = bias.reshape(width) if bias is not None else None
    size = -(-rows // min(count, rows))
    dw = db = None
    with threads(1):
        for start in range(0, rows, size):
            part = slice(start, start + size)
            _, pw, pb = _backward(dy2[part], x2[part], [width], mean2[part], rstd2[part], w, b,
                                  [False, *mask[1:]])
            dw = pw if dw is None else dw + pw
            db = pb if db is None else db + pb
    return (dw.view_as(weight) if dw is not None else None,
            db.view_as(bias) if db is not None else None)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps):
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, list(shape), weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = list(shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[2], bias is not None and need[3]]
        dy = dy.contiguous()
        count = _count
        if count is None or torch.get_num_threads() == count or not (mask[1] or mask[2]):
            dx, dw, db = _backward(dy, x, ctx.shape, mean, rstd, weight, bias, mask)
        else:   # the input's gradient is per row: the same at any thread count
            dx = _backward(dy, x, ctx.shape, mean, rstd, weight, bias,
                           [mask[0], False, False])[0] if mask[0] else None
            dw, db = weight_grads_as(count, dy, x, ctx.shape, mean, rstd, weight, bias, mask)
        return dx, None, dw, db, None


def layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """`F.layer_norm`, with the weight and bias gradients of the installed thread count."""
    if (_count is None or input.device.type != "cpu"
            or input.dtype not in (torch.float32, torch.float64) or not torch.is_grad_enabled()
            or not any(t is not None and t.requires_grad for t in (input, weight, bias))
            or (weight is not None and weight.dtype != input.dtype)
            or (bias is not None and bias.dtype != input.dtype)):
        return _native_layer_norm(input, normalized_shape, weight, bias, eps)
    return _LayerNorm.apply(input, tuple(normalized_shape), weight, bias, eps)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, *args, **kwargs
                                 ) -> Tensor:
    """`F.scaled_dot_product_attention`; on a CPU query shorter than `SHORT_QUERY` tokens, run
    on the installed thread count."""
    if (_count is None or query.device.type != "cpu" or query.dim() < 2
            or query.shape[-2] >= SHORT_QUERY or torch.get_num_threads() == _count):
        return _native_attention(query, key, value, *args, **kwargs)
    with threads(_count):
        return _native_attention(query, key, value, *args, **kwargs)


def reproduces_native(count: int) -> bool:
    """Whether `weight_grads_as(count, ...)` on one thread gives the bits ATen gives on
    `count` threads here (call it while torch runs `count` threads)."""
    if torch.get_num_threads() != count:
        raise ValueError(f"call reproduces_native({count}) while torch runs {count} threads, "
                         f"not {torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(4, 37, 24, generator=gen) for _ in range(2))
    w, b = (torch.randn(24, generator=gen) for _ in range(2))
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [24], w, b, 1e-5)
    mask = [True, True, True]
    _, dw, db = _backward(dy, x, [24], mean, rstd, w, b, mask)
    ew, eb = weight_grads_as(count, dy, x, [24], mean, rstd, w, b, mask)
    return torch.equal(dw, ew) and torch.equal(db, eb)


def install(count: int) -> bool:
    """Route `torch.nn.functional.layer_norm` (what `nn.LayerNorm` calls) and
    `F.scaled_dot_product_attention` (what transformers' attention calls) through this
    module's versions, keeping `count` threads' bits, if this torch build reproduces the
    LayerNorm gradients (`reproduces_native`); returns whether it did. Call it at `count`
    threads."""
    global _count
    if count > 1 and not reproduces_native(count):
        return False
    _count = count
    F.layer_norm, F.scaled_dot_product_attention = layer_norm, scaled_dot_product_attention
    return True


def uninstall() -> None:
    global _count
    _count = None
    F.layer_norm, F.scaled_dot_product_attention = _native_layer_norm, _native_attention
