"""resfast's Triton backend: kernels and launchers (see conv.py). Imported lazily by the dispatch layer."""
