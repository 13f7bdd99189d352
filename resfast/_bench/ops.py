"""Per-op benchmark: each fused op at every distinct layer shape of a model, per provider, mode and dtype.

Layer shapes are captured by running the resfast model once on the meta device (free) and recording every op
call. Providers: ``resfast-triton`` / ``resfast-cuda`` (the op on that backend; skipped with the reason when it
cannot run), ``eager-nchw`` / ``eager-cl`` (the eager reference, i.e. the unfused PyTorch ops, on NCHW or
channels_last tensors), ``compile`` / ``compile-max-autotune`` (torch.compile of the eager reference).
Modes: ``forward`` (eval BatchNorm), ``backward`` (training; the backward pass alone), ``full`` (training
forward + backward). Forward rows also report GB/s for the op's minimal bytes and the % of the memory floor
(minimal bytes / measured copy bandwidth).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from .. import models as rmodels
from .. import ops
from ..ops import dispatch
from ..ops.batchnorm import BatchNormParams
from .timing import copy_bandwidth_gbs, time_fn

MODELS = {
    "res2net50_26w_4s": rmodels.res2net50_26w_4s,
    "res2net50_14w_8s": rmodels.res2net50_14w_8s,
    "res2net50_48w_2s": rmodels.res2net50_48w_2s,
    "resnext50_32x4d": rmodels.resnext50_32x4d,
    "resnetv2_50": rmodels.resnet50_v2,  # the ResNet50V2 article's layout, the shapes of timm's resnetv2_50
}
PROVIDERS = ("resfast-triton", "resfast-cuda", "eager-nchw", "eager-cl", "compile", "compile-max-autotune")
MODES = ("forward", "backward", "full")
STAGE_OF_SIZE = {56: 1, 28: 2, 14: 3, 7: 4}


class Layer(NamedTuple):
    op: str
    name: str  # e.g. "s1 chain stage k3 C104 s2"
    stage: int
    spec: dict  # what is needed to rebuild the call at any batch size


def capture_layers(model_name: str, size: int = 224) -> list[Layer]:
    """Every distinct op call of the model's forward (eval, batch 1), in order of first appearance."""
    with torch.device("meta"):
        model = MODELS[model_name]().eval()
    seen, layers = set(), []
    real_run = dispatch.run

    def record(op, args):
        if op not in REFS:  # e.g. scale_add_relu (SE blocks): elementwise, not a layer of these models
            return real_run(op, args)
        spec = _spec(op, args)
        key = (op, tuple(sorted((k, str(v)) for k, v in spec.items())))
        if key not in seen:
            seen.add(key)
            stage = STAGE_OF_SIZE.get(spec["out_hw"][0], 0)
            layers.append(Layer(op, _name(op, spec, stage), stage, spec))
        return real_run(op, args)

    dispatch.run = record
    try:
        with torch.no_grad(), ops.backend("eager"):
            model(torch.empty(1, 3, size, size, device="meta"))
    finally:
        dispatch.run = real_run
    return layers


def _spec(op, a) -> dict:
    x = a.x
    if op == "res2net_chain":
        hw = [(s + 2 * a.dilation - 2 * a.dilation - 1) // a.stride + 1 for s in x.shape[2:]]
        return {"C": x.shape[1], "HW": tuple(x.shape[2:]), "out_hw": tuple(hw), "scale": a.scale, "stride": a.stride,
                "dilation": a.dilation, "groups": a.groups, "order": a.order, "block_type": a.block_type,
                "n_convs": len(a.weights), "width": a.width}
    w = a.weight
    cin = x.shape[1]
    h = (x.shape[2] + 2 * a.padding[0] - a.dilation[0] * (w.shape[2] - 1) - 1) // a.stride[0] + 1
    wd = (x.shape[3] + 2 * a.padding[1] - a.dilation[1] * (w.shape[3] - 1) - 1) // a.stride[1] + 1
    spec = {"C": cin, "HW": tuple(x.shape[2:]), "out_hw": (h, wd), "w": tuple(w.shape), "stride": a.stride,
            "padding": a.padding, "dilation": a.dilation, "groups": a.groups, "residual": a.residual is not None}
    if op == "conv_bn_relu":
        spec["relu"] = a.relu
        sc = a.shortcut  # the projection shortcut computed inside the op: (C_in', H', W', stride)
        spec["shortcut"] = None if sc is None else (sc.x.shape[1], *sc.x.shape[2:], sc.stride[0])
    return spec


def _name(op, s, stage) -> str:
    if op == "res2net_chain":
        return (f"s{stage} chain {s['block_type']} C{s['C']} x{s['scale']} g{s['groups']} st{s['stride']} "
                f"{s['HW'][0]}px")
    k = s["w"][2]
    extra = ((" +res" if s["residual"] else "") + (" +proj" if s.get("shortcut") else "")
             + ("" if s.get("relu", True) else " norelu"))
    return f"s{stage} {op} {k}x{k} {s['C']}->{s['w'][0]} g{s['groups']} st{s['stride'][0]}{extra} {s['HW'][0]}px"


def _bn(C, device, dtype, grad):
    def t(v):
        return v.requires_grad_(grad)

    return BatchNormParams(t(torch.rand(C, device=device, dtype=dtype) + 0.5), t(torch.randn(C, device=device,
                           dtype=dtype) * 0.1), torch.randn(C, device=device, dtype=dtype) * 0.1,
                           torch.rand(C, device=device, dtype=dtype) + 0.5, None, 0.1, 1e-5)


def build_call(layer: Layer, batch: int, device, dtype, channels_last: bool, training: bool):
    """(fn(op_callable) -> output, tensors that need grads, minimal bytes of the forward)."""
    s = layer.spec
    g = training
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, s["C"], *s["HW"], device=device, dtype=dtype).contiguous(memory_format=fmt)
    x.requires_grad_(g)
    isz = x.element_size()
    if layer.op == "res2net_chain":
        wd = s["width"]
        ws = [torch.randn(wd, wd // s["groups"], 3, 3, device=device, dtype=dtype).mul_(0.1).contiguous(
            memory_format=fmt).requires_grad_(g) for _ in range(s["n_convs"])]
        bns = [_bn(wd, device, dtype, g) for _ in range(s["n_convs"])]
        kw = dict(scale=s["scale"], stride=s["stride"], dilation=s["dilation"], groups=s["groups"], order=s["order"],
                  block_type=s["block_type"], training=training)
        out_numel = batch * s["C"] * s["out_hw"][0] * s["out_hw"][1]
        nbytes = (x.numel() + out_numel + sum(w.numel() for w in ws)) * isz

        def call(fn):
            return fn(x, ws, bns, **kw)
        leaves = [x, *ws, *[t for b in bns for t in (b.weight, b.bias)]]
        return call, leaves, nbytes
    w = torch.randn(*s["w"], device=device, dtype=dtype).mul_(0.1).contiguous(memory_format=fmt).requires_grad_(g)
    cout = s["w"][0]
    bn = _bn(cout if layer.op == "conv_bn_relu" else s["C"], device, dtype, g)
    out_shape = (batch, cout, *s["out_hw"])
    res = torch.randn(out_shape, device=device, dtype=dtype).contiguous(memory_format=fmt) if s["residual"] else None
    kw = dict(stride=s["stride"], padding=s["padding"], dilation=s["dilation"], groups=s["groups"], training=training,
              residual=res)
    out_numel = out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3]
    nbytes = (x.numel() + w.numel() + out_numel * (2 if res is not None else 1)) * isz
    extra_leaves = []
    if layer.op == "conv_bn_relu":
        kw["relu"] = s["relu"]
        if s.get("shortcut"):
            cs, hs, ws_, st = s["shortcut"]
            xs = torch.randn(batch, cs, hs, ws_, device=device, dtype=dtype).contiguous(memory_format=fmt)
            wsc = torch.randn(cout, cs, 1, 1, device=device, dtype=dtype).mul_(0.1).requires_grad_(g)
            bns = _bn(cout, device, dtype, g)
            kw["shortcut"] = ops.ConvShortcut(xs.requires_grad_(g), wsc, bns, st)
            # a strided 1x1 conv needs only the pixels it samples (the output's)
            nbytes += (batch * cs * s["out_hw"][0] * s["out_hw"][1] + wsc.numel()) * isz
            extra_leaves = [xs, wsc, bns.weight, bns.bias]

        def call(fn):
            return fn(x, w, bn, **kw)
    else:
        def call(fn):
            return fn(x, bn, w, **kw)
    return call, [x, w, bn.weight, bn.bias, *extra_leaves], nbytes


REFS = {"res2net_chain": ops.res2net_chain_ref, "conv_bn_relu": ops.conv_bn_relu_ref,
        "bn_relu_conv": ops.bn_relu_conv_ref}
OPS = {"res2net_chain": ops.res2net_chain, "conv_bn_relu": ops.conv_bn_relu, "bn_relu_conv": ops.bn_relu_conv}


def provider_fn(provider: str, op: str):
    """(callable with the op's signature, reason it cannot run or None)."""
    if provider.startswith("resfast-"):
        name = provider.split("-", 1)[1]
        reasons = dispatch.get(name).not_supported_reasons(op)
        if reasons:
            return None, "; ".join(reasons)

        def f(*a, **k):
            with ops.backend(name):
                return OPS[op](*a, **k)
        return f, None
    if provider.startswith("eager"):
        return REFS[op], None
    mode = {"compile": None, "compile-max-autotune": "max-autotune"}[provider]
    return torch.compile(REFS[op], mode=mode, dynamic=False), None


def time_layer(layer, provider, mode, batch, device, dtype) -> dict:
    fn, reason = provider_fn(provider, layer.op)
    if fn is None:
        return {"skipped": reason}
    training = mode != "forward"
    call, leaves, nbytes = build_call(layer, batch, device, dtype, provider != "eager-nchw", training)
    if provider.startswith("resfast-"):  # a backend may still refuse these inputs (training, grads, dtype ...)
        try:
            with torch.no_grad() if mode == "forward" else torch.enable_grad():
                call(fn)
        except dispatch.BackendUnavailableError as e:
            return {"skipped": str(e).split(":", 1)[1].strip().replace("\n  - ", "; ").lstrip("- ")}
    if mode == "forward":
        def run():
            with torch.no_grad():
                return call(fn)
    elif mode == "full":
        def run():
            out = call(fn)
            out.backward(torch.ones_like(out))
    else:  # backward alone: one forward, then time backward with the graph retained
        out = call(fn)
        grad = torch.ones_like(out)

        def run():
            out.backward(grad, retain_graph=True)
    run()  # warm-up (and compilation)
    t = time_fn(run, device)
    row = {**t, "min_bytes": nbytes if mode == "forward" else None}
    for leaf in leaves:
        leaf.grad = None
    return row


def run(models, providers, modes, batches, dtypes, device, stages=None, progress=None) -> tuple[list, float]:
    bw = copy_bandwidth_gbs(device)
    rows, done = [], set()
    for model in models:
        for layer in capture_layers(model):
            if stages and layer.stage not in stages:
                continue
            for provider, mode, batch, dtype in itertools.product(providers, modes, batches, dtypes):
                key = (layer.op, str(sorted(layer.spec.items())), provider, mode, batch, dtype)
                if key in done:  # the same shape in another model: measured once
                    continue
                done.add(key)
                r = time_layer(layer, provider, mode, batch, device, dtype)
                row = {"kind": "ops", "model": model, "op": layer.op, "layer": layer.name, "stage": layer.stage,
                       "shape": str(layer.spec), "provider": provider, "mode": mode, "batch": batch,
                       "dtype": str(dtype).replace("torch.", ""), **r}
                if r.get("median_ms") and r.get("min_bytes"):
                    row["gbs"] = r["min_bytes"] / (r["median_ms"] * 1e-3) / 1e9
                    row["pct_of_floor"] = 100 * row["gbs"] / bw
                    if device.type == "cuda":  # the floor: H100 HBM at a nominal 3.0 TB/s
                        row["pct_of_3tbs"] = 100 * row["gbs"] / 3000
                rows.append(row)
                if progress:
                    progress.update(1)
    base = {(r["op"], r["shape"], r["mode"], r["batch"], r["dtype"]): r.get("median_ms") for r in rows
            if r["provider"] == "eager-cl"}
    for r in rows:
        b = base.get((r["op"], r["shape"], r["mode"], r["batch"], r["dtype"]))
        r["speedup_vs_eager"] = b / r["median_ms"] if b and r.get("median_ms") else None
    return rows, bw
