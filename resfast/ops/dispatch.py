"""Backend choice: which implementation runs an op, and why the others cannot.

Backends, in `auto` preference order: `cuda` (the C++/CUDA extension on CUDA tensors), `triton`, `cpu` (the
C++ extension's CPU kernels: eval-mode fast path over oneDNN), `eager` (plain PyTorch, always available,
defines the semantics). Each answers ``not_supported_reasons(op, args) -> list[str]``.
`auto` picks the first backend with no reasons; a backend named explicitly (``RESFAST_BACKEND``,
:func:`set_backend`, ``with backend(...)``) that cannot run raises :class:`BackendUnavailableError` listing
every reason. Facts that do not depend on the inputs (is triton installed, was _C built with CUDA) are
computed once, outside traced code, so torch.compile sees a constant choice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from typing import Callable, Iterator

import torch

from .. import _ext
from .checks import synced_bn_reasons
from .reference import EAGER_IMPLS

OPS = ("res2net_chain", "conv_bn_relu", "bn_relu_conv", "scale_add_relu")
BACKENDS = ("cuda", "triton", "cpu", "eager")
CHOICES = ("auto",) + BACKENDS


VERIFIED_FILE = os.path.join(os.path.dirname(__file__), "gpu_verified.json")


def read_verified_ops(backend: str, path: str = VERIFIED_FILE) -> tuple[str, ...]:
    """The ops of `backend` that passed scripts/gpu_check.sh on a GPU (its correctness, smoke and whole-model
    steps), as recorded in resfast/ops/gpu_verified.json by benchmarks/import_gpu_results.py; empty when the file is
    absent or names none. Read once at import."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return ()
    except (OSError, ValueError) as e:
        warnings.warn(f"resfast: cannot read {path} ({e}); no backend counts as verified on a GPU", RuntimeWarning,
                      stacklevel=2)
        return ()
    entry = data.get(backend) if isinstance(data, dict) else None
    ops = entry.get("ops", []) if isinstance(entry, dict) else []
    return tuple(op for op in ops if op in OPS)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given op on the given inputs."""


class Backend:
    name = ""
    # synchronised BatchNorm (a process group) in training: only the eager backend merges statistics across ranks
    runs_synced_bn = False
    # op name -> callable(args) -> Tensor. Kernels register here as the backends grow.
    kernels: dict[str, Callable] = {}

    def _static_reasons(self, op: str) -> list[str]:
        """Reasons that hold whatever the inputs are."""
        return []

    def _input_reasons(self, op: str, args) -> list[str]:
        return []

    def input_reasons(self, op: str, args) -> list[str]:
        """Reasons from the inputs: the backend's own, after the ones every backend but eager shares."""
        shared = [] if self.runs_synced_bn else synced_bn_reasons(op, args)
        return shared + self._input_reasons(op, args)

    def static_reasons(self, op: str) -> tuple[str, ...]:
        return _static_reasons(self.name, op)

    def auto_reasons(self, op: str) -> list[str]:
        """Extra reasons `auto` does not pick this backend (an explicit request still may)."""
        return []

    def auto_input_reasons(self, op: str, args) -> list[str]:
        """Extra reasons `auto` does not pick this backend for these inputs (an explicit request still may)."""
        return []

    def environment_reasons(self) -> list[str]:
        """Reasons from this machine that rule out the usual inputs (for reports; the inputs decide per call)."""
        return []

    def not_supported_reasons(self, op: str, args=None) -> list[str]:
        """Why this backend cannot run `op` on `args` (prepared op arguments); empty when it can."""
        if op not in OPS:
            raise ValueError(f"unknown resfast op {op!r}; ops are {OPS}")
        reasons = list(self.static_reasons(op))
        if args is not None:  # every reason, so an explicit request explains everything that stands in the way
            reasons += self.input_reasons(op, args)
        return reasons

    def run(self, op: str, args):
        return self.kernels[op](args)


class EagerBackend(Backend):
    name = "eager"
    runs_synced_bn = True
    kernels = EAGER_IMPLS


class TritonBackend(Backend):
    name = "triton"
    # ops with a Triton implementation (resfast/triton/ops.py, imported on first use, not at `import resfast`)
    implemented = ("conv_bn_relu", "bn_relu_conv", "res2net_chain", "scale_add_relu")
    # Kernels tested only under TRITON_INTERPRET=1 so far: `auto` does not pick an op until it has been verified on
    # a GPU (verified_ops: resfast/ops/gpu_verified.json); an explicit `resfast.backend("triton")` does.
    verified_ops = read_verified_ops("triton")
    verified_on_gpu = set(implemented) <= set(verified_ops)

    def _static_reasons(self, op):
        reasons = []
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed (pip install triton)")
        if op not in self.implemented:
            reasons.append(f"no Triton kernel is implemented for {op} yet")
        return reasons

    def environment_reasons(self):
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return ["no CUDA device is visible and TRITON_INTERPRET=1 is not set (the interpreter runs Triton on "
                    "CPU tensors)"]
        return []

    def auto_reasons(self, op):
        return [] if self.verified_on_gpu or op in self.verified_ops else [
            "the Triton kernels are not verified on a GPU yet: auto does not use them; select backend 'triton'"]

    def _input_reasons(self, op, args):
        dev = args.x.device.type
        if dev == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return ["the input is on the CPU; Triton runs on CUDA devices, or on the CPU with TRITON_INTERPRET=1"]
        if dev not in ("cpu", "cuda"):
            return [f"the input is on {dev}; Triton runs on CUDA devices"]
        if op not in self.implemented:
            return []
        from ..triton.ops import input_reasons

        return input_reasons(op, args)

    def run(self, op, args):
        from ..triton.ops import KERNELS

        return KERNELS[op](args)


class CudaBackend(Backend):
    """resfast._C's ops on CUDA tensors (glue in resfast/ops/cpp.py): cuDNN convolutions through ATen and the CUDA
    kernels of csrc/cuda/ between them; training through the C++ training ops, eval through the folded ops."""

    name = "cuda"
    implemented = ("conv_bn_relu", "bn_relu_conv", "res2net_chain")
    # Compiled in CI, never run there: `auto` does not pick an op of the cuda backend until it has been verified on
    # a GPU (verified_ops: resfast/ops/gpu_verified.json); an explicit `resfast.backend("cuda")` does.
    verified_ops = read_verified_ops("cuda")
    verified_on_gpu = set(implemented) <= set(verified_ops)

    def _static_reasons(self, op):
        reasons = []
        if _ext.C is None:
            reasons.append(f"the extension resfast._C is not loaded ({_ext.C_ERROR})")
        elif not _ext.build_info().get("with_cuda", False):
            why = _ext.build_info().get("cuda_skip_reason", "")
            reasons.append(f"resfast._C was built without CUDA sources ({why})")
        else:
            from .cpp import missing_ops

            if missing_ops():
                reasons.append(f"resfast._C lacks the ops {missing_ops()} (an older build: rebuild with `make setup`)")
        if torch.version.cuda is None:
            reasons.append("this torch is a CPU-only build")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA device is visible (torch.cuda.is_available() is False)")
        if op not in self.implemented:
            reasons.append(f"no fused CUDA kernel is implemented for {op} (ATen's elementwise ops are as good)")
        return reasons

    def auto_reasons(self, op):
        return [] if self.verified_on_gpu or op in self.verified_ops else [
            "the CUDA kernels are not verified on a GPU yet: auto does not use them; select backend 'cuda'"]

    def _input_reasons(self, op, args):
        if args.x.device.type != "cuda":
            return [f"the input is on {args.x.device.type}; the cuda backend needs CUDA tensors"]
        from .cpp import cuda_input_reasons

        return cuda_input_reasons(op, args)

    def run(self, op, args):
        from .cpp import KERNELS

        return KERNELS[op](args)


class CpuBackend(Backend):
    """resfast._C's CPU kernels (csrc/cpu/, glue in resfast/ops/cpp.py): inference for now."""

    name = "cpu"

    def _static_reasons(self, op):
        if _ext.C is None:
            return [f"the extension resfast._C is not loaded ({_ext.C_ERROR})"]
        from .cpp import missing_ops

        missing = missing_ops()
        if missing:
            return [f"resfast._C lacks the ops {missing} (an older build: rebuild with `make setup`)"]
        from .cpp import KERNELS

        if op not in KERNELS:
            return [f"no cpu kernel is implemented for {op} (ATen's elementwise ops on eager are as good)"]
        return []

    def _input_reasons(self, op, args):
        from .cpp import input_reasons

        return input_reasons(op, args)

    def auto_input_reasons(self, op, args):
        from .cpp import auto_input_reasons

        return auto_input_reasons(op, args)

    def run(self, op, args):
        from .cpp import KERNELS

        return KERNELS[op](args)


_BACKENDS: dict[str, Backend] = {
    b.name: b for b in (CudaBackend(), TritonBackend(), CpuBackend(), EagerBackend())
}
_STATIC_CACHE: dict[tuple[str, str], tuple[str, ...]] = {}


@torch.compiler.assume_constant_result
def _static_reasons(name: str, op: str) -> tuple[str, ...]:
    key = (name, op)
    if key not in _STATIC_CACHE:
        _STATIC_CACHE[key] = tuple(_BACKENDS[name]._static_reasons(op))
    return _STATIC_CACHE[key]


def get(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown resfast backend {name!r}; choose one of {CHOICES}")
    return _BACKENDS[name]


class _State:
    name = "auto"


_state = _State()


def _initial_backend() -> str:
    env = os.environ.get("RESFAST_BACKEND", "auto").strip().lower() or "auto"
    if env not in CHOICES:
        warnings.warn(f"RESFAST_BACKEND={env!r} is not one of {CHOICES}; using 'auto'", RuntimeWarning, stacklevel=2)
        return "auto"
    return env


_state.name = _initial_backend()


def get_backend() -> str:
    """The backend name in force: 'auto', 'cuda', 'triton' or 'eager'."""
    return _state.name


def set_backend(name: str) -> None:
    """Use backend `name` ('auto', 'cuda', 'triton' or 'eager') for every op from now on."""
    if name not in CHOICES:
        raise ValueError(f"unknown resfast backend {name!r}; choose one of {CHOICES}")
    _state.name = name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with resfast.backend("eager"): ...`` runs the block's ops on `name`, then restores the previous choice."""
    previous = _state.name
    set_backend(name)
    try:
        yield
    finally:
        _state.name = previous


def select(op: str, args) -> Backend:
    """The backend that will run `op` on `args`; raises BackendUnavailableError for an explicit backend that can't."""
    name = _state.name
    if name == "auto":
        for b in _BACKENDS.values():
            # cheap first: backends ruled out whatever the inputs are never look at the inputs
            if (not b.static_reasons(op) and not b.auto_reasons(op) and not b.input_reasons(op, args)
                    and not b.auto_input_reasons(op, args)):
                return b
        raise AssertionError("unreachable: the eager backend supports every op")
    b = _BACKENDS[name]
    reasons = b.not_supported_reasons(op, args)
    if reasons:
        raise BackendUnavailableError(
            f"resfast backend {name!r} was requested but cannot run {op} here:\n  - " + "\n  - ".join(reasons)
        )
    return b


def run(op: str, args):
    return select(op, args).run(op, args)


def backend_for_input(x: torch.Tensor, op: str = "conv_bn_relu") -> str:
    """The backend the current choice gives `op` for inputs like `x` (its device and dtype), e.g. for reports."""
    from ._args import prepare_conv_bn_relu

    C = x.shape[1] if x.dim() == 4 else 1
    probe = torch.empty((1, C, 2, 2), device=x.device, dtype=x.dtype)
    w = torch.empty((C, C, 1, 1), device=x.device, dtype=x.dtype)
    stats = torch.zeros(C, device=x.device, dtype=x.dtype)
    from .batchnorm import BatchNormParams

    bn = BatchNormParams(running_mean=stats, running_var=stats + 1)
    return select(op, prepare_conv_bn_relu(probe, w, bn, None, 1, 0, 1, 1, False, True, None)).name


def availability() -> dict[str, dict[str, list[str]]]:
    """{backend: {op: reasons}} on this machine, whatever the inputs: what `python -m resfast.info` prints.
    Reasons that only keep `auto` away start with "auto: "."""
    return {
        name: {op: list(b.static_reasons(op)) + b.environment_reasons() + [f"auto: {r}" for r in b.auto_reasons(op)]
               for op in OPS}
        for name, b in _BACKENDS.items()
    }
