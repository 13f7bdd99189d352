// CPU kernel of resfast::bn_act: one pass over x, per-channel affine, optional residual, optional ReLU.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../resfast.h"

namespace resfast {

at::Tensor bn_act_cpu(const at::Tensor& x_, const at::Tensor& scale_, const at::Tensor& shift_,
                      const std::optional<at::Tensor>& residual_, bool relu) {
  const auto fmt = check_bn_act(x_, scale_, shift_, residual_);
  RESFAST_CHECK(x_.device().is_cpu(), "bn_act", "the CPU kernel got a tensor on ", x_.device());
  const BnActOperands o = bn_act_operands(fmt, x_, scale_, shift_, residual_);
  const at::Tensor &x = o.x, &scale = o.scale, &shift = o.shift, &residual = o.residual, &y = o.y;
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3), total = x.numel();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  if (total == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    const scalar_t* bp = shift.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    // One contiguous run at a time (a pixel's C channels in channels_last, an (n, c) plane in NCHW), so the
    // channel is known per run, not computed with a division per element, and the inner loop vectorizes.
    auto run = [&](int64_t off, int64_t len, int64_t c0, int64_t c_step) {
      for (int64_t j = 0; j < len; ++j) {
        const int64_t c = c0 + j * c_step;
        opmath_t v = static_cast<opmath_t>(xp[off + j]) * static_cast<opmath_t>(sp[c]) +
                     static_cast<opmath_t>(bp[c]);
        if (rp) v += static_cast<opmath_t>(rp[off + j]);
        if (relu) v = v > opmath_t(0) ? v : opmath_t(0);
        yp[off + j] = static_cast<scalar_t>(v);
      }
    };
    const int64_t len = cl ? C : HW;
    const int64_t runs = total / len;
    at::parallel_for(0, runs, std::max<int64_t>(1, 4096 / len), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (cl) {
          run(r * C, C, 0, 1);
        } else {
          run(r * HW, HW, r % C, 0);
        }
      }
    });
  });
  return y;
}

TORCH_LIBRARY_IMPL(resfast, CPU, m) { m.impl("bn_act", &bn_act_cpu); }

}  // namespace resfast
