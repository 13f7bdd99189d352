"""Drop-in blocks: same constructor, attributes and state_dict keys as the blocks they replace."""

from .preact import PreActBasicBlock, PreActBottleneck, TimmPreActBasic, TimmPreActBottleneck
from .res2net import Bottle2neck, Res2Block, Res2NetBottleneck, SEModule
from .resnet import BasicBlock, Bottleneck, ResBlock
from .sync_batchnorm import SyncBatchNorm2d, SyncBatchNormAct2d, convert_sync_batchnorm
from .timm_resnet import TimmBasicBlock, TimmBottleneck

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResBlock",
    "Bottle2neck",
    "Res2NetBottleneck",
    "SEModule",
    "Res2Block",
    "PreActBasicBlock",
    "PreActBottleneck",
    "TimmPreActBottleneck",
    "TimmPreActBasic",
    "TimmBasicBlock",
    "TimmBottleneck",
    "SyncBatchNorm2d",
    "SyncBatchNormAct2d",
    "convert_sync_batchnorm",
]
