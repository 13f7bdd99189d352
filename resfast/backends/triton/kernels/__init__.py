"""The Triton kernels and their launchers (imports triton)."""
