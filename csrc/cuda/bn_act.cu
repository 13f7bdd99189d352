// CUDA kernel of resfast::bn_act. Grid-stride loop with 64-bit indices (tensors may pass 2^31 elements);
// fp32 math for half/bfloat16. Vectorised loads come with the cuda backend issue.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../resfast.h"

namespace resfast {
namespace {

template <typename scalar_t, bool kChannelsLast>
__global__ void bn_act_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ scale,
                              const scalar_t* __restrict__ shift, const scalar_t* __restrict__ residual,
                              scalar_t* __restrict__ y, int64_t total, int64_t C, int64_t HW, bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t c = kChannelsLast ? i % C : (i / HW) % C;
    opmath_t v = static_cast<opmath_t>(x[i]) * static_cast<opmath_t>(scale[c]) + static_cast<opmath_t>(shift[c]);
    if (residual != nullptr) v += static_cast<opmath_t>(residual[i]);
    if (relu) v = v > opmath_t(0) ? v : opmath_t(0);
    y[i] = static_cast<scalar_t>(v);
  }
}

}  // namespace

at::Tensor bn_act_cuda(const at::Tensor& x_, const at::Tensor& scale_, const at::Tensor& shift_,
                       const std::optional<at::Tensor>& residual_, bool relu) {
  const auto fmt = check_bn_act(x_, scale_, shift_, residual_);
  RESFAST_CHECK(x_.is_cuda(), "bn_act", "the CUDA kernel got a tensor on ", x_.device());
  const c10::cuda::CUDAGuard guard(x_.device());
  const BnActOperands o = bn_act_operands(fmt, x_, scale_, shift_, residual_);
  const at::Tensor &x = o.x, &scale = o.scale, &shift = o.shift, &residual = o.residual, &y = o.y;
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3), total = x.numel();
  if (total == 0) return y;
  const int threads = 256;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, max_blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_cuda", [&] {
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    if (fmt == at::MemoryFormat::ChannelsLast) {
      bn_act_kernel<scalar_t, true><<<blocks, threads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(), shift.const_data_ptr<scalar_t>(), rp,
          y.mutable_data_ptr<scalar_t>(), total, C, HW, relu);
    } else {
      bn_act_kernel<scalar_t, false><<<blocks, threads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(), shift.const_data_ptr<scalar_t>(), rp,
          y.mutable_data_ptr<scalar_t>(), total, C, HW, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

TORCH_LIBRARY_IMPL(resfast, CUDA, m) { m.impl("bn_act", &bn_act_cuda); }

}  // namespace resfast
