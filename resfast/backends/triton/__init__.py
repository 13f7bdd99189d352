"""The Triton backend: kernels/ (the @triton.jit kernels and their launchers), library.py (the eval ops),
training.py (the per-op training ops), blocks.py (the whole-block training ops), backend.py (what the backend
supports, and the ops' implementations from prepared arguments). Importing this package does not import triton."""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
