"""The steps of ``scripts/gpu_check.sh``: a first-contact check of resfast's Triton and CUDA backends on one lent GPU.

    python scripts/gpu_check.py STEP --work DIR            # one step; its record goes to DIR/steps/STEP.json
    python scripts/gpu_check.py finish STEP --work DIR --out OUT --rc RC --seconds S --timeout T
                                                            # append the step to DIR/gpu_check.json, re-pack OUT

Steps, in priority order: build, smoke, correctness, models, headline, bandwidth, sanitize. Each step writes its
record after every case (a step killed by its timeout still leaves what it did), stops starting new cases at
GPU_CHECK_DEADLINE (epoch seconds), and imports torch only inside the step, so ``finish`` (stdlib only) packs the
results even when torch cannot be imported.

RESFAST_GPU_CHECK_DRY_RUN=1: the same steps on the CPU through the Triton interpreter at tiny shapes, float32
against a float64 reference. What needs a GPU (the build's CUDA compile, the cuda backend's kernels,
compute-sanitizer) is reported as skipped with the reason; the cuda backend's cases then run their code with the
`cpu` backend as a stand-in (the same C++ op glue, resfast/backends/cpp.py), so a Python error in them shows up here
and not on the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY = os.environ.get("RESFAST_GPU_CHECK_DRY_RUN", "0") == "1"
BACKENDS = ("triton", "cuda")
STAND_IN = "cpu"  # dry run: the backend that runs the cuda backend's cases (same glue, CPU kernels)
STATUSES = ("pass", "fail", "timeout", "skipped")
HEADLINE_MODELS = ("res2net50_26w_4s", "resnet50")
CHECK_MODELS = ("res2net50_26w_4s", "resnext50_32x4d", "resnetv2_50")


# --- records -----------------------------------------------------------------------------------------------------

def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _deadline() -> float:
    return float(os.environ.get("GPU_CHECK_DEADLINE", "inf"))


def run_capped(cmd, log: Path, env=None) -> subprocess.CompletedProcess:
    """Run `cmd` (its own process group) until the step's deadline; on the deadline kill the whole group (nvcc and
    ninja under setup.py, python under compute-sanitizer) and raise TimeoutError. Output goes to `log` too."""
    import signal

    t = _deadline() - time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=None if t == float("inf") else max(1.0, t))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        log.write_text(out + err)
        raise TimeoutError(f"{' '.join(cmd[:4])} ... stopped at the step's deadline; output in {log.name}") from None
    log.write_text(out + err)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


class Skip(Exception):
    """A case that cannot run here (the reason is its message)."""


class Step:
    """One step's record, rewritten after every case: cases (name, status, seconds, numbers), numbers, notes."""

    def __init__(self, work: Path, name: str):
        self.path = work / "steps" / f"{name}.json"
        for sub in ("steps", "logs", "results"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        self.data = {"step": name, "dry_run": DRY, "cases": [], "numbers": {}, "notes": []}
        self.save()

    def save(self):
        _write_json(self.path, self.data)

    def note(self, text: str):
        self.data["notes"].append(text)
        print("note:", text, flush=True)
        self.save()

    def set(self, **numbers):
        self.data["numbers"].update(numbers)
        self.save()

    def case(self, name: str, fn, backend: str | None = None, est: float = 0.0, skip: str = "", **meta) -> dict:
        """Run fn(backend) -> dict of numbers (raise AssertionError to fail, Skip to skip) unless the step's deadline
        is too close; record the outcome. Dry run: a cuda-backend case runs on the stand-in backend and is
        reported as skipped (with the stand-in's outcome) unless the stand-in fails."""
        rec = {"name": name, "backend": backend, **meta}
        if skip:
            rec.update(status="skipped", reason=skip)
            return self._add(rec)
        if time.time() + est > _deadline():
            rec.update(status="timeout", reason="not started: the step's time budget is spent")
            return self._add(rec)
        run_on = STAND_IN if (DRY and backend == "cuda") else backend
        t0 = time.time()
        try:
            rec["numbers"] = fn(run_on) or {}
            rec["status"] = "pass"
        except Skip as e:
            rec.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001  (every failure is a result to report)
            if run_on != backend and type(e).__name__ == "BackendUnavailableError":
                rec.update(status="skipped", reason=f"no GPU (dry run), and the {STAND_IN} stand-in cannot run here "
                                                    f"either: {e}"[:2000])
                rec["seconds"] = round(time.time() - t0, 3)
                return self._add(rec)
            rec.update(status="fail", error=f"{type(e).__name__}: {e}"[:2000],
                       traceback=traceback.format_exc()[-3000:])
        rec["seconds"] = round(time.time() - t0, 3)
        if run_on != backend and rec["status"] == "pass":
            rec.update(status="skipped", stand_in=f"{STAND_IN}: pass",
                       reason=f"no GPU (dry run): the cuda backend's kernels cannot run; the case ran with the "
                              f"{STAND_IN} backend as a stand-in (same op glue)")
        return self._add(rec)

    def _add(self, rec):
        self.data["cases"].append(rec)
        self.save()
        extra = rec.get("error") or rec.get("reason") or ""
        print(f"[{rec['status']:>7}] {rec['name']} ({rec.get('seconds', 0):.1f} s) {extra[:300]}", flush=True)
        return rec


# --- shared helpers ------------------------------------------------------------------------------------------------

def setup_torch():
    import torch

    if DRY:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


def device():
    import torch

    if DRY:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible (set RESFAST_GPU_CHECK_DRY_RUN=1 for the CPU dry run)")
    return torch.device("cuda")


def low_dtypes():
    """The dtypes the correctness rule is applied to: fp16 and bf16 on the GPU, float32 under the interpreter."""
    import torch

    return [torch.float32] if DRY else [torch.bfloat16, torch.float16]


def dname(dtype) -> str:
    return str(dtype).replace("torch.", "")


def rule(fused, eager, ref, floor: float) -> dict:
    """The 2x rule: err(fused) <= 2 err(eager, same dtype) + floor max(1, max|ref|), both against `ref`."""
    ref = ref.double()
    err_f = (fused.double() - ref).abs().max().item()
    err_e = (eager.double() - ref).abs().max().item()
    bound = 2 * err_e + floor * max(1.0, ref.abs().max().item())
    return {"err_fused": err_f, "err_eager": err_e, "bound": bound, "ok": bool(err_f <= bound)}


def check_all(pairs: dict, floor: float) -> dict:
    """{name: (fused, eager, ref)} -> numbers; AssertionError naming every tensor that breaks the rule."""
    out, bad = {}, []
    for name, (f, e, r) in pairs.items():
        if f is None and e is None:
            continue
        if f is None or e is None:
            bad.append(f"{name}: gradient missing on one side")
            continue
        res = rule(f, e, r, floor)
        out[name] = {k: v for k, v in res.items() if k != "ok"}
        if not res["ok"]:
            bad.append(f"{name}: err {res['err_fused']:.3g} > bound {res['bound']:.3g} (eager {res['err_eager']:.3g})")
    if bad:
        raise AssertionError("; ".join(bad))
    worst = max((v["err_fused"] / v["bound"] for v in out.values() if v["bound"] > 0), default=0.0)
    return {"worst_err_over_bound": worst, "tensors": out}


def randomize_bn(model, seed: int = 0):
    """The tests' BatchNorm randomiser (tests/helpers.py), so the GPU check builds the same blocks as the tests."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from helpers import randomize_bn as randomize

    return randomize(model, seed)


def make_blocks(small: bool) -> dict:
    """One block of each kind resfast fuses, at ResNet-50 stage-1 widths (small: a quarter of them, for the
    interpreter): name -> (module, input channels)."""
    import timm.layers
    from timm.models import res2net as timm_res2net
    from timm.models import resnetv2
    from torch import nn
    from torchvision.models import resnet as tv_resnet

    d = 4 if small else 1
    c_in, planes = 64 // d, 64 // d
    ds = nn.Sequential(nn.Conv2d(c_in, planes * 4, 1, 1, bias=False), nn.BatchNorm2d(planes * 4))
    pre = dict(conv_layer=timm.layers.create_conv2d, norm_layer=timm.layers.BatchNormAct2d)  # resnetv2_50's
    blocks = {
        "res2net stage": (timm_res2net.Bottle2neck(c_in, planes, 1, ds, norm_layer=nn.BatchNorm2d), c_in),
        "res2net normal": (timm_res2net.Bottle2neck(planes * 4, planes, norm_layer=nn.BatchNorm2d), planes * 4),
        "res2net se": (timm_res2net.Bottle2neck(planes * 4, planes, norm_layer=nn.BatchNorm2d,
                                                attn_layer=timm.layers.get_attn("se")), planes * 4),
        "resnext": (tv_resnet.Bottleneck(planes * 4, planes, groups=32 // d, base_width=4), planes * 4),
        "preact": (resnetv2.PreActBottleneck(planes * 4, planes * 4, **pre), planes * 4),
        "preact downsample": (resnetv2.PreActBottleneck(planes * 4, planes * 8, stride=2,
                                                        proj_layer=resnetv2.DownsampleConv, **pre), planes * 4),
    }
    return {k: (randomize_bn(m), c) for k, (m, c) in blocks.items()}


def build_model(name: str, small: bool):
    """resfast._bench.models' model `name` (timm's or torchvision's, random weights). small (the dry run): the same
    family with one block a stage and, where the library allows, narrower stages, so the interpreter gets through it
    in seconds."""
    from resfast._bench import models as mb

    if not small:
        return mb.eager_model(name)
    lib, fn = mb.MODELS[name]
    if lib == "timm":
        import timm

        narrow = {"channels": (16, 32, 64, 128), "stem_width": 16} if "res2" in fn else \
            {"channels": (64, 128, 256, 512), "stem_chs": 16} if "resnetv2" in fn else {}
        return timm.create_model(fn, pretrained=False, layers=(1, 1, 1, 1), **narrow)
    from torchvision.models import resnet as tv

    kw = {"groups": 8, "width_per_group": 4} if "resnext" in fn else {"width_per_group": 16}  # inner widths / 4
    return tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], **kw)


def versions() -> dict:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "torchvision", "timm"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            v[mod] = f"unavailable ({type(e).__name__})"
    try:
        import resfast

        v["resfast"] = resfast.__version__
    except Exception as e:  # noqa: BLE001
        v["resfast"] = f"import failed ({e})"
    try:
        v["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=ROOT, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        v["git_commit"] = "unknown"
    return v


# --- step: build ---------------------------------------------------------------------------------------------------

def step_build(step: Step):
    """Build resfast._C against this torch (sm_90 only, MAX_JOBS=16), then import it in a fresh process."""
    import shutil

    env = dict(os.environ)
    env.setdefault("MAX_JOBS", "16")
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    step.set(ninja=shutil.which("ninja") is not None, nvcc=shutil.which("nvcc"),
             max_jobs=env["MAX_JOBS"], arch=env["TORCH_CUDA_ARCH_LIST"])

    def build(_):
        if DRY:
            raise Skip("dry run: the extension is not rebuilt here (a CPU build of it is what `make setup` made; "
                       "the GPU run compiles it with TORCH_CUDA_ARCH_LIST=9.0)")
        r = run_capped([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                       step.path.parent.parent / "logs" / "build_ext.log", env)
        assert r.returncode == 0, f"setup.py build_ext failed (rc {r.returncode}): {(r.stdout + r.stderr)[-1500:]}"
        return {}

    step.case("build_ext", build)

    def load(_):
        code = ("import json, sys; sys.path.insert(0, 'scripts'); import gpu_check, resfast, resfast._C, torch; "
                "from resfast import _ext; print(json.dumps({'build_info': _ext.build_info(), 'cuda': "
                "torch.cuda.is_available(), 'versions': gpu_check.versions(), 'device': torch.cuda.get_device_name() "
                "if torch.cuda.is_available() and not gpu_check.DRY else 'cpu (dry run)'}))")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"import resfast._C failed: {r.stderr[-1500:]}"
        info = json.loads(r.stdout.strip().splitlines()[-1])
        step.set(versions=info.pop("versions"), device=info.pop("device"))
        if not DRY:
            assert info["build_info"].get("with_cuda"), f"resfast._C was built without CUDA: {info['build_info']}"
        return info

    step.case("import resfast._C", load)


# --- step: smoke ---------------------------------------------------------------------------------------------------

def triton_kernels() -> list[str]:
    """Every Triton kernel resfast launches: the @triton.jit functions named *_kernel in
    resfast/backends/triton/kernels/."""
    import importlib
    import pkgutil

    import resfast.backends.triton.kernels as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"resfast.backends.triton.kernels.{info.name}")
        for v in vars(mod).values():
            fn = v
            while hasattr(fn, "fn") and not callable(getattr(fn, "__code__", None)):
                fn = fn.fn  # Autotuner -> JITFunction -> the Python function
            name = getattr(fn, "__name__", "")
            if name.endswith("_kernel") and type(v).__module__.startswith("triton"):
                names.add(name)
    return sorted(names)


class KernelLog:
    """Records the name of every Triton kernel launched (JITFunction.run / InterpretedFunction.run)."""

    def __init__(self):
        self.seen = set()
        self._patched = []

    def __enter__(self):
        from triton.runtime import jit

        classes = [jit.JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:
            pass
        for cls in classes:
            orig = cls.run

            def run(this, *a, _orig=orig, **k):
                self.seen.add(this.fn.__name__)
                return _orig(this, *a, **k)
            cls.run = run
            self._patched.append((cls, orig))
        return self

    def __exit__(self, *exc):
        for cls, orig in self._patched:
            cls.run = orig


def cpp_ops(dispatch_key: str) -> list[str]:
    """resfast._C's ops with a kernel for `dispatch_key` (CUDA; CPU for the dry run's stand-in)."""
    import torch

    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("resfast::")]
    return sorted(n.split("::", 1)[1] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, dispatch_key))


def op_log():
    """A dispatch mode recording the resfast C++ ops called under it (only around the cuda backend's calls: the
    Triton ops' wrap_triton launches are not meant to run under a user dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "resfast":
                OpLog.seen.add(func._schema.name.split("::", 1)[1])
            return func(*args, **(kwargs or {}))
    OpLog.seen = set()
    return OpLog


def block_workload(backend: str, small: bool, dev, record_ops=None) -> dict:
    """Every block kind converted, eval forward (no grad) and a training step (forward + backward), channels_last,
    through `backend`: bf16 (AMP for training) on the GPU, float32 under the interpreter; all outputs and
    gradients finite. Returns {block: output shape}."""
    import contextlib
    import copy

    import torch

    import resfast

    n, hw = (2, 8) if small else (16, 56)
    dtype = torch.float32 if DRY else torch.bfloat16
    from resfast.ops import dispatch

    shapes, bad = {}, []
    for name, (block, c) in make_blocks(small).items():
        if "se" in name.split() and dispatch.get(backend).static_reasons("scale_add_relu"):
            shapes[name] = "not run: the backend has no scale_add_relu (an explicit backend would raise)"
            continue
        x = torch.randn(n, c, hw, hw, device=dev).contiguous(memory_format=torch.channels_last)
        fused = resfast.convert(copy.deepcopy(block)).to(dev)
        mode = record_ops() if record_ops else contextlib.nullcontext()
        with mode:
            with torch.no_grad(), resfast.backend(backend):
                y = copy.deepcopy(fused).to(dtype).eval()(x.to(dtype))
            xt = x.clone().requires_grad_()
            with resfast.backend(backend), torch.autocast(dev.type, torch.bfloat16, enabled=not DRY):
                yt = fused.train()(xt)
            yt.float().square().mean().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        grads = [xt.grad] + [p.grad for p in fused.parameters()]
        if not all(torch.isfinite(t).all() for t in [y, yt] + [g for g in grads if g is not None]):
            bad.append(name)
        if any(g is None for g in grads):
            bad.append(f"{name} (a parameter got no gradient)")
        shapes[name] = list(y.shape)
    assert not bad, f"non-finite outputs or gradients: {bad}"
    return shapes


def step_smoke(step: Step):
    """Import, then one launch of every Triton kernel and every CUDA op of resfast._C at stage-1 shapes."""
    torch = setup_torch()
    import resfast
    from resfast.ops import dispatch

    dev = device()
    step.set(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)", versions=versions(),
             tune=os.environ.get("RESFAST_TUNE", "full"),
             availability={b: dispatch.get(b).not_supported_reasons("conv_bn_relu") for b in BACKENDS})
    small = DRY

    def triton_case(_):
        kernels = triton_kernels()
        with KernelLog() as log:
            shapes = block_workload("triton", small, dev)
            # dgrad/wgrad: the conv gradients with RESFAST_CONV_BACKWARD=triton
            from resfast.backends.triton.kernels import conv_grad

            n, c, hw = (2, 8, 7) if small else (16, 64, 56)
            dt = torch.float32 if DRY else torch.bfloat16
            x = torch.randn(n, c, hw, hw, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, c, 3, 3, device=dev, dtype=dt) * 0.05
            dy = torch.randn(n, c, hw, hw, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
            dx = conv_grad.conv_dgrad(dy, x.shape, w, (1, 1), (1, 1), (1, 1), 1)
            dw = conv_grad.conv_wgrad(dy, x, w.shape, (1, 1), (1, 1), (1, 1), 1)
            assert torch.isfinite(dx).all() and torch.isfinite(dw).all(), "conv_grad: non-finite"
        missing = sorted(set(kernels) - log.seen)
        assert not missing, f"Triton kernels never launched by the smoke workload: {missing}"
        return {"kernels": kernels, "launched": sorted(log.seen), "blocks": shapes}

    def cuda_case(name):
        OpLog = op_log()
        key = "CPU" if name == STAND_IN else "CUDA"
        registered = cpp_ops(key)
        shapes = block_workload(name, small, dev, record_ops=OpLog)
        with OpLog():  # the ops the blocks do not reach: bn_act (elementwise), bn_stats (statistics alone)
            n, c, hw = (2, 8, 7) if small else (16, 256, 56)
            dt = torch.float32 if DRY else torch.bfloat16
            x = torch.randn(n, c, hw, hw, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
            y = resfast.ops.bn_act(x, torch.rand(c, device=dev, dtype=dt), torch.rand(c, device=dev, dtype=dt), x,
                                   True)
            stats = torch.ops.resfast.bn_stats(x, 1e-5)
            assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in stats)
        missing = sorted(set(registered) - OpLog.seen)
        assert not missing, f"resfast._C ops with a {key} kernel never called by the smoke workload: {missing}"
        return {"ops": registered, "called": sorted(OpLog.seen), "blocks": shapes}

    step.case("triton: every kernel launched, stage-1 blocks eval + train", triton_case, "triton", est=10)
    step.case("cuda: every resfast._C op called, stage-1 blocks eval + train", cuda_case, "cuda", est=10)


# --- step: correctness ---------------------------------------------------------------------------------------------

def correctness_cases(small: bool):
    """(name, op, fn(backend, dtype) -> numbers, backends, est seconds) in priority order: every op forward and
    training (output and every gradient) at one real shape, then the whole training blocks and the Triton conv
    gradients, then more ResNet-50-family shapes. Real shapes are those of tests/test_gpu.py (batch 16)."""
    import copy

    import torch
    from torch import nn

    import resfast
    from resfast import ops

    dev = device()
    n = 2 if small else 16

    def sz(h):
        return max(3, h // 8) if small else h

    def ch(c):
        return max(4, c // 8) if small else c

    def x_(shape):
        return torch.randn(shape, device=dev, dtype=torch.float64).contiguous(memory_format=torch.channels_last)

    def bn_eval(c):
        return randomize_bn(nn.BatchNorm2d(c)).eval().to(dev).double()

    def bn_train(c):
        bn = nn.BatchNorm2d(c).to(dev).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        return bn

    def lowbn(bn, dt):
        return copy.deepcopy(bn).to(dt)

    def grads_close(fn, leaves64, dtype, backend, floor):
        res = {}
        for tag, dt, name in (("ref", torch.float64, "eager"), ("eager", dtype, "eager"), ("fused", dtype, backend)):
            leaves = [t.detach().to(dt).requires_grad_() for t in leaves64]
            with resfast.backend(name):
                out = fn(leaves, dt)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dev, dt)
            res[tag] = (out, *torch.autograd.grad(out, leaves, g))
        names = ["out"] + [f"grad{i}" for i in range(len(leaves64))]
        return check_all({k: (f, e, r) for k, f, e, r in zip(names, res["fused"], res["eager"], res["ref"])}, floor)

    def conv_eval(shape):
        cin, cout, h, k, s, g = shape

        def fn(backend, dtype):
            x = x_((n, cin, sz(h), sz(h)))
            w = torch.randn(cout, cin // g, k, k, device=dev, dtype=torch.float64) / (cin // g * k * k) ** 0.5
            bn = bn_eval(cout)
            kw = dict(stride=s, padding=k // 2, groups=g)
            ref = ops.conv_bn_relu_ref(x, w, bn, **kw)
            low = lowbn(bn, dtype)
            eager = ops.conv_bn_relu_ref(x.to(dtype), w.to(dtype), low, **kw)
            with resfast.backend(backend), torch.no_grad():
                out = ops.conv_bn_relu(x.to(dtype), w.to(dtype), low, **kw)
            return check_all({"out": (out, eager, ref)}, 1e-3)
        return fn

    def conv_train(shape):
        cin, cout, h, k, s, g = shape

        def fn(backend, dtype):
            x = x_((n, cin, sz(h), sz(h)))
            w = torch.randn(cout, cin // g, k, k, device=dev, dtype=torch.float64) / (cin // g * k * k) ** 0.5
            bn = bn_train(cout)

            def f(leaves, dt):
                b = copy.deepcopy(bn).float() if dt != torch.float64 else copy.deepcopy(bn)
                return ops.conv_bn_relu(leaves[0], leaves[1], b, stride=s, padding=k // 2, groups=g, training=True)
            return grads_close(f, [x, w], dtype, backend, 1e-3)
        return fn

    def chain_eval(width, h, block_type, stride):
        def fn(backend, dtype):
            scale = 4
            x = x_((n, width * scale, sz(h), sz(h)))
            ws = [torch.randn(width, width, 3, 3, device=dev, dtype=torch.float64) / (9 * width) ** 0.5
                  for _ in range(scale - 1)]
            bns = [bn_eval(width) for _ in range(scale - 1)]
            kw = dict(scale=scale, stride=stride, block_type=block_type)
            ref = ops.res2net_chain_ref(x, ws, bns, **kw)
            low = [lowbn(b, dtype) for b in bns]
            eager = ops.res2net_chain_ref(x.to(dtype), [w.to(dtype) for w in ws], low, **kw)
            with resfast.backend(backend), torch.no_grad():
                out = ops.res2net_chain(x.to(dtype), [w.to(dtype) for w in ws], low, **kw)
            return check_all({"out": (out, eager, ref)}, 1e-3)
        return fn

    def chain_train(width, h, block_type, stride):
        def fn(backend, dtype):
            scale = 4
            x = x_((n, width * scale, sz(h), sz(h)))
            ws = [torch.randn(width, width, 3, 3, device=dev, dtype=torch.float64) / (9 * width) ** 0.5
                  for _ in range(scale - 1)]
            bns = [bn_train(width) for _ in range(scale - 1)]

            def f(leaves, dt):
                b = [copy.deepcopy(bn).float() if dt != torch.float64 else copy.deepcopy(bn) for bn in bns]
                return ops.res2net_chain(leaves[0], leaves[1:], b, scale=scale, stride=stride, block_type=block_type,
                                         training=True)
            return grads_close(f, [x, *ws], dtype, backend, 1e-3)
        return fn

    def brc(train):
        cin, cout, h = ch(256), ch(64), 56

        def fn(backend, dtype):
            x = x_((n, cin, sz(h), sz(h)))
            w = torch.randn(cout, cin, 1, 1, device=dev, dtype=torch.float64) / cin ** 0.5
            if train:
                bn = bn_train(cin)

                def f(leaves, dt):
                    b = copy.deepcopy(bn).float() if dt != torch.float64 else copy.deepcopy(bn)
                    return ops.bn_relu_conv(leaves[0], b, leaves[1], training=True)
                return grads_close(f, [x, w], dtype, backend, 1e-3)
            bn = bn_eval(cin)
            ref = ops.bn_relu_conv_ref(x, bn, w)
            low = lowbn(bn, dtype)
            eager = ops.bn_relu_conv_ref(x.to(dtype), low, w.to(dtype))
            with resfast.backend(backend), torch.no_grad():
                out = ops.bn_relu_conv(x.to(dtype), low, w.to(dtype))
            return check_all({"out": (out, eager, ref)}, 1e-3)
        return fn

    def sar(train):
        c, h = ch(256), 56

        def fn(backend, dtype):
            x, res = x_((n, c, sz(h), sz(h))), x_((n, c, sz(h), sz(h)))
            gate = torch.rand(n, c, 1, 1, device=dev, dtype=torch.float64)

            def f(leaves, dt):
                return ops.scale_add_relu(leaves[0], leaves[1], leaves[2])
            if train:
                return grads_close(f, [x, gate, res], dtype, backend, 1e-3)
            ref = ops.scale_add_relu_ref(x, gate, res)
            eager = ops.scale_add_relu_ref(x.to(dtype), gate.to(dtype), res.to(dtype))
            with resfast.backend(backend), torch.no_grad():
                out = ops.scale_add_relu(x.to(dtype), gate.to(dtype), res.to(dtype))
            return check_all({"out": (out, eager, ref)}, 1e-3)
        return fn

    def block_train(kind, stage):
        def fn(backend, dtype):
            torch.manual_seed(0)
            if kind == "res2net":
                ds = nn.Sequential(nn.Conv2d(ch(256), ch(512), 1, 2, bias=False), nn.BatchNorm2d(ch(512))) \
                    if stage else None
                block = resfast.Bottle2neck(ch(256) if stage else ch(512), ch(128), stride=2 if stage else 1,
                                            downsample=ds, base_width=26, scale=4)
            else:
                from timm.layers import BatchNormAct2d, create_conv2d
                from timm.models import resnetv2 as rv2

                proj = dict(stride=2, proj_layer=rv2.DownsampleConv) if stage else {}
                block = resfast.TimmPreActBottleneck(ch(256) if stage else ch(512), ch(512), conv_layer=create_conv2d,
                                                     norm_layer=BatchNormAct2d, **proj)
            block = randomize_bn(block).to(dev).train()
            x = x_((n, block.conv1.in_channels, sz(28), sz(28)))
            res = {}
            for tag, dt, name in (("ref", torch.float64, "eager"), ("eager", dtype, "eager"),
                                  ("fused", dtype, backend)):
                m = copy.deepcopy(block).to(dt)
                if dt != torch.float64:
                    for mod in m.modules():
                        if isinstance(mod, nn.BatchNorm2d):
                            mod.float()
                xx = x.detach().to(dt).contiguous(memory_format=torch.channels_last).requires_grad_()
                with resfast.backend(name):
                    out = m(xx) if tag == "fused" else m._forward_modules(xx)
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                out.backward(g.to(dev, dt))
                res[tag] = [("out", out.detach()), ("grad_x", xx.grad)] + [(k, p.grad) for k, p in m.named_parameters()]
            return check_all({k: (f, e, r) for (k, f), (_, e), (_, r) in zip(res["fused"], res["eager"], res["ref"])},
                             1e-2)
        return fn

    def conv_grads(shape):
        cin, cout, h, k, s, g = shape

        def fn(backend, dtype):
            if backend != "triton":
                raise Skip("the Triton conv-gradient kernels belong to the triton backend")
            from resfast.backends.triton.kernels import conv_grad

            p, hh = k // 2, sz(h)
            x64 = x_((n, cin, hh, hh))
            w64 = torch.randn(cout, cin // g, k, k, device=dev, dtype=torch.float64) * 0.05
            ho = (hh + 2 * p - k) // s + 1
            dy64 = x_((n, cout, ho, ho))

            def aten(dy, x, w):
                return torch.ops.aten.convolution_backward(dy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], g,
                                                           [True, True, False])[:2]
            ref = aten(dy64, x64, w64)
            dy, x, w = (t.to(dtype) for t in (dy64, x64, w64))
            eager = aten(dy, x, w)
            fused = (conv_grad.conv_dgrad(dy, x.shape, w, (s, s), (p, p), (1, 1), g),
                     conv_grad.conv_wgrad(dy, x, w.shape, (s, s), (p, p), (1, 1), g))
            return check_all({"dgrad": (fused[0], eager[0], ref[0]), "wgrad": (fused[1], eager[1], ref[1])}, 1e-2)
        return fn

    def cs(shape):  # channels scaled for the dry run, groups kept dividing them
        cin, cout, h, k, s, g = shape
        if not small:
            return shape
        gg = min(g, 4)
        return (max(gg, cin // 8 // gg * gg), max(gg, cout // 8 // gg * gg), h, k, s, gg)

    W = (lambda w: max(3, w // 4)) if small else (lambda w: w)
    both = BACKENDS
    first = [
        ("conv_bn_relu eval 1x1 256->104 56px", "conv_bn_relu", "eval", conv_eval(cs((256, 104, 56, 1, 1, 1))), both),
        ("conv_bn_relu eval 3x3 g32 128 56px", "conv_bn_relu", "eval", conv_eval(cs((128, 128, 56, 3, 1, 32))), both),
        ("conv_bn_relu train 1x1 256->104 56px", "conv_bn_relu", "train", conv_train(cs((256, 104, 56, 1, 1, 1))),
         both),
        ("res2net_chain eval normal w26 56px", "res2net_chain", "eval", chain_eval(W(26), 56, "normal", 1), both),
        ("res2net_chain train normal w26 56px", "res2net_chain", "train", chain_train(W(26), 56, "normal", 1), both),
        ("bn_relu_conv eval 256->64 56px", "bn_relu_conv", "eval", brc(False), both),
        ("bn_relu_conv train 256->64 56px", "bn_relu_conv", "train", brc(True), both),
        ("scale_add_relu eval 256 56px", "scale_add_relu", "eval", sar(False), ("triton",)),
        ("scale_add_relu train 256 56px", "scale_add_relu", "train", sar(True), ("triton",)),
    ]
    second = [
        ("res2net bottleneck train layer2 normal", "block", "train", block_train("res2net", False), both),
        ("res2net bottleneck train layer2 stage", "block", "train", block_train("res2net", True), both),
        ("preact bottleneck train layer2 identity", "block", "train", block_train("preact", False), both),
        ("preact bottleneck train layer2 downsample", "block", "train", block_train("preact", True), both),
        ("triton conv grads 1x1 256->104 56px", "conv_grad", "train", conv_grads(cs((256, 104, 56, 1, 1, 1))),
         ("triton",)),
        ("triton conv grads 3x3 g32 128 56px", "conv_grad", "train", conv_grads(cs((128, 128, 56, 3, 1, 32))),
         ("triton",)),
        ("triton conv grads 7x7 s2 3->64 224px", "conv_grad", "train", conv_grads(cs((3, 64, 224, 7, 2, 1))),
         ("triton",)),
    ]
    more_conv = [(256, 256, 28, 3, 2, 32), (1024, 416, 14, 1, 1, 1), (2048, 832, 7, 1, 1, 1), (512, 512, 7, 3, 1, 1),
                 (104, 256, 56, 1, 1, 1)]
    third = [(f"conv_bn_relu eval {sh}", "conv_bn_relu", "eval", conv_eval(cs(sh)), both) for sh in more_conv]
    third += [("conv_bn_relu train 3x3 g32 128 56px", "conv_bn_relu", "train", conv_train(cs((128, 128, 56, 3, 1, 32))),
               both),
              ("conv_bn_relu train 3x3 g32 s2 256 28px", "conv_bn_relu", "train",
               conv_train(cs((256, 256, 28, 3, 2, 32))), both)]
    for args in [(26, 56, "stage", 1), (52, 56, "stage", 2), (104, 14, "normal", 1), (208, 7, "normal", 1),
                 (14, 56, "normal", 1)]:
        a = (W(args[0]),) + args[1:]
        third.append((f"res2net_chain eval {args}", "res2net_chain", "eval", chain_eval(*a), both))
    for args in [(52, 56, "stage", 2), (104, 14, "normal", 1)]:
        a = (W(args[0]),) + args[1:]
        third.append((f"res2net_chain train {args}", "res2net_chain", "train", chain_train(*a), both))
    third += [(f"triton conv grads {sh}", "conv_grad", "train", conv_grads(cs(sh)), ("triton",))
              for sh in [(256, 256, 28, 3, 2, 32), (1024, 416, 14, 1, 1, 1), (512, 512, 7, 3, 1, 1),
                         (64, 256, 56, 1, 2, 1)]]
    return first, second, third


def step_correctness(step: Step):
    """The 2x rule at real ResNet-50-family shapes, every op forward and training, fp16/bf16, triton and cuda."""
    torch = setup_torch()
    dev = device()
    step.set(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)",
             dtypes=[dname(d) for d in low_dtypes()], rule="err(fused) <= 2 err(eager same dtype) + floor max(1,|ref|)"
             ", both vs float64 eager")
    tiers = correctness_cases(small=DRY)
    for tier, cases in enumerate(tiers, 1):
        for name, op, mode, fn, backends in cases:
            for backend in backends:
                for dtype in low_dtypes():
                    torch.manual_seed(0)
                    step.case(f"{backend} {dname(dtype)} {name}", lambda b, fn=fn, dtype=dtype: fn(b, dtype),
                              backend, est=3, op=op, mode=mode, dtype=dname(dtype), tier=tier,
                              skip="dry run: tier 3 runs tiers 1-2's code at more shapes" if DRY and tier == 3 else "")


# --- step: models --------------------------------------------------------------------------------------------------

def step_models(step: Step):
    """Whole converted timm models (pretrained=False, fixed seed, randomised BatchNorm statistics), eval: logits of
    resfast on each backend vs the unconverted model, under the 2x rule against float64."""
    import copy

    torch = setup_torch()
    import resfast
    from resfast._bench.models import MODELS, count_blocks

    dev = device()
    n, size = (1, 32) if DRY else (8, 224)
    dtype = torch.float32 if DRY else torch.bfloat16
    step.set(batch=n, size=size, dtype=dname(dtype), sources={m: "/".join(MODELS[m]) for m in CHECK_MODELS},
             note="resnext50_32x4d is torchvision's (as in resfast.bench): resfast.convert does not recognise timm's "
                  "ResNet Bottleneck (timm's resnext50_32x4d converts 0/16 blocks)" + (
                 "; dry run: one block a stage, narrower where the library allows" if DRY else ""))
    for name in CHECK_MODELS:
        torch.manual_seed(0)
        model = randomize_bn(build_model(name, DRY)).eval()
        conv = resfast.convert(model)
        ours, total = count_blocks(conv)
        x = torch.randn(n, 3, size, size).to(dev).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = copy.deepcopy(model).to(dev).double()(x.double())
            eager = copy.deepcopy(model).to(dev, dtype).to(memory_format=torch.channels_last)(x.to(dtype))
        low = conv.to(dev, dtype).to(memory_format=torch.channels_last)

        def run(backend, low=low, ref=ref, eager=eager, x=x, ours=ours, total=total):
            assert ours == total, f"only {ours}/{total} blocks converted"
            with torch.no_grad(), resfast.backend(backend):
                out = low(x.to(dtype))
            nums = check_all({"logits": (out, eager, ref)}, 1e-2)
            nums.update(blocks=f"{ours}/{total}", max_abs_diff_vs_unconverted=(out.float() - eager.float()).abs().max()
                        .item(), top1_agreement=(out.argmax(1) == eager.argmax(1)).float().mean().item())
            return nums
        for backend in BACKENDS:
            step.case(f"{backend} {name} logits", run, backend, est=5, model=name)


# --- step: headline ------------------------------------------------------------------------------------------------

def _bench_result(rows, device_obj, config, command):
    from resfast._bench.env import metadata

    by = {(r["model"], r["mode"], r["provider"]): r["images_per_s"] for r in rows}
    for r in rows:
        e = by.get((r["model"], r["mode"], "eager"))
        r["ratio_vs_eager"] = r["images_per_s"] / e if e else None
    return {"kind": "models", **metadata(device_obj, command.split()), "dry_run": DRY, "config": config,
            "resfast_backend": "explicit (resfast-triton, resfast-cuda)", "backends_not_used": {}, "skipped": {},
            "rows": rows}


def step_headline(step: Step):
    """images/s and peak memory: eval bf16 channels_last batch 256 and AMP training batch 128, res2net50_26w_4s and
    resnet50, eager / resfast-triton / resfast-cuda / torch.compile (default mode, last: its compile is the
    slowest), a few iterations each (resfast._bench.models' steps, timing and peak memory)."""
    import statistics

    torch = setup_torch()
    import resfast
    from resfast._bench import models as mb
    from resfast._bench.results import write_result
    from resfast._bench.timing import quantile

    dev = device()
    batches = {"infer": 2, "train": 2} if DRY else {"infer": 256, "train": 128}
    size = 16 if DRY else 224
    dtype = torch.float32 if DRY else torch.bfloat16
    amp = None if DRY else torch.bfloat16
    warmup, iters, rounds = (0, 1, 1) if DRY else (2, 6, 2)
    fmt = torch.channels_last
    config = {"models": list(HEADLINE_MODELS), "modes": ["infer", "train"], "providers": ["eager", "resfast-triton",
              "resfast-cuda", "compile"], "batch": batches, "size": size, "dtype": dname(dtype), "channels_last": True,
              "warmup": warmup, "iters": iters, "tune": os.environ.get("RESFAST_TUNE", "full")}
    command = "bash scripts/gpu_check.sh (step headline: python scripts/gpu_check.py headline)"
    step.set(config=config)
    rows = []
    out_dir = step.path.parent.parent / "results"
    eager_out = {}

    def measure(model_name, mode, provider):
        def fn(backend):
            if DRY and model_name != HEADLINE_MODELS[0]:
                raise Skip(f"dry run: {model_name}'s full-width stages take minutes in the interpreter; its code path "
                           f"is {HEADLINE_MODELS[0]}'s")
            torch.manual_seed(0)
            batch = batches[mode]
            x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
            base = build_model(model_name, DRY).to(device=dev, memory_format=fmt)
            if provider == "eager":
                m, explicit = base, None
            elif provider == "compile":
                m, explicit = torch.compile(base), None
            else:
                m, explicit = resfast.convert(base), backend
            step_fn = mb._make_step(m, x, mode, amp, explicit)
            t0 = time.perf_counter()
            out = step_fn()
            first = time.perf_counter() - t0
            if mode == "infer":
                if provider == "eager":
                    eager_out[model_name] = out.float()
                diff = (out.float() - eager_out[model_name]).abs().max().item() if model_name in eager_out else None
            else:
                diff = None
            if DRY:  # one interpreted step is tens of seconds: the first call is the timing (and no peak memory)
                peak, t = None, [first]
            else:
                peak = mb._peak_mem_mb(step_fn, dev)
                t = mb.time_interleaved({provider: step_fn}, dev, warmup, iters, f"{model_name} {mode} {provider}",
                                        rounds=rounds)[provider]
            med = statistics.median(t)
            ours, total = mb.count_blocks(m) if explicit else (0, mb.count_blocks(base)[1])
            shown = f"resfast-{explicit}" if explicit else provider  # the dry run's stand-in shows as itself
            row = {"kind": "models", "model": model_name, "provider": shown, "mode": mode, "batch": batch, "size": size,
                   "dtype": dname(torch.bfloat16 if amp else dtype), "backend": explicit or "pytorch",
                   "median_ms": med * 1e3, "p20_ms": quantile(t, 0.2) * 1e3, "p80_ms": quantile(t, 0.8) * 1e3,
                   "images_per_s": batch / med, "peak_mem_mb": peak, "max_abs_diff_vs_eager": diff,
                   "resfast_blocks": f"{ours}/{total}"}
            rows.append(row)  # a dry run's too (marked dry_run: CPU interpreter timings, for the importer's test)
            write_result(_bench_result(rows, dev, config, command), out_dir, "gpu_check_models", plot=False)
            del m, base, step_fn
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            return {k: row[k] for k in ("images_per_s", "median_ms", "peak_mem_mb", "max_abs_diff_vs_eager",
                                        "resfast_blocks")}
        return fn

    for mode in ("infer", "train"):
        for model_name in HEADLINE_MODELS:
            for provider in ("eager", "resfast-triton", "resfast-cuda"):
                backend = {"resfast-triton": "triton", "resfast-cuda": "cuda"}.get(provider)
                step.case(f"{mode} {model_name} {provider}", measure(model_name, mode, provider), backend, est=8,
                          model=model_name, mode=mode, provider=provider)
    for mode, est in (("infer", 60), ("train", 120)):
        for model_name in HEADLINE_MODELS:
            step.case(f"{mode} {model_name} compile", measure(model_name, mode, "compile"), None, est=est,
                      model=model_name, mode=mode, provider="compile",
                      skip="dry run: torch.compile of a whole model takes minutes on 2 CPU cores; on the GPU it is "
                           "torch.compile(model) (default mode), measured last, when the step's time allows"
                      if DRY else "")
    if rows:
        paths = write_result(_bench_result(rows, dev, config, command), out_dir, "gpu_check_models", plot=True)
        step.set(result_files=[str(p.relative_to(out_dir.parent)) for p in paths])


# --- step: bandwidth -----------------------------------------------------------------------------------------------

def step_bandwidth(step: Step):
    """The stage-1 Res2Net chain ops of res2net50_26w_4s (forward, eval BatchNorm, bf16 channels_last, batch 256):
    GB/s of their minimal bytes against the measured device copy bandwidth (resfast._bench.ops)."""
    torch = setup_torch()
    from resfast._bench import ops as ob
    from resfast._bench.env import metadata
    from resfast._bench.results import write_result
    from resfast._bench.timing import copy_bandwidth_gbs

    dev = device()
    batch, size = (1, 32) if DRY else (256, 224)
    dtype = torch.float32 if DRY else torch.bfloat16
    bw = copy_bandwidth_gbs(dev)
    step.set(copy_bandwidth_gbs=bw, batch=batch, dtype=dname(dtype))
    chains = [la for la in ob.capture_layers("res2net50_26w_4s", size) if la.op == "res2net_chain"]
    stage1 = [la for la in chains if la.spec["out_hw"] == chains[0].spec["out_hw"]]
    rows = []
    out_dir = step.path.parent.parent / "results"
    for layer in stage1:
        for provider in ("eager-cl", "resfast-triton", "resfast-cuda"):
            backend = {"resfast-triton": "triton", "resfast-cuda": "cuda"}.get(provider)

            def fn(b, layer=layer, provider=provider):
                prov = provider if b is None or provider.endswith(b) else f"resfast-{b}"
                r = ob.time_layer(layer, prov, "forward", batch, dev, dtype)
                if r.get("skipped"):
                    raise Skip(r["skipped"])
                row = {"kind": "ops", "model": "res2net50_26w_4s", "op": layer.op, "layer": layer.name,
                       "stage": layer.stage, "shape": str(layer.spec), "provider": prov, "mode": "forward",
                       "batch": batch, "dtype": dname(dtype), **r}
                row["gbs"] = r["min_bytes"] / (r["median_ms"] * 1e-3) / 1e9
                row["pct_of_floor"] = 100 * row["gbs"] / bw
                rows.append(row)
                base = {x["layer"]: x["median_ms"] for x in rows if x["provider"] == "eager-cl"}
                for x in rows:
                    x["speedup_vs_eager"] = base[x["layer"]] / x["median_ms"] if x["layer"] in base else None
                result = {"kind": "ops", **metadata(dev, "bash scripts/gpu_check.sh (step bandwidth: python "
                                                         "scripts/gpu_check.py bandwidth)".split()),
                          "dry_run": DRY, "config": {"models": ["res2net50_26w_4s"], "stages": [1], "mode": ["forward"],
                                                     "batch": [batch], "dtype": [dname(dtype)]},
                          "copy_bandwidth_gbs": bw, "rows": rows}
                write_result(result, out_dir, "gpu_check_ops", plot=False)
                return {k: row[k] for k in ("median_ms", "gbs", "pct_of_floor")}
            step.case(f"{layer.name} {provider}", fn, backend, est=3, layer=layer.name, provider=provider)


# --- step: sanitize ------------------------------------------------------------------------------------------------

def step_sanitize(step: Step):
    """compute-sanitizer memcheck of one small block (res2net normal, eval + a training step) per backend."""
    import re
    import shutil

    san = shutil.which("compute-sanitizer")
    script = str(ROOT / "scripts" / "sanitize_blocks.py")
    for backend in BACKENDS:
        def fn(b, backend=backend):
            cmd = [sys.executable, script, "--backends", backend, "--blocks", "res2net normal"]
            if DRY:
                cmd.append("--dry-run")
            elif san is None:
                raise Skip("compute-sanitizer is not on PATH")
            else:
                cmd = [san, "--tool", "memcheck", "--error-exitcode", "1"] + cmd
            # no caching allocator: an access past a tensor's end lands outside every allocation, where memcheck sees it
            env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
            r = run_capped(cmd, step.path.parent.parent / "logs" / f"sanitize_{backend}.log", env)
            m = re.search(r"ERROR SUMMARY: (\d+) error", r.stdout + r.stderr)
            if DRY and r.returncode != 0 and "BackendUnavailableError" in r.stderr:
                raise Skip("no GPU (dry run), and the stand-in backend cannot run here either: "
                           + r.stderr.strip().splitlines()[-1][:500])
            assert r.returncode == 0, f"rc {r.returncode}: {(r.stdout + r.stderr)[-1500:]}"
            if DRY:
                raise Skip("no GPU (dry run): compute-sanitizer needs one; the block script ran without it through "
                           f"the interpreter / the {STAND_IN} stand-in and passed")
            return {"errors": int(m.group(1)) if m else None}
        step.case(f"memcheck {backend} res2net normal", fn, backend, est=20)


# --- finish: append, summarise, pack -------------------------------------------------------------------------------

def finish(args) -> int:
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    main_json = work / "gpu_check.json"
    data = json.loads(main_json.read_text()) if main_json.exists() else {"steps": []}
    rec_path = work / "steps" / f"{args.step}.json"
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else {"step": args.step, "cases": [], "numbers": {},
                                                                      "notes": []}
    cases = rec.get("cases", [])
    counts = {s: sum(c.get("status") == s for c in cases) for s in STATUSES}
    if args.reason:
        status = "skipped" if args.rc == 0 else "timeout"
    elif args.rc in (124, 137) or (args.rc < 0):
        status = "timeout"
    elif args.rc != 0 or counts["fail"]:
        status = "fail"
    elif counts["timeout"]:
        status = "timeout"
    elif cases and counts["skipped"] == len(cases):
        status = "skipped"
    else:
        status = "pass"
    entry = {"step": args.step, "status": status, "seconds": round(args.seconds, 1), "budget_s": args.budget,
             "timeout_s": args.timeout, "rc": args.rc, "counts": counts, "numbers": rec.get("numbers", {}),
             "notes": rec.get("notes", []) + ([args.reason] if args.reason else []), "cases": cases,
             "log": f"logs/{args.step}.log"}
    data["steps"] = [s for s in data["steps"] if s["step"] != args.step] + [entry]
    for key in ("device", "versions"):
        if rec.get("numbers", {}).get(key) and not data.get(key):
            data[key] = rec["numbers"][key]
    data["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write_json(main_json, data)
    summary = summarize(data)
    (work / "summary.txt").write_text(summary)
    pack(work, out, summary)
    print(summary.splitlines()[-1] if summary else "")
    return 0


def summarize(data) -> str:
    lines = [f"resfast gpu_check{' DRY RUN (CPU, Triton interpreter: not a GPU result)' if data.get('dry_run') else ''}"
             f" | device {data.get('device', '?')} | started {data.get('started', '?')}",
             f"versions: {json.dumps(data.get('versions', {}))}",
             f"budgets: {data.get('budget_s')} (sum {data.get('budget_total_s')} s)", ""]
    for s in data["steps"]:
        c = s["counts"]
        lines.append(f"{s['step']:<12} {s['status']:<8} {s['seconds']:>7.1f} s / {s['timeout_s']} s   "
                     f"cases: {c['pass']} pass, {c['fail']} fail, {c['timeout']} not run (time), "
                     f"{c['skipped']} skipped")
        for case in s["cases"]:
            if case.get("status") == "fail":
                lines.append(f"    FAIL {case['name']}: {case.get('error', '')[:300]}")
        for n in s.get("notes", []):
            lines.append(f"    note: {n[:300]}")
        nums = s.get("numbers", {})
        if s["step"] == "bandwidth" and "copy_bandwidth_gbs" in nums:
            lines.append(f"    copy bandwidth {nums['copy_bandwidth_gbs']:.0f} GB/s")
        if s["step"] in ("headline", "bandwidth"):
            for case in s["cases"]:
                if case.get("status") == "pass" and case.get("numbers"):
                    v = case["numbers"]
                    lines.append(f"    {case['name']}: " + ", ".join(
                        f"{k} {v[k]:.4g}" if isinstance(v[k], float) else f"{k} {v[k]}" for k in v))
    lines.append("")
    lines.append("overall: " + ", ".join(f"{s['step']} {s['status']}" for s in data["steps"]))
    return "\n".join(lines) + "\n"


def pack(work: Path, out: Path, summary: str) -> None:
    """OUT gets exactly two files: gpu_check.tar.gz (everything under WORK, as gpu_check/...) and summary.txt."""
    tmp = out / ".gpu_check.tar.gz.partial"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(str(work), arcname="gpu_check")
    os.replace(tmp, out / "gpu_check.tar.gz")
    tmp = out / ".summary.txt.partial"
    tmp.write_text(summary)
    os.replace(tmp, out / "summary.txt")


def init(args) -> int:
    work = Path(args.work)
    for sub in ("steps", "logs", "results"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    budgets = dict(b.split(":") for b in args.budgets)
    data = {"schema": 1, "dry_run": DRY, "started": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "budget_s": {k: int(v) for k, v in budgets.items()},
            "budget_total_s": sum(int(v) for v in budgets.values()), "limit_s": args.limit,
            "tune": os.environ.get("RESFAST_TUNE", "full"), "host": platform.node(), "steps": []}
    _write_json(work / "gpu_check.json", data)
    return 0


STEPS = {"build": step_build, "smoke": step_smoke, "correctness": step_correctness, "models": step_models,
         "headline": step_headline, "bandwidth": step_bandwidth, "sanitize": step_sanitize}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=sorted(STEPS) + ["finish", "init"])
    p.add_argument("name", nargs="?", help="finish: the step to record")
    p.add_argument("--work", required=True)
    p.add_argument("--out")
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--timeout", type=int, default=0)
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--reason", default="")
    p.add_argument("--budgets", nargs="*", default=[])
    p.add_argument("--limit", type=int, default=540)
    args = p.parse_args(argv)
    if args.step == "init":
        return init(args)
    if args.step == "finish":
        args.step = args.name
        return finish(args)
    step = Step(Path(args.work), args.step)
    try:
        STEPS[args.step](step)
    except Exception as e:  # noqa: BLE001  (a step that cannot even start: recorded as a failed case)
        step.data["cases"].append({"name": f"{args.step} (setup)", "status": "fail", "error": f"{type(e).__name__}: "
                                   f"{e}"[:2000], "traceback": traceback.format_exc()[-3000:]})
        step.save()
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
