"""Ahead-of-time compilation of every Triton kernel launch the converted models make, for sm_90 and sm_80, without a
GPU: ``python -m resfast.backends.triton.aot``.

Three steps, each its own process where Triton needs it:

1. **record** (subprocesses with ``TRITON_INTERPRET=1``): converted timm models (``resfast.convert``) run an eval
   forward and a training step (cross-entropy + ``loss.backward()``; also with ``RESFAST_CONV_BACKWARD=triton``)
   on CPU tensors through the Triton backend. Every launch reaches Triton's ``Autotuner.run`` or the interpreter's
   ``InterpretedFunction.run`` (whatever launcher the modules use: ``kernel[grid](...)`` calls ``run``), which are
   patched to write down the kernel (the module attribute that holds it), each argument (a tensor as its dtype and
   whether its address is 16-byte aligned; ints, floats, bools, strings as they are) and the launch's meta
   arguments, and by default to skip the kernel: the outputs are left as allocated (garbage, of the right shape and
   strides), so a model runs at 224x224 at the cost of its eager layers (``--execute`` runs the kernels; a test
   checks both modes record the same launches). ATen's conv gradients (``RESFAST_CONV_BACKWARD=aten``) are skipped
   the same way (uninitialised results of ATen's shapes and layouts): computed on the CPU at batch 256 they took
   minutes per training step. The models are the benchmarks' (``resfast._bench.models``): timm's Res2Nets and
   resnetv2_50, torchvision's resnet50 and resnext50_32x4d; any other name is a timm model (timm's SE-ResNeXts
   launch the scale_add_relu kernels); ``model/path`` records one submodule.
   The GPU's precision is recorded as it is, not substituted: under ``torch.autocast("cpu", bf16/fp16)`` the ops
   see the autocast dtype exactly as on a GPU (``resfast.bench`` runs the GPU at bf16 AMP), and a model converted to
   bf16/fp16 (``.to(dtype)``) runs half-precision parameters; the interpreter's dtype gate
   (``resfast.backends.triton.backend.INTERPRETER_DTYPES``, float32/float64, because numpy has no bf16) is widened in
   the recording process only, which is safe because the kernels never run there. Two facts of the CPU run that
   differ from a GPU are mapped: float32 convolutions take ``INPUT_PRECISION="tf32"`` (cuDNN's TF32 switch is on
   by default on a GPU; the CPU run records ``"ieee"``), and a wgrad launch's ``chunk`` depends on the SM count
   (it is a multiple of 128 either way, so its specialisation is the same). The Triton backend is preferred
   wherever it can run an op (``auto`` with the Triton backend's "not verified on a GPU" reason lifted); the ops it
   refuses (e.g. mixed-precision inputs under autocast) run as they would on a GPU, and the report counts them.
2. **compile** (this process and a pool of workers, no interpreter): each recorded launch is bound with Triton's own
   binder for the target (``create_function_from_signature`` + ``JITFunction._pack_args``, the code path of a GPU
   launch), so the signature, constexprs and divisibility-by-16 / equal-to-1 attributes are Triton's. Autotuned
   kernels expand to the configs the GPU would try: the module's autotuner built without the interpreter (e.g.
   ``conv.CONFIGS``) with its ``early_config_prune``. Each distinct (kernel, specialisation, config, arch) is
   compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; ptxas' ``-v`` log gives
   registers, spill stores/loads and stack; the kernel's metadata its shared memory; the PTX whether a ``tl.dot``
   became ``wgmma`` (sm_90) or ``mma`` (sm_80). A compile error or shared memory over the architecture's per-block
   limit (227 KiB sm_90, 163 KiB sm_80) fails the run.
3. **report**: per kernel and config, registers, spills, shared memory and the occupancy limit (resident warps per
   SM, from registers, shared memory, 64 warps and 32 blocks per SM), JSON + markdown under
   ``benchmarks/results/aot/`` and a summary table in benchmarks/README.md (``benchmarks/update_tables.py``). The
   targets (no spills in any config autotuning can pick; BatchNorm / scale_add_relu kernels <= 64 registers; every
   conv launch with a config of >= 16 warps per SM on sm_90) are checked and each miss printed; ``--strict`` makes
   a miss fail the run.

Cost, measured on a shared 2-core machine: compiling runs at ~0.75-1.6 compiles/s over 2 processes. The default
run (no options: six models, three modes, fp32 and bf16/fp16 autocast, 224x224 batch 256, sm_90 and sm_80) is the
one full command: about 3 x 2 x 1,800 compiles, ~2 h on 2 cores (the compiles spread over ``--jobs``, one per
core by default). The committed report is its bf16-autocast sm_90 part (``--precisions amp-bf16 --archs 90``,
~1,800 compiles, ~20 min). ``--sizes 64:2`` and the half-parameter precisions (``bf16``, ``fp16``) add other
specialisations of the same kernels (8,232 distinct compiles for the 64x64 runs of all five precisions).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

MODELS = ("res2net50_26w_4s", "res2net50_14w_8s", "res2next50", "resnext50_32x4d", "resnet50", "resnetv2_50")
# eval; a training step with ATen's conv gradients; a training step with the Triton conv gradients
MODES = ("eval", "train", "train-triton-bwd")
# float32; autocast (parameters fp32, convs in the half dtype: what resfast.bench runs on a GPU); half parameters
PRECISIONS = ("fp32", "amp-bf16", "amp-fp16", "bf16", "fp16")
# (spatial size, batch): a small run, and the GPU benchmark's 224x224 batch 256
SIZES = ((64, 2), (224, 256))
ARCHS = (90, 80)
# the default run (no options): what a GPU benchmark and a training run meet, every kernel in float32 and both half
# dtypes at the benchmark's shapes, for both archs (about 10k compiles: ~2 h on 2 CPU cores, ~15 min on 16). The
# half-parameter precisions and the small size add specialisations of the same kernels (ask for them by name).
DEFAULT_PRECISIONS = ("fp32", "amp-bf16", "amp-fp16")
DEFAULT_SIZES = ((224, 256),)

# per-block shared memory limits (what a launch may request) and per-SM capacities, bytes
SMEM_BLOCK_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
SMEM_SM = {90: 228 * 1024, 80: 164 * 1024}
SMEM_RESERVED_PER_BLOCK = 1024
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

# the targets (item 4 of the task that built this tool; see the module docstring)
ELEMENTWISE_KERNELS = ("resfast.backends.triton.kernels.batchnorm:", "resfast.backends.triton.kernels.scale_add_relu:")
ELEMENTWISE_MAX_REGS = 64
KERNELS_PKG = "resfast.backends.triton.kernels"
CONV_KERNELS = (f"{KERNELS_PKG}.conv:_tuned_kernel", f"{KERNELS_PKG}.conv_grad:_dgrad",
                f"{KERNELS_PKG}.conv_grad:_wgrad")
CONV_MIN_WARPS_SM90 = 16

KERNEL_MODULES = tuple(f"{KERNELS_PKG}.{m}" for m in ("conv", "conv_grad", "batchnorm", "scale_add_relu"))
ROOT = Path(__file__).resolve().parents[3]  # the repository (this file: resfast/backends/triton/aot.py)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "aot"


# ---------------------------------------------------------------------------------------------------------------
# occupancy arithmetic


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> dict:
    """Resident blocks and warps per SM of a kernel, and what limits them.

    Registers: per thread rounded up to a multiple of 8 (so a warp's allocation is a multiple of 256 registers),
    65536 per SM. Shared memory: the block's request plus 1 KiB the driver reserves per block, out of 228 KiB per SM
    (sm_90) or 164 KiB (sm_80). At most 64 warps and 32 blocks per SM."""
    regs_warp = math.ceil(max(registers, 1) / 8) * 8 * 32
    limits = {
        "registers": (REGS_PER_SM // regs_warp) // num_warps,
        "shared": SMEM_SM[arch] // (shared + SMEM_RESERVED_PER_BLOCK),
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    blocks = min(limits.values())
    return {"blocks": blocks, "warps": blocks * num_warps,
            "limiter": [k for k, v in limits.items() if v == blocks][0], "by": limits}


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(log: str) -> dict:
    """Registers, spill stores/loads and stack frame bytes from a ``ptxas -v`` log (one kernel)."""
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    spills = [(int(a), int(b)) for a, b in _PTXAS_SPILL.findall(log)]
    stack = [int(m) for m in _PTXAS_STACK.findall(log)]
    if not regs:
        raise ValueError(f"no register count in the ptxas log:\n{log}")
    return {"registers": max(regs), "spill_stores": max((s for s, _ in spills), default=0),
            "spill_loads": max((ld for _, ld in spills), default=0), "stack": max(stack, default=0)}


# ---------------------------------------------------------------------------------------------------------------
# step 1: recording (runs with TRITON_INTERPRET=1)


def _encode(v, torch):
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).replace("torch.", ""), "aligned": v.data_ptr() % 16 == 0}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot record a kernel argument of type {type(v).__name__}: {v!r}")


def _by_position(obj, args, meta: dict) -> tuple[list, dict]:
    """A launch in one form however its site passes the arguments (by position or by name, as conv's launches do):
    the kernel's leading non-constexpr parameters by position (those given positionally, then those named, in the
    kernel's order, up to its first constexpr), the rest by name (the kernel's parameters in its order, then the
    launch options: num_warps, ...)."""
    import inspect

    fn = obj
    while hasattr(fn, "fn"):  # Autotuner -> InterpretedFunction / JITFunction -> the Python function
        fn = fn.fn
    params = list(inspect.signature(fn).parameters.values())
    args, meta = list(args), dict(meta)
    for p in params[len(args):]:
        if p.name not in meta or "constexpr" in str(p.annotation):
            break
        args.append(meta.pop(p.name))
    order = {p.name: i for i, p in enumerate(params)}
    return args, dict(sorted(meta.items(), key=lambda kv: order.get(kv[0], len(order))))


class Recorder:
    """Patches Triton's launch entry points (class level: every kernel, whichever launcher indexes it) to record
    each launch, and to skip the kernel unless ``execute``."""

    def __init__(self, execute: bool = False, fp32_precision: str = "tf32"):
        import importlib

        import torch
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.interpreter import InterpretedFunction

        self.torch = torch
        self.execute = execute
        self.fp32_precision = fp32_precision
        self.launches: dict[str, dict] = {}
        self.context = ""
        self.fallbacks: Counter = Counter()
        self.names = {}
        for mod in KERNEL_MODULES:
            m = importlib.import_module(mod)
            for attr, obj in vars(m).items():
                if isinstance(obj, (Autotuner, InterpretedFunction)):
                    self.names[id(obj)] = f"{mod}:{attr}"
        self._depth = 0
        self._patches = []
        rec = self

        def autotuner_run(self_, *args, **kwargs):
            rec._record(self_, args, kwargs)
            if not rec.execute:
                return None
            rec._depth += 1
            try:
                return orig_at(self_, *args, **kwargs)
            finally:
                rec._depth -= 1

        def interpreted_run(self_, *args, **kwargs):
            if rec._depth == 0:
                rec._record(self_, args, kwargs)
            if rec.execute:
                return orig_if(self_, *args, **kwargs)
            return None

        orig_at, orig_if = Autotuner.run, InterpretedFunction.run
        self._patches = [(Autotuner, "run", orig_at), (InterpretedFunction, "run", orig_if)]
        Autotuner.run = autotuner_run
        InterpretedFunction.run = interpreted_run

    def close(self):
        for cls, name, orig in self._patches:
            setattr(cls, name, orig)
        self._patches = []

    def _record(self, obj, args, kwargs):
        name = self.names.get(id(obj))
        if name is None:
            fn = getattr(obj, "fn", obj)
            raise RuntimeError(f"a launch of {getattr(fn, '__name__', fn)!r} is not a kernel of {KERNEL_MODULES}: "
                               "add its module to resfast.backends.triton.aot.KERNEL_MODULES")
        args, meta = _by_position(obj, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        enc_args = [_encode(a, self.torch) for a in args]
        enc_meta = {k: _encode(v, self.torch) for k, v in meta.items()}
        tensors = [a for a in list(args) + list(meta.values()) if isinstance(a, self.torch.Tensor)]
        if (enc_meta.get("INPUT_PRECISION") == "ieee" and tensors
                and all(t.dtype == self.torch.float32 for t in tensors[:1])):
            enc_meta["INPUT_PRECISION"] = self.fp32_precision  # a GPU's default (cudnn.allow_tf32 is True)
        rec = {"kernel": name, "args": enc_args, "meta": enc_meta}
        key = json.dumps(rec, sort_keys=True)
        entry = self.launches.setdefault(key, {**rec, "count": 0, "contexts": []})
        entry["count"] += 1
        if self.context not in entry["contexts"]:
            entry["contexts"].append(self.context)


def _prefer_triton(recorder):
    """`auto` that picks the Triton backend wherever it can run an op (its 'not verified on a GPU' reason lifted),
    counting the ops that go elsewhere and why."""
    from resfast.ops import dispatch

    tb = dispatch._BACKENDS["triton"]
    tb.auto_reasons = lambda op: []
    orig_select = dispatch.select

    def select(op, args):
        b = orig_select(op, args)
        if b.name != "triton":
            why = "; ".join(tb.not_supported_reasons(op, args)) or "?"
            recorder.fallbacks[f"{recorder.context} | {op} -> {b.name}: {why}"] += 1
        return b
    dispatch.select = select


def record_run(model_name: str, mode: str, precision: str, size: int, batch: int, recorder) -> None:
    """One eval forward or one training step of the converted model, every Triton launch recorded."""
    import torch

    import resfast
    from resfast._bench.models import MODELS as BENCH_MODELS
    from resfast._bench.models import eager_model

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}
    amp = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}.get(precision)
    param_dtype = half.get(precision, torch.float32)
    os.environ["RESFAST_CONV_BACKWARD"] = "triton" if mode == "train-triton-bwd" else "aten"
    torch.manual_seed(0)
    # the benchmarks' models (resfast._bench.models): timm's Res2Nets and resnetv2_50, torchvision's resnet50 and
    # resnext50_32x4d; any other name is a timm model (e.g. seresnext26d_32x4d, whose SE blocks launch the
    # scale_add_relu kernels). "model/path" runs one submodule (a block: path "layer1.0"), its input size x size
    # with the block's channels.
    name, _, path = model_name.partition("/")
    if name in BENCH_MODELS:
        model = eager_model(name)
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
    in_ch = 3
    if path:
        model = model.get_submodule(path)
        in_ch = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    model = resfast.convert(model.to(dtype=param_dtype, memory_format=torch.channels_last), inplace=True)
    # a block inside an autocast model gets the autocast dtype (the stem's conv output; BatchNorm keeps it)
    x_dtype = amp if path and amp is not None else param_dtype
    x = torch.randn(batch, in_ch, size, size, dtype=x_dtype).contiguous(memory_format=torch.channels_last)
    if path and mode != "eval":  # inside the model the block's input has a gradient (the stem's parameters)
        x.requires_grad_(True)
    recorder.context = f"{model_name} {mode} {precision} {size}x{size} b{batch}"
    with resfast.backend("auto"):
        if mode == "eval":
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", amp or torch.bfloat16, enabled=amp is not None):
                model(x)
        else:
            model.train()
            with torch.autocast("cpu", amp or torch.bfloat16, enabled=amp is not None):
                out = model(x)
            if path:  # a block: any scalar of its output
                out.float().mean().backward()
            else:
                torch.nn.functional.cross_entropy(out.float(), torch.randint(0, 1000, (batch,))).backward()


def _skip_aten_conv_backward(torch) -> None:
    """In the recording mode that skips the kernels, ATen's conv gradients (RESFAST_CONV_BACKWARD=aten, called by
    resfast.backends.triton.kernels.conv_grad as ``torch.ops.aten.convolution_backward``) are skipped too:
    uninitialised results with ATen's shapes and layouts (dx as the input's memory format, as cuDNN and oneDNN give
    it), so a 224x224 batch-256 training step does not spend minutes of CPU on gradients nobody reads. The Triton
    launches are unchanged."""
    def convolution_backward(dy, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                             groups, mask):
        # the input's suggested memory format (a channel slice of a channels_last tensor counts as channels_last)
        fmt = torch.channels_last if x.dim() == 4 and x.stride(1) < x.stride(3) else torch.contiguous_format
        return (torch.empty(x.shape, dtype=x.dtype, memory_format=fmt) if mask[0] else None,
                torch.empty_like(weight, memory_format=torch.contiguous_format) if mask[1] else None,
                dy.new_empty(bias_sizes) if mask[2] and bias_sizes is not None else None)
    torch.ops.aten.convolution_backward = convolution_backward


def _record_main(spec_file: str, out_file: str) -> int:
    """Entry point of a recording subprocess (TRITON_INTERPRET=1): the runs listed in spec_file."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("recording needs TRITON_INTERPRET=1 (the launches are recorded from the interpreter)")
    import torch

    import resfast.backends.triton.backend as tops

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec.get("threads", 1))
    recorder = Recorder(execute=spec.get("execute", False), fp32_precision=spec.get("fp32_precision", "tf32"))
    if not recorder.execute:  # the kernels never run: the interpreter's float32/float64 gate does not apply
        tops.INTERPRETER_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        _skip_aten_conv_backward(torch)
    _prefer_triton(recorder)
    timing = []
    try:
        for run in spec["runs"]:
            t0 = time.perf_counter()
            n0 = sum(e["count"] for e in recorder.launches.values())
            record_run(run["model"], run["mode"], run["precision"], run["size"], run["batch"], recorder)
            timing.append({**run, "seconds": round(time.perf_counter() - t0, 2),
                           "launches": sum(e["count"] for e in recorder.launches.values()) - n0})
            print(f"  recorded {recorder.context}: {timing[-1]['launches']} launches, {timing[-1]['seconds']} s",
                  flush=True)
    finally:
        recorder.close()
    Path(out_file).write_text(json.dumps({"launches": list(recorder.launches.values()), "runs": timing,
                                          "fallbacks": dict(recorder.fallbacks)}))
    return 0


def record(runs: list[dict], jobs: int, execute: bool = False, fp32_precision: str = "tf32", log=print) -> dict:
    """Record the launches of `runs` in `jobs` interpreter subprocesses; merged launches, per-run timing, fallbacks."""
    jobs = max(1, min(jobs, len(runs)))
    # balance the shards: a rough cost per run (pixels x batch, training ~4x eval), largest first to the least loaded
    shards, load = [[] for _ in range(jobs)], [0.0] * jobs
    for run in sorted(runs, key=lambda r: -r["size"] ** 2 * r["batch"] * (1 if r["mode"] == "eval" else 4)):
        i = load.index(min(load))
        shards[i].append(run)
        load[i] += run["size"] ** 2 * run["batch"] * (1 if run["mode"] == "eval" else 4) + 64 ** 2 * 8
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    procs = []
    with tempfile.TemporaryDirectory(prefix="resfast-aot-") as tmp:
        for i, shard in enumerate(shards):
            spec, out = Path(tmp, f"spec{i}.json"), Path(tmp, f"out{i}.json")
            spec.write_text(json.dumps({"runs": shard, "execute": execute, "fp32_precision": fp32_precision}))
            procs.append((subprocess.Popen([sys.executable, "-m", "resfast.backends.triton.aot", "--_record", str(spec),
                                            str(out)], env=env), out, shard))
        merged: dict[str, dict] = {}
        result = {"runs": [], "fallbacks": Counter()}
        failed = []
        for p, out, shard in procs:
            if p.wait() != 0:
                failed.append(shard)
                continue
            r = json.loads(out.read_text())
            result["runs"] += r["runs"]
            result["fallbacks"].update(r["fallbacks"])
            for e in r["launches"]:
                key = json.dumps({k: e[k] for k in ("kernel", "args", "meta")}, sort_keys=True)
                m = merged.setdefault(key, {**e, "count": 0, "contexts": []})
                m["count"] += e["count"]
                m["contexts"] += [c for c in e["contexts"] if c not in m["contexts"]]
    if failed:
        raise RuntimeError(f"recording failed for {failed} (see the traceback above)")
    result["launches"] = list(merged.values())
    result["fallbacks"] = dict(result["fallbacks"])
    log(f"recorded {sum(e['count'] for e in result['launches'])} launches, {len(result['launches'])} distinct, "
        f"from {len(runs)} runs")
    return result


# ---------------------------------------------------------------------------------------------------------------
# step 2: compiling (no interpreter)


class _FakeTensor:
    """What Triton's binder reads of a tensor argument: its dtype and its address (16-byte aligned or not)."""

    def __init__(self, dtype, aligned: bool):
        self.dtype = dtype
        self._ptr = 1 << 20 if aligned else (1 << 20) + 2

    def data_ptr(self):
        return self._ptr

    def element_size(self):  # what a prune function may ask (conv._prune_configs does)
        return self.dtype.itemsize


def _decode(v):
    import torch

    if isinstance(v, dict) and "tensor" in v:
        return _FakeTensor(getattr(torch, v["tensor"]), v["aligned"])
    return v


def _kernel_object(ref: str):
    import importlib

    mod, attr = ref.split(":")
    return getattr(importlib.import_module(mod), attr)


def _jit_function(obj):
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _binders(archs):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return {cc: make_backend(GPUTarget("cuda", cc, 32)) for cc in archs}


def expand(launch: dict, backends: dict) -> list[dict]:
    """The compile jobs of one recorded launch: one per (config autotuning can pick, arch), each with Triton's
    signature, constexprs, attrs and options for that target."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature

    obj = _kernel_object(launch["kernel"])
    fn = _jit_function(obj)
    args = [_decode(a) for a in launch["args"]]
    meta = {k: _decode(v) for k, v in launch["meta"].items()}
    if "configs" in launch:  # a launch that names its own configs (tests plant an over-large one)
        configs, n_all = launch["configs"], len(launch["configs"])
    elif isinstance(obj, Autotuner):
        obj.nargs = dict(zip(obj.arg_names, args))
        try:
            configs = [c.all_kwargs() for c in obj.prune_configs(dict(meta))]
        finally:
            obj.nargs = None
        n_all = len(obj.configs)
    else:
        configs, n_all = [{}], 1
    jobs = []
    for cfg in configs:
        kw = {**meta, **cfg, "debug": False}
        for cc, backend in backends.items():
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, opts = binder(*args, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
            opt = {k: v for k, v in options.__dict__.items()}
            key = json.dumps([launch["kernel"], cc, signature, sorted((str(k), repr(v)) for k, v in constexprs.items()),
                              sorted((str(k), repr(v)) for k, v in attrs.items()),
                              sorted((k, repr(v)) for k, v in opt.items())])
            jobs.append({"key": key, "kernel": launch["kernel"], "arch": cc, "config": _config_label(cfg, meta),
                         "num_warps": options.num_warps, "num_stages": options.num_stages,
                         "signature": signature, "constexprs": constexprs, "attrs": attrs, "options": opt,
                         "n_configs_total": n_all, "n_configs_tried": len(configs),
                         "declared_constexpr": [p.is_constexpr for p in fn.params]})
    return jobs


def _config_label(cfg: dict, meta: dict) -> str:
    """The tuned parameters and warps/stages of a config (the launch's own num_warps for an untuned kernel)."""
    parts = [f"{k}={v}" for k, v in cfg.items() if k not in ("num_warps", "num_stages", "num_ctas")]
    w = cfg.get("num_warps", meta.get("num_warps", 4))
    s = cfg.get("num_stages", meta.get("num_stages", 3))
    return " ".join(parts + [f"w{w}", f"s{s}"])


_WORKER_READY = False


def _worker_init(cache_dir: str):
    global _WORKER_READY
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    _WORKER_READY = True


def compile_one(job: dict) -> dict:
    """Compile one (kernel, specialisation, config, arch); resources from ptxas' log, the metadata and the PTX."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc = job["arch"]
    out = {"key": job["key"]}
    t0 = time.perf_counter()
    try:
        fn = _jit_function(_kernel_object(job["kernel"]))
        src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
        buf = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=job["options"])
        log = buf.getvalue()
        if "Used" not in log:  # a cache hit skips ptxas: run it on the PTX as Triton does
            log = _ptxas_log(k.asm["ptx"], cc)
        res = parse_ptxas(log)
        ptx, ttir = k.asm["ptx"], k.asm["ttir"]
        out.update(res, shared=int(k.metadata.shared), dot="tt.dot" in ttir,
                   wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)))
    except Exception as e:  # noqa: BLE001  (every failure is reported, the run fails on it)
        out["error"] = f"{type(e).__name__}: {e}"[:4000] + "\n" + traceback.format_exc()[-2000:]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _ptxas_log(ptx: str, cc: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        p = Path(d, "k.ptx")
        p.write_text(ptx)
        r = subprocess.run([get_ptxas(cc).path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(cc)}",
                            str(p), "-o", str(Path(d, "k.o"))], capture_output=True, text=True, check=True)
        return r.stderr + r.stdout


def compile_all(jobs: list[dict], workers: int, log=print) -> dict[str, dict]:
    """Compile the distinct jobs over `workers` processes; results by job key."""
    import multiprocessing

    unique = {j["key"]: j for j in jobs}
    results = {}
    with tempfile.TemporaryDirectory(prefix="resfast-aot-cache-") as cache:
        if workers <= 1:
            _worker_init(cache)
            for j in unique.values():
                results[j["key"]] = compile_one(j)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(cache,)) as ex:
                futs = [ex.submit(compile_one, j) for j in unique.values()]
                for i, f in enumerate(as_completed(futs), 1):
                    r = f.result()
                    results[r["key"]] = r
                    if i % 50 == 0 or i == len(futs):
                        log(f"  compiled {i}/{len(futs)}")
    return results


# ---------------------------------------------------------------------------------------------------------------
# step 3: report and targets


def _short_kernel(ref: str) -> str:
    mod, attr = ref.split(":")
    return f"{mod.rsplit('.', 1)[-1]}.{attr}"


def _launch_label(launch: dict) -> str:
    """A compact description of a launch: the kernel's constexpr flags that are set, and its tensor dtypes."""
    m = launch["meta"]
    flags = [k for k, v in m.items() if v is True or (k == "PRE_BN_RELU" and v)]
    shape = {k: m[k] for k in ("CIN_G", "COUT_G", "KH", "KW", "G_TILE", "BLOCK_N", "BLOCK_C") if k in m}
    dtypes = sorted({a["tensor"] for a in launch["args"] if isinstance(a, dict)})
    return " ".join([f"{k}={v}" for k, v in shape.items()] + flags + ["/".join(dtypes)])


def build_report(recorded: dict, launches: list[dict], jobs_by_launch: list[list[dict]], results: dict,
                 archs) -> dict:
    """The per-compile rows (occupancy included), per-launch summaries, compile errors, smem overflows and the
    targets' misses."""
    rows = {}
    errors, overflows = [], []
    for jobs in jobs_by_launch:
        for j in jobs:
            if j["key"] in rows:
                continue
            r = results[j["key"]]
            row = {"id": _short_id(j["key"]), "kernel": j["kernel"], "arch": j["arch"], "config": j["config"],
                   "num_warps": j["num_warps"], "num_stages": j["num_stages"],
                   "specialisation": _spec_label(j)}
            if "error" in r:
                row["error"] = r["error"]
                errors.append(row)
            else:
                row.update({k: r[k] for k in ("registers", "spill_stores", "spill_loads", "stack", "shared", "dot",
                                              "wgmma", "mma", "seconds")})
                row["occupancy"] = occupancy(r["registers"], r["shared"], j["num_warps"], j["arch"])
                if r["shared"] > SMEM_BLOCK_LIMIT[j["arch"]]:
                    row["smem_overflow"] = True
                    overflows.append(row)
            rows[j["key"]] = row
    out_launches = []
    misses = []
    for launch, jobs in zip(launches, jobs_by_launch):
        per = [rows[j["key"]] for j in jobs]
        ints = [a for a in launch["args"] if isinstance(a, int) and not isinstance(a, bool)]
        entry = {"kernel": launch["kernel"], "label": _launch_label(launch), "count": launch.get("count", 1),
                 "contexts": launch["contexts"][:3], "n_contexts": len(launch["contexts"]), "ints": ints,
                 "meta": launch["meta"], "compiles": [_short_id(j["key"]) for j in jobs]}
        ok = [r for r in per if "error" not in r]
        for cc in archs:
            best = max((r["occupancy"]["warps"] for r in ok if r["arch"] == cc), default=None)
            entry[f"best_warps_sm{cc}"] = best
        out_launches.append(entry)
        if launch["kernel"] in CONV_KERNELS and entry.get("best_warps_sm90") is not None \
                and entry["best_warps_sm90"] < CONV_MIN_WARPS_SM90 and _dot_launch(ok):
            misses.append({"target": f"conv launch >= {CONV_MIN_WARPS_SM90} warps/SM on sm_90",
                           "kernel": launch["kernel"], "what": f"{_launch_label(launch)} ints={entry['ints']}",
                           "value": entry["best_warps_sm90"], "contexts": launch["contexts"][:3]})
    for r in rows.values():
        if "error" in r:
            continue
        if r["spill_stores"] or r["spill_loads"]:
            misses.append({"target": "no spills in a config autotuning can pick", "kernel": r["kernel"],
                           "what": f"sm_{r['arch']} {r['config']}",
                           "value": f"{r['spill_stores']} B stores / {r['spill_loads']} B loads", "id": r["id"]})
        if r["kernel"].startswith(ELEMENTWISE_KERNELS) and r["registers"] > ELEMENTWISE_MAX_REGS:
            misses.append({"target": f"elementwise/reduction kernels <= {ELEMENTWISE_MAX_REGS} registers",
                           "kernel": r["kernel"], "what": f"sm_{r['arch']} {r['config']}",
                           "value": r["registers"], "id": r["id"]})
    return {"compiles": list(rows.values()), "launches": out_launches, "errors": errors, "overflows": overflows,
            "misses": _dedupe_misses(misses), "fallbacks": recorded.get("fallbacks", {}),
            "runs": recorded.get("runs", [])}


def _short_id(key: str) -> str:
    import hashlib

    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _spec_label(job: dict) -> str:
    """The signature's types and the specialised attributes, compactly: one letter per argument (constexprs
    left out): its type, ``D`` when Triton assumes divisibility by 16, ``1`` when it is the constant 1."""
    out = []
    for i, (name, ty) in enumerate(job["signature"].items()):
        if ty == "constexpr":
            if not job["declared_constexpr"][i]:  # an int argument equal to 1: Triton made it a constant
                out.append(f"{name}=1")
            continue
        attrs = job["attrs"].get((i,), [])
        out.append(ty + ("/D" if any(a[0] == "tt.divisibility" for a in attrs) else ""))
    return " ".join(out)


def _dot_launch(rows) -> bool:
    return any(r.get("dot") for r in rows)


def _dedupe_misses(misses):
    seen, out = set(), []
    for m in misses:
        k = (m["target"], m["kernel"], m["what"], str(m["value"]))
        if k not in seen:
            seen.add(k)
            out.append(m)
    return out


def kernel_config_table(report: dict) -> list[dict]:
    """One row per (kernel, arch, config): over the compiled specialisations, the ranges of registers, spills,
    shared memory and resident warps per SM, and the tensor-core instruction of its tl.dot."""
    groups = defaultdict(list)
    for r in report["compiles"]:
        if "error" not in r:
            groups[(r["kernel"], r["arch"], r["config"])].append(r)
    out = []
    for (kernel, arch, config), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        dots = [r for r in rs if r["dot"]]
        mma = "-"
        if dots:
            kinds = {"wgmma" if r["wgmma"] else "mma" if r["mma"] else "fma" for r in dots}
            mma = "/".join(sorted(kinds))
        out.append({"kernel": kernel, "arch": arch, "config": config, "variants": len(rs),
                    "regs": (min(r["registers"] for r in rs), max(r["registers"] for r in rs)),
                    "spill": (max(r["spill_stores"] for r in rs), max(r["spill_loads"] for r in rs)),
                    "shared": max(r["shared"] for r in rs),
                    "warps": (min(r["occupancy"]["warps"] for r in rs), max(r["occupancy"]["warps"] for r in rs)),
                    "limiter": sorted({r["occupancy"]["limiter"] for r in rs}), "mma": mma})
    return out


def conv_launch_groups(report: dict) -> list[dict]:
    """The conv launches grouped by (kernel, label): how many, and the range of their best warps/SM per arch."""
    groups = defaultdict(list)
    for e in report["launches"]:
        if e["kernel"] in CONV_KERNELS:
            groups[(e["kernel"], e["label"])].append(e)
    out = []
    for (kernel, label), es in groups.items():
        w90 = [e["best_warps_sm90"] for e in es if e.get("best_warps_sm90") is not None] or [0]
        w80 = [e["best_warps_sm80"] for e in es if e.get("best_warps_sm80") is not None] or [0]
        out.append({"kernel": kernel, "label": label, "launches": len(es), "sm90": (min(w90), max(w90)),
                    "sm80": (min(w80), max(w80)), "context": es[0]["contexts"][0]})
    return sorted(out, key=lambda g: (g["kernel"], g["sm90"], g["label"]))


def write_json(report: dict, path: Path) -> None:
    """The report as JSON with one compile row or launch per line (diffable, a few MB at most)."""
    parts = ["{"]
    keys = list(report)
    for i, k in enumerate(keys):
        v = report[k]
        end = "," if i < len(keys) - 1 else ""
        if isinstance(v, list) and v:
            parts.append(f"{json.dumps(k)}: [")
            parts += [json.dumps(x, default=str) + ("," if n < len(v) - 1 else "") for n, x in enumerate(v)]
            parts.append("]" + end)
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v, default=str)}{end}")
    parts.append("}")
    path.write_text("\n".join(parts) + "\n")


def _rng(p):
    return f"{p[0]}" if p[0] == p[1] else f"{p[0]}-{p[1]}"


def markdown(report: dict) -> str:
    h = report["header"]
    lines = [f"# Ahead-of-time compile of resfast's Triton kernels (sm_{', sm_'.join(map(str, h['archs']))})", "",
             f"`{h['command']}` — {h['date']}, resfast {h.get('git', '?')}, triton {h['versions']['triton']}, "
             f"torch {h['versions']['torch']}, python {h['versions']['python']}; no GPU (Triton compiles for the "
             f"target; ptxas from Triton's bundle). Took {h['seconds']['total']:.0f} s on {h['cpus']} CPU cores "
             f"(record {h['seconds']['record']:.0f} s, compile {h['seconds']['compile']:.0f} s).", "",
             f"Recorded: {h['n_launch_calls']} launches, {len(report['launches'])} distinct, from "
             f"{len(report['runs'])} runs (models {', '.join(h['models'])}; modes {', '.join(h['modes'])}; "
             f"precisions {', '.join(h['precisions'])}; sizes "
             f"{', '.join(f'{s}x{s} batch {b}' for s, b in h['sizes'])})."
             f" Compiled {len(report['compiles'])} distinct (kernel, specialisation, config, arch): "
             f"{len(report['errors'])} errors, {len(report['overflows'])} shared-memory overflows.", "",
             "Occupancy: resident warps per SM from registers (per thread rounded up to 8, 65536 per SM), shared "
             "memory (+1 KiB per block; 228 KiB per SM on sm_90, 164 KiB on sm_80), 64 warps, 32 blocks.", "",
             "## Per kernel and config", "",
             "| kernel | arch | config | specialisations | registers | spill B (st/ld) | smem B | warps/SM | "
             "limited by | tl.dot as |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for t in kernel_config_table(report):
        lines.append(f"| {_short_kernel(t['kernel'])} | sm_{t['arch']} | {t['config']} | {t['variants']} | "
                     f"{_rng(t['regs'])} | {t['spill'][0]}/{t['spill'][1]} | {t['shared']} | {_rng(t['warps'])} | "
                     f"{', '.join(t['limiter'])} | {t['mma']} |")
    lines += ["", "## Conv launches: warps/SM of the best config autotuning can pick", "",
              "Launches grouped by kernel, tiling constexprs, prologue/epilogue flags and dtypes (shapes differ "
              "within a group); per group the lowest and highest of the launches' best warps/SM.", "",
              "| kernel | launch group | launches | sm_90 warps/SM | sm_80 warps/SM | e.g. seen in |",
              "| --- | --- | ---: | ---: | ---: | --- |"]
    for g in conv_launch_groups(report):
        lines.append(f"| {_short_kernel(g['kernel'])} | {g['label']} | {g['launches']} | {_rng(g['sm90'])} | "
                     f"{_rng(g['sm80'])} | {g['context']} |")
    lines += ["", f"## Target misses ({len(report['misses'])})", ""]
    lines += [f"- {m['target']}: `{_short_kernel(m['kernel'])}` {m['what']}: {m['value']}" for m in report["misses"]]
    if report["fallbacks"]:
        lines += ["", "## Ops the Triton backend did not take (they run as they would on a GPU)", ""]
        lines += [f"- {k}: {v} calls" for k, v in sorted(report["fallbacks"].items())]
    if report["errors"] or report["overflows"]:
        lines += ["", "## Failures", ""]
        lines += [f"- compile error: `{_short_kernel(r['kernel'])}` sm_{r['arch']} {r['config']}: "
                  f"{r['error'].splitlines()[0]}" for r in report["errors"]]
        lines += [f"- smem overflow: `{_short_kernel(r['kernel'])}` sm_{r['arch']} {r['config']}: {r['shared']} B > "
                  f"{SMEM_BLOCK_LIMIT[r['arch']]} B" for r in report["overflows"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# the command


def _git_state() -> str:
    """The commit the kernels were compiled from, with '+dirty' when resfast/backends/triton has uncommitted changes."""
    root = ROOT
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "resfast/backends/triton"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def plan(models, modes, precisions, sizes) -> list[dict]:
    return [{"model": m, "mode": mode, "precision": p, "size": s, "batch": b}
            for m in models for mode in modes for p in precisions for s, b in sizes]


def _size(s: str):
    size, _, batch = s.partition(":")
    return int(size), int(batch or 1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m resfast.backends.triton.aot", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--precisions", nargs="+", default=list(DEFAULT_PRECISIONS), choices=PRECISIONS)
    p.add_argument("--sizes", nargs="+", type=_size, default=list(DEFAULT_SIZES),
                   help="SIZE:BATCH, e.g. 64:2 224:256")
    p.add_argument("--archs", nargs="+", type=int, default=list(ARCHS), choices=ARCHS)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (recording and compiling)")
    p.add_argument("--execute", action="store_true", help="run the kernels while recording (slow; small sizes)")
    p.add_argument("--fp32-precision", default="tf32", choices=("tf32", "ieee"),
                   help="INPUT_PRECISION of float32 convs on the GPU (tf32: cuDNN's default switch)")
    p.add_argument("--launches", type=Path, help="compile the launches of this JSON (a previous --save-launches)")
    p.add_argument("--save-launches", type=Path, help="write the recorded launches to this JSON")
    p.add_argument("--record-only", action="store_true", help="stop after recording (with --save-launches)")
    p.add_argument("--extra-launches", type=Path, help="JSON list of extra launches to compile (tests)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report directory (aot.json, aot.md)")
    p.add_argument("--no-readme", action="store_true", help="do not regenerate benchmarks/README.md")
    p.add_argument("--strict", action="store_true", help="fail when a target is missed")
    p.add_argument("--_record", nargs=2, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args._record:
        return _record_main(*args._record)
    if os.environ.get("TRITON_INTERPRET") == "1":  # compiling needs the real JITFunctions: rerun without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "resfast.backends.triton.aot", *(argv if argv is not None
                                                                              else sys.argv[1:])], env=env)
    import platform

    import torch
    import triton

    t_start = time.perf_counter()
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m resfast.backends.triton.aot" + "".join(f" {a}" for a in given)
    if args.launches:
        recorded = json.loads(args.launches.read_text())
    else:
        recorded = record(plan(args.models, args.modes, args.precisions, args.sizes), args.jobs, args.execute,
                          args.fp32_precision)
        recorded["plan"] = {"models": args.models, "modes": args.modes, "precisions": args.precisions,
                            "sizes": args.sizes}
        recorded["seconds"] = round(time.perf_counter() - t_start, 1)
        recorded["command"] = command.replace(" --record-only", "").split(" --save-launches")[0]
    if args.save_launches:
        args.save_launches.write_text(json.dumps(recorded))
        print(f"launches: {args.save_launches}")
    if args.record_only:
        return 0
    launches = list(recorded["launches"])
    if args.extra_launches:
        launches += json.loads(args.extra_launches.read_text())
    t_rec = time.perf_counter()
    backends = _binders(args.archs)
    jobs_by_launch = [expand(launch, backends) for launch in launches]
    n_jobs = len({j["key"] for jobs in jobs_by_launch for j in jobs})
    print(f"compiling {n_jobs} distinct (kernel, specialisation, config, arch) over {args.jobs} processes")
    results = compile_all([j for jobs in jobs_by_launch for j in jobs], args.jobs)
    t_comp = time.perf_counter()
    report = build_report(recorded, launches, jobs_by_launch, results, args.archs)
    header = {
        # the recording's command when the launches come from a saved recording (--save-launches)
        "command": recorded.get("command") or command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
        "versions": {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "git": _git_state(),
        "archs": args.archs, **recorded.get("plan", {"models": args.models, "modes": args.modes,
                                                     "precisions": args.precisions, "sizes": args.sizes}),
        "n_launch_calls": sum(e.get("count", 1) for e in launches),
        # with --launches, the recording's own time (it ran in an earlier command)
        "seconds": {"record": recorded.get("seconds", round(t_rec - t_start, 1)) if args.launches
                    else round(t_rec - t_start, 1), "compile": round(t_comp - t_rec, 1),
                    "total": round(time.perf_counter() - t_start, 1) + (recorded.get("seconds", 0)
                                                                        if args.launches else 0)},
    }
    report = {"header": header, **report}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(report, args.out / "aot.json")
    (args.out / "aot.md").write_text(markdown(report))
    print(f"report: {args.out / 'aot.json'} and {args.out / 'aot.md'}")
    if not args.no_readme and args.out.resolve() == DEFAULT_OUT.resolve():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import update_tables

        update_tables.main([])
    for m in report["misses"]:
        print(f"MISS {m['target']}: {_short_kernel(m['kernel'])} {m['what']}: {m['value']}")
    for r in report["errors"]:
        print(f"COMPILE ERROR {_short_kernel(r['kernel'])} sm_{r['arch']} {r['config']}:\n{r['error']}")
    for r in report["overflows"]:
        print(f"SMEM OVERFLOW {_short_kernel(r['kernel'])} sm_{r['arch']} {r['config']}: {r['shared']} B > "
              f"{SMEM_BLOCK_LIMIT[r['arch']]} B")
    print(f"{len(report['compiles'])} compiles, {len(report['errors'])} errors, {len(report['overflows'])} smem "
          f"overflows, {len(report['misses'])} target misses; {report['header']['seconds']['total']:.0f} s")
    if report["errors"] or report["overflows"]:
        return 1
    if args.strict and report["misses"]:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
