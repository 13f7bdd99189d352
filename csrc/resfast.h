// Shared declarations and argument checks for resfast's C++/CUDA ops.
#pragma once

#include <ATen/ATen.h>
#include <optional>

// Checks name the op and the argument, so a bad call is a clear Python RuntimeError, never a crash.
#define RESFAST_CHECK(cond, op, ...) TORCH_CHECK(cond, "resfast::", op, ": ", __VA_ARGS__)

namespace resfast {

// Validates bn_act's arguments (device-independent) and returns the memory format the kernels will use.
inline at::MemoryFormat check_bn_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                     const std::optional<at::Tensor>& residual) {
  const char* op = "bn_act";
  RESFAST_CHECK(x.dim() == 4, op, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  RESFAST_CHECK(at::isFloatingType(x.scalar_type()), op, "x must be floating point, got ", x.scalar_type());
  const int64_t C = x.size(1);
  RESFAST_CHECK(scale.dim() == 1 && scale.size(0) == C, op, "scale must have shape (", C, "), got ", scale.sizes());
  RESFAST_CHECK(shift.dim() == 1 && shift.size(0) == C, op, "shift must have shape (", C, "), got ", shift.sizes());
  RESFAST_CHECK(scale.scalar_type() == x.scalar_type() && shift.scalar_type() == x.scalar_type(), op,
                "scale and shift must have x's dtype ", x.scalar_type(), ", got ", scale.scalar_type(), " and ",
                shift.scalar_type());
  RESFAST_CHECK(scale.device() == x.device() && shift.device() == x.device(), op,
                "scale and shift must be on x's device ", x.device());
  if (residual.has_value()) {
    RESFAST_CHECK(residual->sizes() == x.sizes(), op, "residual must have x's shape ", x.sizes(), ", got ",
                  residual->sizes());
    RESFAST_CHECK(residual->scalar_type() == x.scalar_type(), op, "residual must have x's dtype");
    RESFAST_CHECK(residual->device() == x.device(), op, "residual must be on x's device");
  }
  // The same rule as the Python side and the fake kernel: channels_last in -> channels_last out, else NCHW.
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// bn_act's operands in the kernels' memory format `fmt` (from check_bn_act) and its output, shared by the CPU and
// CUDA kernels (call it on the input's device).
struct BnActOperands {
  at::Tensor x, scale, shift, residual, y;  // residual undefined when absent
};

inline BnActOperands bn_act_operands(at::MemoryFormat fmt, const at::Tensor& x, const at::Tensor& scale,
                                     const at::Tensor& shift, const std::optional<at::Tensor>& residual) {
  BnActOperands o;
  o.x = x.contiguous(fmt);
  o.scale = scale.contiguous();
  o.shift = shift.contiguous();
  if (residual.has_value()) o.residual = residual->contiguous(fmt);
  o.y = at::empty_like(o.x, o.x.options().memory_format(fmt));
  return o;
}

}  // namespace resfast
