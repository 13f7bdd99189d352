"""A missing or broken resfast._C never breaks `import resfast`: one warning, the eager backend works."""

import subprocess
import sys

SCRIPT = r"""
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "resfast._C":
            raise ImportError("simulated broken build: undefined symbol _ZN2at6Tensor")
        return None
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import resfast
    import torch
    from torch import nn
    msgs = [str(x.message) for x in w if "resfast" in str(x.message)]
    assert len(msgs) == 1, msgs
    assert "simulated broken build" in msgs[0] and "eager backend still works" in msgs[0], msgs[0]
    y = resfast.ops.conv_bn_relu(torch.randn(2, 4, 3, 3), torch.randn(4, 4, 1, 1), nn.BatchNorm2d(4))
    y = resfast.ops.bn_act(torch.randn(2, 4, 3, 3), torch.ones(4), torch.zeros(4))
    m = resfast.convert(nn.Sequential(nn.Conv2d(3, 3, 1)))
    reasons = resfast.ops.dispatch.get("cuda").not_supported_reasons("conv_bn_relu")
    assert any("not loaded" in r for r in reasons), reasons
print("ok")
"""


def test_import_without_extension():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
