"""Backend choice: which implementation runs an op, and why the others cannot.

This module is the interface between the ops and their implementations: :class:`Backend` (what every backend
answers), the registry the backends of resfast/backends add themselves to at import (:func:`register`), the ops
(:func:`define`: each op module declares its name and eager reference) and the choice.

Backends, in `auto` preference order: `cuda` (the C++/CUDA extension on CUDA tensors), `triton`, `cpu` (the
C++ extension's CPU kernels: eval-mode fast path over oneDNN), `eager` (plain PyTorch, always available,
defines the semantics). Each answers ``not_supported_reasons(op, args) -> list[str]``.
`auto` picks the first backend with no reasons; a backend named explicitly (``RESFAST_BACKEND``,
:func:`set_backend`, ``with backend(...)``) that cannot run raises :class:`BackendUnavailableError` listing
every reason. Facts that do not depend on the inputs (is triton installed, was _C built with CUDA) are
computed once, outside traced code, so torch.compile sees a constant choice. The whole-block training ops
(BLOCK_OPS) go to the backend the block's first op gets, when it has them (:func:`select_block`).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Callable, Iterator, Optional

import torch

from .checks import synced_bn_reasons

# the ops, each with its eager reference implementation (define(), called by the module that defines the op: the eager
# backend runs these), and the whole-block training ops (resfast/ops/bottleneck.py: a backend without one leaves the
# block to its per-op path)
OPS: list[str] = []
REFERENCES: dict[str, Callable] = {}
BLOCK_OPS = ("res2net_bottleneck_train", "preact_block_train")


def define(op: str, reference: Callable) -> None:
    """Declare op `op`, whose eager implementation ``reference(prepared args) -> Tensor`` defines its semantics (the
    eager backend runs it; every other backend is tested against it)."""
    if op in REFERENCES or op in BLOCK_OPS:
        raise ValueError(f"resfast op {op!r} is defined twice")
    OPS.append(op)
    REFERENCES[op] = reference
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
    """One implementation of the ops. A backend sets ``name`` (one of BACKENDS), implements ``run(op, args)`` (or
    fills ``kernels``: op -> callable(prepared args) -> Tensor) and says why it cannot run an op:
    ``_static_reasons(op)`` (whatever the inputs: computed once) and ``_input_reasons(op, args)``; ``auto_reasons``
    and ``auto_input_reasons`` keep only `auto` away (e.g. kernels not verified on a GPU yet)."""

    name = ""
    # synchronised BatchNorm (a process group) in training: only the eager backend merges statistics across ranks
    runs_synced_bn = False
    # op name -> callable(prepared args) -> Tensor
    kernels: dict[str, Callable] = {}

    def _static_reasons(self, op: str) -> list[str]:
        """Reasons that hold whatever the inputs are."""
        return []

    def _input_reasons(self, op: str, args) -> list[str]:
        return []

    def input_reasons(self, op: str, args) -> list[str]:
        """Reasons from the inputs: the backend's own, after the ones every backend but eager shares."""
        shared = [] if self.runs_synced_bn else synced_bn_reasons(args)
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
        if op not in OPS and op not in BLOCK_OPS:
            raise ValueError(f"unknown resfast op {op!r}; ops are {(*OPS, *BLOCK_OPS)}")
        reasons = list(self.static_reasons(op))
        if args is not None:  # every reason, so an explicit request explains everything that stands in the way
            reasons += self.input_reasons(op, args)
        return reasons

    def run(self, op: str, args):
        return self.kernels[op](args)

    def no_block_op(self, op: str) -> str:
        """The reason of a backend without whole-block op `op` (BLOCK_OPS)."""
        return f"the {self.name} backend has no whole-block op {op}: the block runs per op"


_BACKENDS: dict[str, Backend] = {}


def register(b: Backend) -> Backend:
    """Add backend `b` to the registry (resfast/backends/ registers cuda, triton, cpu and eager at import); `auto`
    tries the backends in BACKENDS order."""
    if b.name not in BACKENDS:
        raise ValueError(f"unknown resfast backend {b.name!r}; backends are {BACKENDS}")
    _BACKENDS[b.name] = b
    order = {name: i for i, name in enumerate(BACKENDS)}
    for name in sorted(_BACKENDS, key=order.__getitem__):
        _BACKENDS[name] = _BACKENDS.pop(name)
    _STATIC_CACHE.clear()
    return b
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


def runs_reference(op: str, args) -> bool:
    """Whether `op` on `args` runs its eager reference (the eager backend: chosen, or the only one that can)."""
    return select(op, args).name == "eager"


def select_block(op: str, args, per_op: str, per_op_args) -> Optional[Backend]:
    """The backend to run whole-block op `op` (BLOCK_OPS) on `args`, or None: the block then runs per op. It is the
    backend the block's first op gets (`per_op` on `per_op_args`, chosen as :func:`select` does: an explicit backend
    that cannot run it raises the same error), when that backend runs `op` on these arguments; `auto` thus never
    runs a block on another backend than its ops."""
    if op not in BLOCK_OPS:
        raise ValueError(f"{op!r} is not a whole-block op; those are {BLOCK_OPS}")
    b = select(per_op, per_op_args)
    return None if b.not_supported_reasons(op, args) else b


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


def availability(ops=None) -> dict[str, dict[str, list[str]]]:
    """{backend: {op: reasons}} on this machine, whatever the inputs: what `python -m resfast.info` prints (``ops``:
    OPS, or BLOCK_OPS for the whole-block ops). Reasons that only keep `auto` away start with "auto: "."""
    ops = tuple(OPS) if ops is None else ops
    return {
        name: {op: list(b.static_reasons(op)) + b.environment_reasons() + [f"auto: {r}" for r in b.auto_reasons(op)]
               for op in ops}
        for name, b in _BACKENDS.items()
    }
