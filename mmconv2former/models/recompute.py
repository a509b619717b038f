"""Lean training: what a Conv2Former block stores for its backward pass.

A block stores the outputs of its costly operations (the matrix products of
the 1x1 convolutions and the large-kernel depthwise convolution) and
recomputes the cheap rest in the backward pass: LayerNorms, GELUs, the
modulation product and the MLP's 3x3 depthwise convolution (memory-bound: 9
multiply-adds per element of a 4C-wide tensor, but its input, output and the
sum after its GELU would be 12 of the 27 channel-widths a block otherwise
keeps). Gradients are the same. This is ``Conv2Former(recompute=True)``, the
default; :func:`run_blocks` is the one place that chooses how blocks run.

Two implementations of that one policy:

* **Explicit** (CPU, no autocast, not tracing or compiling): each half of the
  block (:class:`ConvModulation`, :class:`ConvMLP`) is one autograd Function.
  Its forward is the module's own forward (every submodule is called as a
  module, so forward hooks fire); the tensors to keep are picked up with
  temporary forward hooks; its backward is the half's chain rule written
  out, recomputing the cheap activations; the MLP's middle (``GELU -> DW3x3
  -> GELU -> +`` and back, :func:`mlp_middle_backward`) is one native sweep
  where the kernel applies. On a 2-core CPU the Conv2Former-T training step is
  about 1.2x as fast as with the selective form below, whose per-operator
  Python dispatch and operator-by-operator MLP make the difference
  (``docs/performance.md``).
* **Selective** (everywhere else: GPU, autocast, ``torch.compile``): PyTorch's
  selective activation checkpointing with the policy :func:`_keep_products`.

The explicit backward covers the modules as this package builds them (exact
or tanh GELU, LayerNorm, :class:`~.layers.ConvNHWC`); a forward hook that
*replaces* a submodule's output (rather than observing it) is seen by the
forward pass but not by these hand-written gradients: train such models with
``recompute='selective'`` (PyTorch's autograd throughout) or ``False``.
"""
import contextlib
import functools
import threading
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from torch.autograd.function import once_differentiable

from .native import (autocast_enabled, depthwise_forward, depthwise_input_grad,
                     depthwise_weight_grad, mlp_backward, mlp_backward_supported, tracing)

aten = torch.ops.aten


# ---------------------------------------------------------------------------- choosing the path
def run_blocks(blocks: nn.Sequential, x: torch.Tensor, with_cp: bool,
               recompute: Union[bool, str]) -> torch.Tensor:
    """Run one stage's blocks for training (grad enabled, training mode).
    ``recompute``: True (explicit where it applies, else selective),
    ``'selective'`` (always selective) or False (store everything)."""
    if with_cp:  # full checkpointing: only block inputs are stored
        for block in blocks:
            x = cp.checkpoint(block, x, use_reentrant=False)
        return x
    if not recompute:
        return blocks(x)
    if (recompute != 'selective' and x.device.type == 'cpu' and not autocast_enabled('cpu')
            and not tracing()):
        with _explicit_scope():
            return blocks(x)
    context = _selective_context()
    if context is None:
        return blocks(x)
    for block in blocks:
        x = cp.checkpoint(block, x, use_reentrant=False, context_fn=context)
    return x


_state = threading.local()


@contextlib.contextmanager
def _explicit_scope():
    previous = getattr(_state, 'explicit', False)
    _state.explicit = True
    try:
        yield
    finally:
        _state.explicit = previous


def explicit() -> bool:
    """Whether the calling module should run its explicit-recompute form:
    inside :func:`run_blocks`' scope, with grad enabled (Function forwards,
    which run without grad, then take the module's plain code)."""
    return getattr(_state, 'explicit', False) and torch.is_grad_enabled()


def _keep_products(ctx, op, *args, **kwargs) -> 'cp.CheckpointPolicy':
    """The selective policy: store matrix products and large-kernel depthwise
    convolutions (kernel > 3), recompute the rest."""
    if op in (aten.mm.default, aten.addmm.default):
        return cp.CheckpointPolicy.MUST_SAVE
    if op is aten.convolution.default and args[1].shape[-1] > 3:
        return cp.CheckpointPolicy.MUST_SAVE
    return cp.CheckpointPolicy.PREFER_RECOMPUTE


@functools.lru_cache(maxsize=None)
def _selective_context():
    """``context_fn`` for :func:`torch.utils.checkpoint.checkpoint` with the
    policy above, or None where this torch lacks selective checkpointing
    (< 2.4): blocks then run plainly, storing everything."""
    if not hasattr(cp, 'create_selective_checkpoint_contexts'):
        print_log('Conv2Former: this torch has no selective activation checkpointing '
                  '(torch >= 2.4); recompute=True falls back to storing all activations '
                  'off the CPU', logger='current', level=30)
        return None
    return functools.partial(cp.create_selective_checkpoint_contexts, _keep_products)


# ---------------------------------------------------------------------------- explicit form
@contextlib.contextmanager
def _outputs(*modules: nn.Module):
    """Collect the outputs of ``modules`` during the ``with`` body (the last
    call of each), through temporary forward hooks that run after the user's."""
    found: List[Optional[torch.Tensor]] = [None] * len(modules)

    def keep(index, module, args, output):
        found[index] = output

    handles = [m.register_forward_hook(functools.partial(keep, i)) for i, m in enumerate(modules)]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _forward_keeping(ctx, module: nn.Module, x: torch.Tensor, params, keep) -> torch.Tensor:
    """A Function's forward: ``module``'s own forward (grad is off inside a
    Function, so it takes the plain code), saving ``x``, the outputs of the
    ``keep`` submodules and ``params`` for the backward pass."""
    with _outputs(*keep) as kept:
        out = module.forward(x)
    ctx.module = module
    ctx.save_for_backward(x, *kept, *params)
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _linear_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """Weight and bias gradients of a 1x1 convolution applied to ``x``."""
    grad = _rows(grad)
    return (grad.t() @ _rows(x)).view_as(weight), grad.sum(0)


def _bias_grad(grad, bias):
    return grad if bias is not None else None


class _Modulation(torch.autograd.Function):
    """``proj(att(y) * v(y))``, ``y = norm(x)``, keeping ``x``, ``att.0``'s,
    ``att``'s and ``v``'s outputs."""

    @staticmethod
    def forward(ctx, x, module, *params):
        return _forward_keeping(ctx, module, x, params, (module.att[0], module.att, module.v))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        m = ctx.module
        x, a, d, v, norm_w, norm_b, att_w, att_b, dw_w, dw_b, v_w, v_b, proj_w, proj_b = ctx.saved_tensors
        y, mean, rstd = aten.native_layer_norm(x, [x.shape[-1]], norm_w, norm_b, m.norm.eps)
        g = F.gelu(a, approximate=m.att[1].approximate)
        grad_proj_w, grad_proj_b = _linear_grads(grad_out, d * v, proj_w)
        grad_m = (_rows(grad_out) @ proj_w.flatten(1)).view_as(d)
        grad_d = grad_m * v
        grad_v = grad_m.mul_(d)
        grad_dw_w, grad_dw_b = depthwise_weight_grad(g, grad_d, dw_w, dw_b is not None,
                                                     m.att[2].native_weight_grad)
        grad_a = aten.gelu_backward(depthwise_input_grad(grad_d, g, dw_w), a,
                                    approximate=m.att[1].approximate)
        grad_att_w, grad_att_b = _linear_grads(grad_a, y, att_w)
        grad_v_w, grad_v_b = _linear_grads(grad_v, y, v_w)
        grad_y = (_rows(grad_a) @ att_w.flatten(1)).addmm_(_rows(grad_v), v_w.flatten(1))
        grad_x, grad_norm_w, grad_norm_b = aten.native_layer_norm_backward(
            grad_y.view_as(x), x, [x.shape[-1]], mean, rstd, norm_w, norm_b, [True, True, True])
        return (grad_x, None, grad_norm_w, grad_norm_b, grad_att_w, _bias_grad(grad_att_b, att_b),
                grad_dw_w, grad_dw_b, grad_v_w, _bias_grad(grad_v_b, v_b),
                grad_proj_w, _bias_grad(grad_proj_b, proj_b))


def mlp_middle_backward(grad_out: torch.Tensor, f: torch.Tensor, fc2_w: torch.Tensor,
                        pos_w: torch.Tensor, pos_b: Optional[torch.Tensor],
                        approximate: str = 'none', native: bool = True):
    """The MLP's backward pass from ``fc2``'s output back to ``fc1``'s output
    ``f``, recomputing ``s = h + GELU(pos(h))``, ``h = GELU(f)`` on the way.
    Returns the gradient at ``f`` and the (weight, bias) gradients of ``fc2``
    and ``pos``. With ``native``, exact GELU and a shape the kernel takes, the
    middle is one native sweep (:func:`~.native.mlp_backward`); otherwise
    PyTorch's operators, one by one, freeing each 4C-wide tensor early."""
    grad_s = (_rows(grad_out) @ fc2_w.flatten(1)).view_as(f)
    if native and approximate == 'none' and mlp_backward_supported(f, pos_w):
        s, grad_f, grad_pos_w, grad_pos_b = mlp_backward(f, grad_s, pos_w, pos_b)
        return grad_f, _linear_grads(grad_out, s, fc2_w), (grad_pos_w, grad_pos_b)
    h = F.gelu(f, approximate=approximate)
    q = depthwise_forward(h, pos_w, pos_b)
    s = F.gelu(q, approximate=approximate).add_(h)
    grad_fc2 = _linear_grads(grad_out, s, fc2_w)
    del s
    grad_q = aten.gelu_backward(grad_s, q, approximate=approximate)
    del q
    grad_pos = depthwise_weight_grad(h, grad_q, pos_w, pos_b is not None, native)
    grad_h = depthwise_input_grad(grad_q, h, pos_w).add_(grad_s)
    del grad_s, grad_q, h
    return aten.gelu_backward(grad_h, f, approximate=approximate), grad_fc2, grad_pos


class _MLP(torch.autograd.Function):
    """``fc2(h + act(pos(h)))``, ``h = act(fc1(norm(x)))``, keeping ``x`` and
    ``fc1``'s output."""

    @staticmethod
    def forward(ctx, x, module, *params):
        return _forward_keeping(ctx, module, x, params, (module.fc1,))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        m = ctx.module
        x, f, norm_w, norm_b, fc1_w, fc1_b, pos_w, pos_b, fc2_w, fc2_b = ctx.saved_tensors
        grad_f, (grad_fc2_w, grad_fc2_b), (grad_pos_w, grad_pos_b) = mlp_middle_backward(
            grad_out, f, fc2_w, pos_w, pos_b, m.act.approximate, m.pos.native_weight_grad)
        y, mean, rstd = aten.native_layer_norm(x, [x.shape[-1]], norm_w, norm_b, m.norm.eps)
        grad_fc1_w, grad_fc1_b = _linear_grads(grad_f, y, fc1_w)
        grad_y = (_rows(grad_f) @ fc1_w.flatten(1)).view_as(x)
        grad_x, grad_norm_w, grad_norm_b = aten.native_layer_norm_backward(
            grad_y, x, [x.shape[-1]], mean, rstd, norm_w, norm_b, [True, True, True])
        return (grad_x, None, grad_norm_w, grad_norm_b, grad_fc1_w, _bias_grad(grad_fc1_b, fc1_b),
                grad_pos_w, _bias_grad(grad_pos_b, pos_b), grad_fc2_w, _bias_grad(grad_fc2_b, fc2_b))


def modulation(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:class:`ConvModulation`'s forward, storing what the explicit form keeps."""
    return _Modulation.apply(
        x, module, module.norm.weight, module.norm.bias, module.att[0].weight, module.att[0].bias,
        module.att[2].weight, module.att[2].bias, module.v.weight, module.v.bias,
        module.proj.weight, module.proj.bias)


def mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:class:`ConvMLP`'s forward, storing what the explicit form keeps."""
    return _MLP.apply(
        x, module, module.norm.weight, module.norm.bias, module.fc1.weight, module.fc1.bias,
        module.pos.weight, module.pos.bias, module.fc2.weight, module.fc2.bias)


__all__ = ['explicit', 'mlp', 'mlp_middle_backward', 'modulation', 'run_blocks']
