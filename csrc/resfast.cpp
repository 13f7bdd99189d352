// Every resfast op schema, in one TORCH_LIBRARY block. Kernels register per device in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(resfast, m) {
  // y = relu?(x * scale[c] + shift[c] + residual): BatchNorm applied with folded per-channel scale/shift,
  // the optional residual add and ReLU, in one pass. NCHW or channels_last; the output keeps x's layout.
  m.def("bn_act(Tensor x, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
}
