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

  // ---- training (and eval with gradients): csrc/training.cpp, one implementation over cuDNN/oneDNN convolutions
  // (through ATen) and the device kernels of csrc/{cpu,cuda}/bn_train.*. Statistics are float32 (float64 for float64
  // inputs); outputs keep x's layout (channels_last in -> channels_last out). mean_in/invstd_in given: BatchNorm with
  // those statistics (eval, FrozenBatchNorm2d), else batch statistics. Backward ops take `need` flags and return
  // empty tensors for gradients not asked for.
  // Per-channel batch statistics of x (N, C, H, W): (mean, invstd = 1/sqrt(var + eps), unbiased var).
  m.def("bn_stats(Tensor x, float eps) -> (Tensor, Tensor, Tensor)");
  // running = (1 - factor) * running + factor * batch, in place (nn.BatchNorm2d's update).
  m.def("bn_running_update(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, float factor) -> ()");
  // out = relu((z - mean) * gamma * invstd + beta), in place (out: z's shape and dtype, may be a channel slice):
  // the training forward's apply pass again, so backward rebuilds an activation bit for bit instead of saving it.
  m.def("bn_relu_apply_(Tensor(a!) out, Tensor z, Tensor mean, Tensor invstd, Tensor? gamma, Tensor? beta) -> ()");
  // y = relu?(bn(conv2d(x, weight, bias)) + residual) -> (y, z = the raw conv output, mean, invstd, unbiased var)
  m.def(
      "conv_bn_train(Tensor x, Tensor weight, Tensor? bias, Tensor? gamma, Tensor? beta, Tensor? residual, "
      "Tensor? mean_in, Tensor? invstd_in, int[] stride, int[] padding, int[] dilation, int groups, bool relu, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (dx, dweight, dbias, dgamma, dbeta, dresidual); y: the saved output when the forward had a ReLU (its mask)
  m.def(
      "conv_bn_train_backward(Tensor dy, Tensor x, Tensor weight, Tensor z, Tensor? y, Tensor? gamma, Tensor mean, "
      "Tensor invstd, int[] stride, int[] padding, int[] dilation, int groups, bool batch_stats, bool has_bias, "
      "bool[] need) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // y = conv2d(relu(bn(x)), weight, bias) + residual -> (y, mean, invstd, unbiased var)
  m.def(
      "bn_relu_conv_train(Tensor x, Tensor? gamma, Tensor? beta, Tensor? mean_in, Tensor? invstd_in, Tensor weight, "
      "Tensor? bias, Tensor? residual, int[] stride, int[] padding, int[] dilation, int groups, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // -> (dx, dgamma, dbeta, dweight, dbias); the activation is recomputed from x
  m.def(
      "bn_relu_conv_train_backward(Tensor dy, Tensor x, Tensor? gamma, Tensor? beta, Tensor mean, Tensor invstd, "
      "Tensor weight, int[] stride, int[] padding, int[] dilation, int groups, bool batch_stats, bool has_bias, "
      "bool[] need) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The Res2Net chain (resfast.ops.res2net_chain) -> (out, [raw conv outputs], mean, invstd, unbiased var), the
  // statistics stacked (convs, width). Each split's output is written into its slice of out in the pass that also
  // makes the next conv's input (no split copies, no cat).
  m.def(
      "res2net_chain_train(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] gammas, Tensor[] betas, "
      "Tensor? mean_in, Tensor? invstd_in, int scale, int stride, int dilation, int groups, str order, "
      "str block_type, float[] eps) -> (Tensor, Tensor[], Tensor, Tensor, Tensor)");
  // -> (dx, dweights, dbiases, dgammas, dbetas), lists in chain order
  m.def(
      "res2net_chain_train_backward(Tensor dout, Tensor x, Tensor out, Tensor[] zs, Tensor[] weights, "
      "Tensor[] gammas, Tensor mean, Tensor invstd, int scale, int stride, int dilation, int groups, str order, "
      "str block_type, bool batch_stats, bool has_bias, bool need_dx, bool need_dw, bool need_db, bool need_dgamma, "
      "bool need_dbeta) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])");
}
