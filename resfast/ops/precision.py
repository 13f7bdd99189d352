"""Whether a call needs the training ops, and why a fused op cannot reproduce eager's precision under autocast
(the dtypes themselves: dtypes.py)."""

from __future__ import annotations

import torch

from .checks import needs_batch_stats


def wants_grad(args) -> bool:
    """Whether any tensor the op differentiates requires grad (with grad mode on)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in args.grad_tensors())


def training_path(args) -> bool:
    """Whether the call needs the training ops: batch statistics somewhere, or gradients."""
    return any(needs_batch_stats(bn, args.training) for bn in args.batch_norms()) or wants_grad(args)


def precision_reasons(args, dtype: torch.dtype) -> list[str]:
    """Why the fused ops, which run in one dtype, cannot reproduce eager here (empty when they can)."""
    reasons = []
    # under autocast: eager normalises bn_relu_conv's input in its own dtype, the chain's pass-through split keeps
    # it (the cat promotes), and a residual add promotes to the residual's dtype; casting them first would round
    residual = getattr(args, "residual", None)
    x = args.x
    kept = [(name, t.dtype) for name, t in (("input", x if args.keeps_input_precision else None),
                                            ("residual", residual)) if t is not None and t.dtype != dtype]
    for name, dt in kept:
        reasons.append(f"under autocast the {name} is {dt}, not the autocast dtype {dtype}: eager keeps its "
                       "precision where the fused kernels would round it")
    if args.op == "res2net_chain" and training_path(args):

        if len({needs_batch_stats(bn, args.training) for bn in args.bns}) > 1:
            reasons.append("the chain's BatchNorms mix batch and running statistics (the fused chain takes one kind)")
        if len({bn.weight is None for bn in args.bns}) > 1 or len({bn.bias is None for bn in args.bns}) > 1:
            reasons.append("the chain's BatchNorms mix affine and non-affine (the fused chain takes one kind)")
    return reasons
