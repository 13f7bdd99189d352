"""BatchNorm inside the ops behaves exactly like nn.BatchNorm2d: batch stats, running-stat updates with
momentum and momentum=None, num_batches_tracked, track_running_stats=False, affine=False, eval."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resfast import ops

CONFIGS = [
    dict(momentum=0.1),
    dict(momentum=0.3),
    dict(momentum=None),
    dict(track_running_stats=False),
    dict(affine=False),
    dict(affine=False, track_running_stats=False, momentum=None),
]


def _bn(C, **kw):
    bn = nn.BatchNorm2d(C, dtype=torch.float64, **kw)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_relu_matches_module_over_steps(cfg, training):
    C_in, C = 6, 5
    conv = nn.Conv2d(C_in, C, 3, padding=1, bias=False, dtype=torch.float64)
    bn_mod, bn_op = _bn(C, **cfg), None
    bn_op = _bn(C, **cfg)
    bn_op.load_state_dict(bn_mod.state_dict())
    bn_mod.train(training)
    for step in range(3):
        x = torch.randn(3, C_in, 5, 4, dtype=torch.float64)
        ref = F.relu(bn_mod(conv(x)))
        out = ops.conv_bn_relu(x, conv.weight, bn_op, padding=1, training=training)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        for k, v in bn_mod.state_dict().items():
            torch.testing.assert_close(bn_op.state_dict()[k], v, rtol=0, atol=1e-12, msg=f"{k} after step {step}")


def test_eval_leaves_buffers_alone():
    bn = _bn(4)
    bn.running_mean.uniform_(-1, 1)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    w = torch.randn(4, 4, 1, 1, dtype=torch.float64)
    ops.conv_bn_relu(x, w, bn, training=False)
    ops.bn_relu_conv(x, bn, w, training=False)
    for k, v in before.items():
        assert torch.equal(bn.state_dict()[k], v), k


def test_momentum_none_is_cumulative_average():
    bn = _bn(3, momentum=None)
    ref = _bn(3, momentum=None)
    ref.load_state_dict(bn.state_dict())
    w = torch.eye(3, dtype=torch.float64).reshape(3, 3, 1, 1)
    for _ in range(4):
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        ops.conv_bn_relu(x, w, bn, training=True)
        ref(x)
    assert int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_frozen_batchnorm_matches_torchvision():
    tv_ops = pytest.importorskip("torchvision.ops")
    fbn = tv_ops.FrozenBatchNorm2d(4)
    with torch.no_grad():
        fbn.weight.uniform_(0.5, 1.5)
        fbn.bias.uniform_(-1, 1)
        fbn.running_mean.uniform_(-1, 1)
        fbn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(4, 4, 3, 3)
    ref = F.relu(fbn(F.conv2d(x, w, padding=1)))
    # training=True must not matter for a frozen BatchNorm
    out = ops.conv_bn_relu(x, w, fbn, padding=1, training=True)
    torch.testing.assert_close(out, ref)


def test_one_value_per_channel_in_training_is_an_error_and_touches_nothing():
    bn = _bn(4)
    w = torch.randn(4, 4, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.conv_bn_relu(torch.randn(1, 4, 1, 1, dtype=torch.float64), w, bn, training=True)
    assert int(bn.num_batches_tracked) == 0
    # eval with one value is fine
    ops.conv_bn_relu(torch.randn(1, 4, 1, 1, dtype=torch.float64), w, bn, training=False)


@pytest.mark.parametrize("training", [True, False])
def test_track_running_stats_switched_off_after_construction(training):
    """nn.BatchNorm2d's third case: buffers exist but track_running_stats is False: batch statistics and no
    buffer update in training, running statistics in eval (found in review)."""
    ref, bn = _bn(4), _bn(4)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    bn.load_state_dict(ref.state_dict())
    ref.track_running_stats = bn.track_running_stats = False
    ref.train(training)
    w = torch.randn(4, 4, 1, 1, dtype=torch.float64)
    for _ in range(2):
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(ops.conv_bn_relu(x, w, bn, training=training), F.relu(ref(F.conv2d(x, w))))
        torch.testing.assert_close(ops.bn_relu_conv(x, bn, w, training=training), F.conv2d(F.relu(ref(x)), w))
    for k, v in ref.state_dict().items():
        assert torch.equal(bn.state_dict()[k], v), k


def test_bad_batchnorm_arguments_are_named():
    x = torch.randn(2, 4, 3, 3)
    w = torch.randn(4, 4, 1, 1)
    with pytest.raises(TypeError, match="bn.weight has dtype torch.float64 but the input has dtype torch.float32"):
        ops.conv_bn_relu(x, w, nn.BatchNorm2d(4).double())
    with pytest.raises(TypeError, match="SyncBatchNorm"):
        ops.conv_bn_relu(x, w, nn.SyncBatchNorm(4))
    with pytest.raises(TypeError, match="expected a BatchNorm2d, got BatchNorm1d"):
        ops.conv_bn_relu(x, w, nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="training must be a bool"):
        ops.conv_bn_relu(x, w, nn.BatchNorm2d(4), training="no")
    with pytest.raises(ValueError, match="groups must be a positive int"):
        ops.conv_bn_relu(x, w, nn.BatchNorm2d(4), groups=True)
    with pytest.raises(ValueError, match="scale must be an int >= 1"):
        ops.res2net_chain(x, [], [], scale=True, order="paper")
    # float32 statistics with a bfloat16 input are what PyTorch allows: accepted
    out = ops.bn_relu_conv(x.bfloat16(), nn.BatchNorm2d(4).eval(), w.bfloat16())
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_timm_batchnormact2d_is_batchnorm_then_relu(cfg, training):
    """timm's BatchNormAct2d (ReLU) through bn_relu_conv equals the module followed by the conv, over steps:
    its forward keeps nn.BatchNorm2d's rules (momentum, momentum=None, num_batches_tracked, no tracking)."""
    norm_act = pytest.importorskip("timm.layers.norm_act")
    C, C_out = 5, 4
    mod = norm_act.BatchNormAct2d(C, dtype=torch.float64, **cfg)
    if mod.affine:
        with torch.no_grad():
            mod.weight.uniform_(0.5, 1.5)
            mod.bias.uniform_(-0.5, 0.5)
    op = norm_act.BatchNormAct2d(C, dtype=torch.float64, **cfg)
    op.load_state_dict(mod.state_dict())
    mod.train(training)
    op.train(training)
    conv = nn.Conv2d(C, C_out, 3, padding=1, bias=False, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(3, C, 5, 4, dtype=torch.float64)
        ref = conv(mod(x))
        out = ops.bn_relu_conv(x, op, conv.weight, padding=1, training=training)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        for k, v in mod.state_dict().items():
            torch.testing.assert_close(op.state_dict()[k], v, rtol=0, atol=1e-12, msg=f"{k} after step {step}")


def test_is_bn_relu_recognises_only_batchnormact2d_with_plain_relu():
    from resfast.nn.layers import is_bn_relu, is_supported_bn

    norm_act = pytest.importorskip("timm.layers.norm_act")
    BNA = norm_act.BatchNormAct2d

    class Subclass(BNA):  # may compute anything: not trusted
        pass

    assert is_bn_relu(BNA(4)) and is_bn_relu(BNA(4, inplace=False)) and is_bn_relu(BNA(4, act_layer="relu"))
    assert not is_supported_bn(BNA(4))  # a BatchNorm2d with its own forward: not a bare BatchNorm
    assert not is_bn_relu(BNA(4, act_layer=nn.SiLU))
    assert not is_bn_relu(BNA(4, apply_act=False))
    assert not is_bn_relu(BNA(4, act_layer=nn.ReLU6))
    assert not is_bn_relu(BNA(4, drop_layer=nn.Dropout))
    assert not is_bn_relu(Subclass(4))
    assert not is_bn_relu(nn.BatchNorm2d(4)) and not is_bn_relu(None)
    sync = norm_act.convert_sync_batchnorm(nn.Sequential(BNA(4)))[0]
    assert type(sync).__name__ == "SyncBatchNormAct" and not is_bn_relu(sync)
