"""Synchronised BatchNorm: resfast.SyncBatchNorm2d / SyncBatchNormAct2d and resfast.convert_sync_batchnorm.

One process: exactly nn.BatchNorm2d (outputs, gradients, running statistics over several steps). Two processes
(gloo on CPU, spawned): a model of resfast blocks converted with convert_sync_batchnorm, trained under
DistributedDataParallel with each rank on half the batch, against one process training the unconverted model on
the whole batch. Plus: the blocks keep calling the fused ops, activations and state_dict keys are kept, and only
the eager backend runs a synchronised BatchNorm in training.
"""

import datetime
import functools
import multiprocessing
import os
import traceback
import warnings

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import resfast
from resfast.nn.layers import is_bn_relu, is_supported_bn
from resfast.ops import dispatch
from resfast.ops.batchnorm import BatchNormParams, as_bn_params
from resfast.ops.checks import SYNCED_BN_REASON

timm = pytest.importorskip("timm")
rv2 = pytest.importorskip("timm.models.resnetv2")
from timm.layers import BatchNormAct2d, create_conv2d  # noqa: E402

BN_ACT = dict(conv_layer=create_conv2d, norm_layer=BatchNormAct2d)
STEPS = 3
GLOBAL_BATCH = 4
WORLD = 2
TOL = dict(rtol=1e-10, atol=1e-10)


# --- one process: SyncBatchNorm2d is nn.BatchNorm2d ----------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(momentum=0.3, eps=1e-3),
], ids=["default", "momentum_none", "no_affine", "no_running_stats", "momentum_eps"])
def test_single_process_is_batchnorm2d(kw):
    ref = randomize_bn(nn.BatchNorm2d(5, **kw)).double()
    new = resfast.SyncBatchNorm2d(5, **kw).double()
    new.load_state_dict(ref.state_dict())
    assert list(new.state_dict()) == list(ref.state_dict())
    for step in range(4):
        train = step < 3
        ref.train(train)
        new.train(train)
        x = torch.randn(3, 5, 4, 3, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), new(xb)
        torch.testing.assert_close(yb, ya, **TOL)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xb.grad, xa.grad, **TOL)
        for (k, p), q in zip(ref.named_parameters(), new.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=k)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(new.state_dict()[k], v, **TOL, msg=k)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        new.train()(torch.randn(1, 5, 1, 1, dtype=torch.float64))


def _blocks_model(dtype=torch.float64):
    """resfast blocks of each kind: torchvision Bottleneck with a projection shortcut (conv_bn_relu), timm
    Bottle2neck (res2net_chain), timm PreActBottleneck with BatchNormAct2d (bn_relu_conv; momentum=None in one)."""
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    m = nn.Sequential(
        resfast.Bottleneck(8, 4, 2, ds),
        resfast.Bottle2neck(16, 4, norm_layer=nn.BatchNorm2d),
        resfast.TimmPreActBottleneck(in_chs=16, out_chs=16, **BN_ACT),
        resfast.TimmPreActBottleneck(in_chs=16, out_chs=32, stride=2, proj_layer=rv2.DownsampleConv,
                                     conv_layer=create_conv2d,
                                     norm_layer=functools.partial(BatchNormAct2d, momentum=None)),
    )
    return randomize_bn(m).to(dtype)


def _data():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(GLOBAL_BATCH, 8, 10, 9, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    ts = [torch.randn(GLOBAL_BATCH, 32, 3, 3, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    return xs, ts


def _record(monkeypatch):
    calls = []
    real = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda op, args: calls.append((op, real(op, args).name)) or real(op, args))
    return calls


def test_converted_model_keeps_fused_ops_activation_and_keys(monkeypatch):
    ref = _blocks_model()
    new = resfast.convert_sync_batchnorm(_blocks_model())
    assert list(new.state_dict()) == list(ref.state_dict())
    bns = [m for m in new.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) in (resfast.SyncBatchNorm2d, resfast.SyncBatchNormAct2d) for m in bns)
    for m in bns:
        if isinstance(m, resfast.SyncBatchNormAct2d):
            assert type(m.act) is nn.ReLU and is_bn_relu(m)
        else:
            assert is_supported_bn(m)
    calls = _record(monkeypatch)
    xs, ts = _data()
    for train in (True, True, False):
        ref.train(train)
        new.train(train)
        with resfast.backend("eager"):
            torch.testing.assert_close(new(xs[0]), ref(xs[0]), **TOL)
    assert {op for op, _ in calls} == {"conv_bn_relu", "res2net_chain", "bn_relu_conv"}
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(new.state_dict()[k], v, **TOL, msg=k)


def test_converter_shares_tensors_and_keeps_flags():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), BatchNormAct2d(4, act_layer=nn.SiLU),
                      nn.BatchNorm1d(4)).eval()
    m[1].weight.requires_grad_(False)
    params = {k: v for k, v in m.state_dict(keep_vars=True).items()}
    keys = list(m.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = resfast.convert_sync_batchnorm(m)
    assert out is m and list(m.state_dict()) == keys
    assert all(v is params[k] for k, v in m.state_dict(keep_vars=True).items())
    assert type(m[1]) is resfast.SyncBatchNorm2d and not m[1].training and not m[1].weight.requires_grad
    assert type(m[2]) is resfast.SyncBatchNormAct2d and type(m[2].act) is nn.SiLU and not is_bn_relu(m[2])
    assert type(m[3]) is nn.SyncBatchNorm
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m[2](x), nn.functional.silu(nn.functional.batch_norm(
        x, m[2].running_mean, m[2].running_var, m[2].weight, m[2].bias, False, 0.0, m[2].eps)))
    single = resfast.convert_sync_batchnorm(nn.BatchNorm2d(4))
    assert type(single) is resfast.SyncBatchNorm2d
    frozen = pytest.importorskip("torchvision.ops").FrozenBatchNorm2d(4)
    assert resfast.convert_sync_batchnorm(nn.Sequential(frozen))[0] is frozen

    class MyBN(nn.BatchNorm2d):
        pass

    with pytest.warns(RuntimeWarning, match="unsynchronised.*MyBN"):
        resfast.convert_sync_batchnorm(nn.Sequential(MyBN(4)))


def test_torch_converter_keeps_module_path_and_convert_does_not_crash():
    """torch's converter: blocks run their modules (documented); resfast.convert on such a model works."""
    torch.manual_seed(0)
    seed = pytest.importorskip("fixtures.seed001")
    model = nn.Sequential(seed.Res2NetBottleneck(64, 16), resfast.Bottleneck(64, 16))
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    conv = resfast.convert(model)
    assert type(conv[0]) is resfast.Res2NetBottleneck
    x = torch.randn(2, 64, 6, 6)
    torch.testing.assert_close(conv.eval()(x), model.eval()(x))
    # and the other way round: resfast's converter after resfast.convert, and convert after it
    both = resfast.convert(resfast.convert_sync_batchnorm(randomize_bn(nn.Sequential(seed.Res2NetBottleneck(64, 16)))))
    assert type(both[0]) is resfast.Res2NetBottleneck and type(both[0].bn1) is resfast.SyncBatchNorm2d


@pytest.mark.parametrize("name", ["triton", "cpu"])
def test_explicit_backend_refuses_synced_bn_in_training(name):
    if dispatch.get(name).static_reasons("conv_bn_relu"):
        pytest.skip(f"backend {name} is not available here")
    group = object()  # any group: only its presence matters to the backends' choice
    bn = BatchNormParams(torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4),
                         torch.zeros((), dtype=torch.long), process_group=group)
    x, w = torch.randn(2, 4, 3, 3), torch.randn(4, 4, 1, 1)
    with resfast.backend(name), pytest.raises(resfast.BackendUnavailableError) as e:
        resfast.ops.conv_bn_relu(x, w, bn, training=True)
    assert SYNCED_BN_REASON in str(e.value)
    assert int(bn.num_batches_tracked) == 0
    from resfast.ops._args import prepare_conv_bn_relu

    eval_args = prepare_conv_bn_relu(x, w, bn, None, 1, 0, 1, 1, False, True, None)
    assert SYNCED_BN_REASON not in dispatch.get(name).not_supported_reasons("conv_bn_relu", eval_args)
    # auto falls back to eager (no process group is initialised here: it is a plain BatchNorm)
    with resfast.backend("auto"):
        torch.testing.assert_close(resfast.ops.conv_bn_relu(x, w, bn, training=True),
                                   resfast.ops.conv_bn_relu(x, w, nn.BatchNorm2d(4), training=True))


def test_no_process_group_gives_no_group():
    assert as_bn_params(resfast.SyncBatchNorm2d(4)).process_group is None
    assert BatchNormParams()._fields[-1] == "process_group"


# --- two processes, gloo on CPU ----------------------------------------------------------------------------------

def _check_module_uneven(rank):
    """SyncBatchNorm2d alone with uneven per-rank batches (3 and 1 samples; an empty one), float32 channels_last
    and float64, affine or not, against nn.BatchNorm2d on the concatenated batch (every rank has all the data)."""
    import torch.distributed as dist

    cases = [(dict(), torch.float32, dict(rtol=1e-5, atol=1e-5)),
             (dict(momentum=None), torch.float64, TOL),
             (dict(affine=False, track_running_stats=False), torch.float64, TOL)]
    for sizes in ((3, 1), (4, 0)):
        for kw, dtype, tol in cases:
            g = torch.Generator().manual_seed(11)
            ref = randomize_bn(nn.BatchNorm2d(6, **kw)).to(dtype)
            new = resfast.SyncBatchNorm2d(6, **kw).to(dtype)
            new.load_state_dict(ref.state_dict())
            for _ in range(2):
                x = (torch.randn(sum(sizes), 6, 5, 3, generator=g, dtype=torch.float64) * 3 + 10).to(dtype)
                x = x.contiguous(memory_format=torch.channels_last)
                dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
                lo = sum(sizes[:rank])
                sl = slice(lo, lo + sizes[rank])
                xa, xb = x.clone().requires_grad_(), x[sl].clone().requires_grad_()
                ya, yb = ref(xa), new(xb)
                assert yb.is_contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(yb, ya[sl], **tol)
                ya.backward(dy)
                yb.backward(dy[sl])  # the ranks' losses sum to the reference's
                torch.testing.assert_close(xb.grad, xa.grad[sl], **tol)
                for p, q in zip(ref.parameters(), new.parameters()):
                    dist.all_reduce(q.grad)  # this rank's share, summed as DDP would
                    torch.testing.assert_close(q.grad, p.grad, **tol)
                    p.grad, q.grad = None, None
                for k, v in ref.state_dict().items():
                    torch.testing.assert_close(new.state_dict()[k], v, **tol, msg=k)


def _worker(rank, store, out_dir):
    """One rank: the converted model under DDP on its half of each batch; results to out_dir/rank{rank}.pt."""
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        model = resfast.convert_sync_batchnorm(_blocks_model())
        ops_seen = []
        real = dispatch.select

        def select(op, args):
            b = real(op, args)
            ops_seen.append((op, b.name))
            return b

        dispatch.select = select
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        xs, ts = _data()
        half = GLOBAL_BATCH // WORLD
        sl = slice(rank * half, (rank + 1) * half)
        res = {"steps": []}
        for x, t in zip(xs, ts):
            x = x[sl].clone().requires_grad_()
            y = ddp(x)
            loss = (y - t[sl]).square().mean()  # DDP averages the ranks' gradients: the global batch's mean
            opt.zero_grad()
            loss.backward()
            res["steps"].append({
                "y": y.detach(), "x_grad": x.grad,
                "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                "state": {k: v.clone() for k, v in model.state_dict().items()},
            })
            opt.step()
        res["final_state"] = model.state_dict()
        res["ops"] = sorted(set(ops_seen))
        # an explicit backend other than eager refuses the synchronised BatchNorm in training, and says why
        with resfast.backend("cpu"):
            try:
                model.train()(xs[0][sl])
                res["cpu_error"] = ""
            except resfast.BackendUnavailableError as e:
                res["cpu_error"] = str(e)
        _check_module_uneven(rank)
        # a batch of one value per channel on each rank is a valid global batch of two
        bn = resfast.SyncBatchNorm2d(3).double()
        res["tiny"] = bn(torch.full((1, 3, 1, 1), float(rank), dtype=torch.float64)).detach()
        res["tiny_state"] = bn.state_dict()
        # resfast.convert with torch.distributed initialised and a process group in the model (it cannot be deep-
        # copied): torch's converter -> the block is converted and keeps torch's module; resfast's -> fused blocks
        from fixtures import seed001

        group = dist.new_group(list(range(WORLD)))
        theirs = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(seed001.Res2NetBottleneck(64, 16)), group)
        theirs = resfast.convert(theirs)[0]
        ours = resfast.convert_sync_batchnorm(nn.Sequential(seed001.Res2NetBottleneck(64, 16)), group)
        ours = resfast.convert(ours)[0]
        res["converted"] = [(type(b).__module__, type(b.bn1).__name__, b.bn1.process_group is group)
                            for b in (theirs, ours)]
        # eval needs no collective: one rank alone may run it
        if rank == 0:
            model.eval()(xs[0][:1])
        dist.barrier()
        dist.destroy_process_group()
        torch.save(res, path)
    except BaseException:
        with open(path + ".err", "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    store = tmp_path / "store"
    procs = [ctx.Process(target=_worker, args=(r, str(store), str(tmp_path)), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
    errors = [e.read_text() for e in sorted(tmp_path.glob("rank*.pt.err"))]
    assert not errors, "\n".join(errors)
    assert not hung, "a rank did not finish within 120 s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # one process, the unconverted model, the whole batch
    model = _blocks_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ts = _data()
    half = GLOBAL_BATCH // WORLD
    for step, (x, t) in enumerate(zip(xs, ts)):
        x = x.clone().requires_grad_()
        y = model(x)
        loss = (y - t).square().mean()
        opt.zero_grad()
        loss.backward()
        for r, res in enumerate(ranks):
            got = res["steps"][step]
            sl = slice(r * half, (r + 1) * half)
            torch.testing.assert_close(got["y"], y.detach()[sl], **TOL, msg=lambda m, s=step: f"output, step {s}: {m}")
            # the ranks' losses sum to WORLD x the single loss; DDP averages parameter gradients, not the input's
            torch.testing.assert_close(got["x_grad"], WORLD * x.grad[sl], **TOL,
                                       msg=lambda m, s=step: f"x grad, step {s}: {m}")
            for k, p in model.named_parameters():
                torch.testing.assert_close(got["grads"][k], p.grad, **TOL,
                                           msg=lambda m, k=k, s=step: f"grad {k}, step {s}: {m}")
            for k, v in model.state_dict().items():
                torch.testing.assert_close(got["state"][k], v, **TOL, msg=lambda m, k=k, s=step: f"{k}, step {s}: {m}")
        opt.step()
    for res in ranks:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(res["final_state"][k], v, **TOL, msg=k)
        assert {op for op, _ in res["ops"]} == {"conv_bn_relu", "res2net_chain", "bn_relu_conv"}
        assert {b for _, b in res["ops"]} == {"eager"}
        assert SYNCED_BN_REASON in res["cpu_error"]
        assert res["converted"] == [("resfast.nn.res2net", "SyncBatchNorm", True),
                                    ("resfast.nn.res2net", "SyncBatchNorm2d", True)]
        # global batch (0, 1) per channel: outputs -1, +1 (up to eps), running var += 0.1 * unbiased var 0.5
        torch.testing.assert_close(res["tiny_state"]["running_mean"], torch.full((3,), 0.05, dtype=torch.float64))
        torch.testing.assert_close(res["tiny_state"]["running_var"], torch.full((3,), 0.95, dtype=torch.float64))
    torch.testing.assert_close(ranks[0]["tiny"] + ranks[1]["tiny"], torch.zeros(1, 3, 1, 1, dtype=torch.float64))
