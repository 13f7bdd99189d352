// The device kernels behind resfast's training ops (csrc/training.cpp): BatchNorm statistics, the fused
// elementwise forward (BN-apply + residual + ReLU, written into any slice, optionally also "+ the next split"),
// the fused backward (reductions, then dz and the residual's gradient) and the running-statistics update.
// One table per device: cpu/bn_train.cpp and cuda/bn_train.cu implement the same contract, which this file states.
//
// Activations are 4-D (N, C, H, W) tensors seen as (N, C, P = H * W) through ActView. Within one call every
// activation is "channels inner" (channel stride 1: channels_last, or a channel slice of it; each pixel's C values
// are contiguous) or every one is "pixels inner" (pixel stride 1: NCHW, or a channel slice of it; each (n, c) plane
// is contiguous); the strides may differ between the tensors of a call (slices of larger outputs). Per-channel
// tensors (mean, invstd, scale, shift, sums) are contiguous (C,) in the accumulation dtype: double for double
// activations, float otherwise. Activations are double, float, half or bfloat16; arithmetic is in the
// accumulation dtype; offsets are int64 (a tensor may pass 2^31 elements).
#pragma once

#include <ATen/ATen.h>

namespace resfast {

// (N, C, P) view of an (N, C, H, W) tensor: element (n, c, p = h * W + w) at n * sN + c * sC + p * sP.
// A size-1 dimension gets stride 1 (its index is always 0), so a view is never ambiguous about its kind.
struct ActView {
  int64_t N, C, P, sN, sC, sP;
};

// TORCH_CHECKs that H and W collapse into one pixel index (stride(2) == W * stride(3)), which every tensor the
// training ops make or receive satisfies (conv outputs, channel slices of them, .contiguous(format) copies).
ActView act_view(const at::Tensor& t);

enum class Inner { Channels, Pixels };

// The kind shared by the views (pixels inner preferred when both fit and the planes are longer than one pixel);
// TORCH_CHECK fails when the views are of different kinds.
Inner common_inner(std::initializer_list<ActView> views);

// The accumulation dtype of an activation dtype.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// In every kernel an undefined tensor is an absent optional argument.
struct BnKernels {
  // Batch statistics of z per channel over (N, H, W), merged safely (no sum of squares: |z| up to 1e30 in fp32
  // gives the exact mean and a zero variance for equal values). Writes mean, invstd = 1 / sqrt(var + eps) (var
  // biased) and var_unbiased = var * M / (M - 1) (M = N * H * W > 0; var itself when M == 1).
  void (*stats)(const at::Tensor& z, double eps, const at::Tensor& mean, const at::Tensor& invstd,
                const at::Tensor& var_unbiased);
  // out = relu?((z - mean) * scale + shift + residual), with mean, scale, shift optional (0, 1, 0) and residual
  // optional (z's dtype). `out` may be a channel slice of a larger tensor. With `next` defined:
  // next = out + addend, where out is first rounded to the dtype (as eager computes `relu(bn(z)) + x_next`):
  // the Res2Net chain's next conv input, made in the same pass.
  void (*apply)(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                const at::Tensor& residual, bool relu, const at::Tensor& out, const at::Tensor& addend,
                const at::Tensor& next);
  // g = (dy + dy2) masked by y > 0 (dy2 optional: 0; y optional: no ReLU, no mask); xhat = (z - mean) * invstd.
  // Writes sum_g[c] = sum of g and sum_gxhat[c] = sum of g * xhat over (N, H, W).
  void (*backward_reduce)(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                          const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_g,
                          const at::Tensor& sum_gxhat);
  // dz = scale * (g - sum_g / M - xhat * sum_gxhat / M) with batch statistics, dz = scale * g without (sum_g,
  // sum_gxhat, z and mean unused then); scale = gamma * invstd. dres = g when defined. dz and dres have z's dtype.
  void (*backward_apply)(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                         const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& scale,
                         const at::Tensor& sum_g, const at::Tensor& sum_gxhat, bool batch_stats,
                         const at::Tensor& dz, const at::Tensor& dres);
  // running = (1 - factor) * running + factor * batch, in place; running_* (C,) in their own dtype (contiguous),
  // mean / var_unbiased (C,) in the accumulation dtype.
  void (*running_update)(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                         const at::Tensor& var_unbiased, double factor);
};

const BnKernels& cpu_bn_kernels();
// The instruction set of the CPU kernels cpu_bn_kernels() returns now: "avx2" (AVX2 + FMA, where the CPU has them)
// or "baseline"; RESFAST_CPU_ISA=baseline in the environment forces the baseline copy.
const char* cpu_kernel_isa();
#ifdef RESFAST_WITH_CUDA
const BnKernels& cuda_bn_kernels();
#endif

// The table for a device; a clear error for a device resfast has no kernels for.
const BnKernels& bn_kernels(const at::Device& device);

}  // namespace resfast
