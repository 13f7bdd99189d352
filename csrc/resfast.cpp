// Every resfast op schema, in one TORCH_LIBRARY block. Kernels register per device in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(resfast, m) {
  // y = relu?(x * scale[c] + shift[c] + residual): BatchNorm applied with folded per-channel scale/shift,
  // the optional residual add and ReLU, in one pass. NCHW or channels_last; the output keeps x's layout.
  m.def("bn_act(Tensor x, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
  // Eval-mode fast path, BatchNorm already folded into weight/bias (the block caches the folded weights;
  // on CPU `weight` may be prepacked for oneDNN): y = relu?(conv2d(x, weight) + bias + residual).
  // channels_last output.
  m.def(
      "conv_bias_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, Tensor? residual, bool relu) -> Tensor");
  // The Res2Net 3x3 chain with folded weights: conv k reads split conv_splits[k] (plus, in a 'normal' block,
  // the previous conv's output), y_k = relu(conv3x3(.) + bias_k) is written into its channel slice of one
  // channels_last output; split `passthrough` (-1: none) is copied ('normal') or avg-pooled ('stage').
  m.def(
      "res2net_chain_folded(Tensor x, Tensor[] weights, Tensor[] biases, int width, int stride, int dilation, "
      "int groups, str block_type, int[] conv_splits, int passthrough) -> Tensor");
}
