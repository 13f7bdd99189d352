"""Run timm's own tests/test_models.py on models passed through resfast.convert (the bar a drop-in is held to).

Copy timm's tests/test_models.py (github.com/huggingface/pytorch-image-models, the version of the installed timm)
next to this file, then from this folder:

    HF_HUB_OFFLINE=1 RESFAST_MODULES=resnet,res2net,resnetv2 ../../.venv/bin/python -m pytest -q \
        -k "not pretrained and not inference" test_models.py

Every model timm creates there is converted; the patch asserts that all its timm ResNet-family blocks became
resfast blocks. RESFAST_CONVERT=1 (default) patches create_model; RESFAST_CONVERT=0 is the baseline.
RESFAST_MODELS=a,b,c keeps only tests whose model_name is in the list; RESFAST_MODULES=resnet,res2net,resnetv2
keeps tests whose model (tag stripped) is registered in those timm modules.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import timm  # noqa: E402
import timm.models  # noqa: E402
import timm.models._factory  # noqa: E402

import resfast  # noqa: E402

CONVERT = os.environ.get("RESFAST_CONVERT", "1") == "1"
_orig_create_model = timm.models._factory.create_model

_LIB = {
    ("timm.models.resnet", "BasicBlock"), ("timm.models.resnet", "Bottleneck"),
    ("timm.models.res2net", "Bottle2neck"),
    ("timm.models.resnetv2", "PreActBottleneck"), ("timm.models.resnetv2", "PreActBasic"),
}


def _lib_blocks(m):
    return [n for n, x in m.named_modules() if (type(x).__module__, type(x).__name__) in _LIB]


def create_model(*args, **kwargs):
    model = _orig_create_model(*args, **kwargs)
    if not CONVERT:
        return model
    before = _lib_blocks(model)
    training = model.training
    out = resfast.convert(model)
    assert out.training == training
    if before:
        left = _lib_blocks(out)
        assert not left, f"unconverted timm blocks: {left[:3]}"
        n_rf = sum(type(x).__module__.startswith("resfast.") for x in out.modules())
        assert n_rf == len(before), (n_rf, len(before))
    return out


if CONVERT:
    timm.create_model = create_model
    timm.models.create_model = create_model
    timm.models._factory.create_model = create_model


def pytest_collection_modifyitems(config, items):
    names = os.environ.get("RESFAST_MODELS")
    mods = os.environ.get("RESFAST_MODULES")
    allowed = None
    if names:
        allowed = set(names.split(","))
    elif mods:
        allowed = set()
        for m in mods.split(","):
            allowed |= set(timm.list_models(module=m))
    keep, drop = [], []
    for it in items:
        cs = getattr(it, "callspec", None)
        mn = cs.params.get("model_name") if cs else None
        if CONVERT and it.module is not None:
            assert it.module.create_model is create_model
        if allowed is not None and (mn is None or mn.split(".")[0] not in allowed):
            drop.append(it)
        else:
            keep.append(it)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
