"""Benchmark machinery shared by ``python -m resfast.bench`` and ``benchmarks/bench_{ops,models}.py``:
environment metadata, timing (do_bench on GPU, torch.utils.benchmark on CPU), result files (JSON + CSV + PNG),
and the regression comparison."""
