"""The Triton res2net_chain (eval BatchNorm) against the eager reference: both orders, normal and stage blocks,
stride, groups, dilation, scale 1..5, odd sizes, NCHW and channels_last, fp32 and float64; and a whole timm
Bottle2neck through the Triton backend."""

import itertools

import pytest
import torch
from helpers import TRITON_DEVICE, TRITON_INTERPRET, block_through, needs_triton_runtime, randomize_bn
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resfast
from resfast import ops

pytest.importorskip("triton")
pytestmark = needs_triton_runtime
DEVICE = TRITON_DEVICE
INTERPRET = TRITON_INTERPRET


def _bns(n, width, dtype):
    bns = [nn.BatchNorm2d(width, dtype=dtype).eval() for _ in range(n)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return [bn.to(DEVICE) for bn in bns]


CASES = [c for c in itertools.product([1, 2, 4, 5], ["timm", "paper"], ["normal", "stage"], [1, 2], [1, 2], [1, 2])
         if not (c[2] == "normal" and c[3] != 1) and not (c[0] == 1 and c[1] == "paper")]


@pytest.mark.slow
@pytest.mark.parametrize("scale,order,block_type,stride,groups,dilation", CASES)
def test_matches_reference(scale, order, block_type, stride, groups, dilation):
    dtype = torch.float64 if INTERPRET else torch.float32
    width = 3 * groups  # odd widths per group
    n = max(1, scale - 1) if order == "timm" else scale - 1
    x = torch.randn(2, scale * width, 7, 6, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(width, width // groups, 3, 3, dtype=dtype, device=DEVICE) * 0.3 for _ in range(n)]
    bs = [torch.randn(width, dtype=dtype, device=DEVICE) for _ in range(n)]
    bns = _bns(n, width, dtype)
    kw = dict(scale=scale, biases=bs, stride=stride, dilation=dilation, groups=groups, order=order,
              block_type=block_type)
    ref = ops.res2net_chain_ref(x, ws, bns, **kw)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.res2net_chain(x, ws, bns, **kw)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 2), (3, 9, 11)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("block_type,stride", [("normal", 1), ("stage", 2)])
def test_odd_shapes_fp32(shape, channels_last, block_type, stride):
    N, H, W = shape
    width = 26  # Res2Net 26w: not a multiple of 8
    x = torch.randn(N, 4 * width, H, W, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(width, width, 3, 3, device=DEVICE) * 0.1 for _ in range(3)]
    bns = _bns(3, width, torch.float32)
    ref = ops.res2net_chain_ref(x, ws, bns, scale=4, stride=stride, block_type=block_type)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.res2net_chain(x, ws, bns, scale=4, stride=stride, block_type=block_type)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("width,groups", [(32, 8), (24, 3), (12, 12)], ids=["4-per-group", "8-per-group", "dw"])
@pytest.mark.parametrize("order,block_type,stride", [("timm", "normal", 1), ("paper", "stage", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_res2next_grouped(width, groups, order, block_type, stride, dtype):
    """Res2NeXt: grouped 3x3 convs in the chain, on the multi-group (G_TILE) and depthwise (DIRECT) paths."""
    if dtype == torch.float64 and not INTERPRET:
        pytest.skip("float64 runs under the interpreter only")
    scale = 3
    x = torch.randn(2, scale * width, 5, 7, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(width, width // groups, 3, 3, dtype=dtype, device=DEVICE) * 0.3 for _ in range(scale - 1)]
    bns = _bns(scale - 1, width, dtype)
    kw = dict(scale=scale, stride=stride, groups=groups, order=order, block_type=block_type)
    ref = ops.res2net_chain_ref(x, ws, bns, **kw)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.res2net_chain(x, ws, bns, **kw)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)


def test_timm_bottle2neck_through_triton():
    timm_res2net = pytest.importorskip("timm.models.res2net")
    ds = nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
    for blk in (timm_res2net.Bottle2neck(32, 16, 2, ds, norm_layer=nn.BatchNorm2d),
                timm_res2net.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d)):
        blk.eval()
        randomize_bn(blk)
        blk = blk.to(DEVICE)
        x = torch.randn(2, blk.conv1.in_channels, 8, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
        out, ref = block_through("triton", blk, x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_chain_with_mixed_statistics_is_refused():
    """The Triton chain takes one kind of statistics for all its BatchNorms: a FrozenBatchNorm2d among training
    BatchNorms is refused (auto runs eager)."""
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    ws = [torch.randn(2, 2, 3, 3, device=DEVICE) for _ in range(3)]
    bns = _bns(3, 2, torch.float32)
    bns[1] = ops.BatchNormParams(bns[1].weight, bns[1].bias, bns[1].running_mean, bns[1].running_var, frozen=True)
    with resfast.backend("triton"), pytest.raises(resfast.BackendUnavailableError, match="mix batch and running"):
        ops.res2net_chain(x, ws, bns, scale=4, training=True)


class _AtenLog(TorchDispatchMode):
    """Records every ATen op run outside the kernel launches, with the storages of its tensor inputs; a
    resfast_triton op is recorded and its body run under the log, so the ATen ops inside it are recorded too."""

    def __init__(self):
        super().__init__()
        self.ops, self.triton_ops, self.paused, self.alive = [], [], False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from resfast.backends.triton.library import IMPLS

        if func.namespace == "resfast_triton":
            self.triton_ops.append(func._opname)
            with self:
                return IMPLS[func._opname](*args, **(kwargs or {}))
        if not self.paused:
            flat = [t for t in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
            self.ops.append((func, {t.untyped_storage().data_ptr() for t in flat}))
            self.alive.extend(flat)  # no recorded storage is freed and its address reused by a later tensor
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scale,order,block_type,stride", [
    (4, "timm", "normal", 1), (4, "paper", "stage", 2), (3, "timm", "stage", 1), (2, "paper", "normal", 1),
    (2, "timm", "stage", 2), (1, "timm", "stage", 2), (1, "paper", "stage", 2), (1, "paper", "normal", 1)])
def test_passthrough_rides_on_the_conv_launches(monkeypatch, scale, order, block_type, stride):
    """scale - 1 launches (one when there is no conv at all), the pass-through split done inside them: no ATen op
    reads the input or the output other than views (no copy, no avg_pool2d, no cat)."""
    from resfast.backends.triton.kernels import conv

    dtype = torch.float64 if INTERPRET else torch.float32
    width = 5
    n = max(1, scale - 1) if order == "timm" else scale - 1
    x = torch.randn(2, scale * width, 7, 6, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(width, width, 3, 3, dtype=dtype, device=DEVICE) * 0.3 for _ in range(n)]
    bns = _bns(n, width, dtype)
    kw = dict(scale=scale, stride=stride, order=order, block_type=block_type)
    ref = ops.res2net_chain_ref(x, ws, bns, **kw)
    log, launches, launch = _AtenLog(), [], conv._launch

    def counting_launch(*a, **k):
        launches.append(k.get("HAS_PT"))
        log.paused = True  # the interpreter's own tensor handling is not the op's
        try:
            launch(*a, **k)
        finally:
            log.paused = False

    monkeypatch.setattr(conv, "_launch", counting_launch)
    with resfast.backend("triton"), torch.no_grad(), log:
        out = ops.res2net_chain(x, ws, bns, **kw)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    assert len(launches) == max(1, scale - 1) and log.triton_ops == ["res2net_chain"]
    has_pt = not (order == "timm" and scale == 1)
    assert launches[0] is has_pt and not any(launches[1:])  # the pass-through rides on the first launch
    names = {str(f) for f, _ in log.ops}
    assert not any(k in name for name in names for k in ("avg_pool", "aten.copy_", "aten.cat")), names
    touched = {x.untyped_storage().data_ptr(), out.untyped_storage().data_ptr()}
    assert all(f.is_view for f, storages in log.ops if storages & touched), [str(f) for f, _ in log.ops]


def test_passthrough_launcher_checks_shapes():
    from resfast.backends.triton.kernels.conv import PassThrough, passthrough_fwd

    src = torch.randn(2, 3, 7, 6, device=DEVICE)
    with pytest.raises(ValueError, match="pass-through dst has shape"):
        passthrough_fwd(PassThrough(src, torch.empty(2, 3, 7, 6, device=DEVICE), pool=True, stride=2))
    with pytest.raises(ValueError, match="1 for a copy"):
        passthrough_fwd(PassThrough(src, torch.empty(2, 3, 4, 3, device=DEVICE), pool=False, stride=2))
    dst = torch.full((2, 3, 4, 3), float("nan"), device=DEVICE)
    passthrough_fwd(PassThrough(src, dst, pool=True, stride=2))
    torch.testing.assert_close(dst, torch.nn.functional.avg_pool2d(src, 3, 2, 1), rtol=1e-5, atol=1e-5)


def test_block_fold_cache_reused_and_refreshed():
    """A block's folded BatchNorm is computed once and recomputed when a buffer changes (Triton backend)."""
    from timm.models import res2net as timm_res2net

    dtype = torch.float64 if INTERPRET else torch.float32
    orig = randomize_bn(timm_res2net.Bottle2neck(32, 8, norm_layer=nn.BatchNorm2d)).to(DEVICE, dtype).eval()
    new = resfast.Bottle2neck(32, 8, norm_layer=nn.BatchNorm2d).to(DEVICE, dtype)
    new.load_state_dict(orig.state_dict())
    new.eval()
    x = torch.randn(1, 32, 5, 6, device=DEVICE, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    with resfast.backend("triton"), torch.no_grad():
        torch.testing.assert_close(new(x), orig(x), **tol)
        cache = new.__dict__["_resfast_fold_cache"]
        built = cache.builds
        assert built == 5  # bn1, three chain BatchNorms, bn3
        torch.testing.assert_close(new(x), orig(x), **tol)
        assert cache.builds == built
        for m in (orig, new):
            m.bns[2].running_mean.add_(0.25)
        torch.testing.assert_close(new(x), orig(x), **tol)
        assert cache.builds == built + 1


@pytest.mark.slow
@pytest.mark.parametrize("stride", [1, 2])
def test_whole_eval_block_is_scale_plus_one_launches(monkeypatch, stride):
    """timm's stage-entry Bottle2neck (downsample = 1x1 conv + BN) in eval: conv1 (1 launch), the chain (scale - 1,
    pass-through included), conv3 + bn3 + downsample + add + ReLU (1): scale + 1 launches, and the block's
    output matches timm's. The folded, packed weights are cached: a second forward rebuilds none of them."""
    from timm.models import res2net as timm_res2net

    from resfast.backends.triton.kernels import conv

    dtype = torch.float64 if INTERPRET else torch.float32
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, stride=stride, bias=False), nn.BatchNorm2d(32))
    blk = randomize_bn(timm_res2net.Bottle2neck(16, 8, stride=stride, downsample=ds, scale=4,
                                                norm_layer=nn.BatchNorm2d)).to(DEVICE, dtype).eval()
    x = torch.randn(2, 16, 7, 6, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
    fused = resfast.convert(blk)
    launches = []
    real = conv._launch
    monkeypatch.setattr(conv, "_launch", lambda *a, **k: (launches.append(k["HAS_DS"]), real(*a, **k)))
    with resfast.backend("triton"), torch.no_grad():
        ref = blk(x)
        out = fused(x)
        assert launches == [False] * 4 + [True]  # conv1, 3 chain convs, conv3 with the projection shortcut
        builds = fused.__dict__["_resfast_fold_cache"].builds
        out2 = fused(x)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    # conv1, 3 chain convs, conv3 with the shortcut (one entry: both packed weights and the summed shifts)
    assert builds == 5 and fused.__dict__["_resfast_fold_cache"].builds == builds
