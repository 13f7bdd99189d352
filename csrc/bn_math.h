// Per-element and per-channel arithmetic of the BatchNorm kernels, shared by the CPU and CUDA implementations
// (host and device), so both compute the same formulas and the CPU tests cover the CUDA kernels' math.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RESFAST_HD __host__ __device__ __forceinline__
#else
#define RESFAST_HD inline
#endif

namespace resfast {

RESFAST_HD float hd_sqrt(float v) { return ::sqrtf(v); }
RESFAST_HD double hd_sqrt(double v) { return ::sqrt(v); }

// Count, mean and biased variance of a set of values. Two sets merge as weighted averages (Chan et al.'s merge
// written with weights w = n / (n_a + n_b)): var = w_a var_a + w_b var_b + (d sqrt(w_a w_b))^2, d the difference
// of the means. Every intermediate is bounded by the data's own magnitude and spread, so fp32 statistics of
// |x| ~ 1e30 do not overflow as a sum of squares (or a sum of M squared deviations) would.
template <typename acc_t>
struct Moments {
  int64_t n;
  acc_t mean;
  acc_t var;
};

template <typename acc_t>
RESFAST_HD Moments<acc_t> merge_moments(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  const acc_t wb = static_cast<acc_t>(b.n) / static_cast<acc_t>(n);
  const acc_t wa = static_cast<acc_t>(a.n) / static_cast<acc_t>(n);
  const acc_t d = b.mean - a.mean;
  const acc_t s = d * hd_sqrt(wa * wb);
  return {n, a.mean + d * wb, wa * a.var + wb * b.var + s * s};
}

// One more value into a running Moments (a merge with {1, v, 0}).
template <typename acc_t>
RESFAST_HD void add_value(Moments<acc_t>& m, acc_t v) {
  m = merge_moments(m, Moments<acc_t>{1, v, acc_t(0)});
}

// mean, invstd = 1 / sqrt(var + eps) and the unbiased variance of merged Moments.
template <typename acc_t>
RESFAST_HD void finalize_moments(const Moments<acc_t>& m, acc_t eps, acc_t* mean, acc_t* invstd, acc_t* var_unbiased) {
  *mean = m.mean;
  *invstd = acc_t(1) / hd_sqrt(m.var + eps);
  *var_unbiased = m.n > 1 ? m.var * (static_cast<acc_t>(m.n) / static_cast<acc_t>(m.n - 1)) : m.var;
}

// nn.BatchNorm2d's running update: (1 - factor) * running + factor * batch.
template <typename acc_t>
RESFAST_HD acc_t running_blend(acc_t running, acc_t batch, acc_t factor) {
  return (acc_t(1) - factor) * running + factor * batch;
}

// The forward value before rounding: relu?((z - mean) * scale + shift + residual).
template <typename acc_t>
RESFAST_HD acc_t bn_forward_value(acc_t z, acc_t mean, acc_t scale, acc_t shift, acc_t residual, bool relu) {
  acc_t v = (z - mean) * scale + shift + residual;
  return relu && v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN, as torch.relu
}

// The incoming gradient through the ReLU: (dy + dy2), zero where the saved output y <= 0 (threshold_backward).
template <typename acc_t>
RESFAST_HD acc_t masked_grad(acc_t dy, acc_t dy2, bool has_mask, acc_t y) {
  const acc_t g = dy + dy2;
  return has_mask && y <= acc_t(0) ? acc_t(0) : g;
}

// The input gradient of BatchNorm: scale * (g - mean(g) - xhat * mean(g * xhat)) with batch statistics (the
// statistics depend on the input), scale * g with given ones.
template <typename acc_t>
RESFAST_HD acc_t bn_input_grad(acc_t g, acc_t xhat, acc_t mean_g, acc_t mean_gxhat, acc_t scale, bool batch_stats) {
  return batch_stats ? scale * (g - mean_g - xhat * mean_gxhat) : scale * g;
}

}  // namespace resfast
