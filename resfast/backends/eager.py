"""The `eager` backend: plain PyTorch, the ops' reference implementations (resfast/ops/reference.py). Always
available; it defines the semantics every other backend is tested against, and is the only one that merges
synchronised BatchNorm statistics across processes."""

from __future__ import annotations

from ..ops.dispatch import BLOCK_OPS, REFERENCES, Backend


class EagerBackend(Backend):
    name = "eager"
    runs_synced_bn = True
    kernels = REFERENCES

    def _static_reasons(self, op):
        return [self.no_block_op(op) + " (the modules' reference computation)"] if op in BLOCK_OPS else []
