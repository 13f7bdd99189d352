// CPU kernels of the eval-mode fast path: convolutions with BatchNorm already folded into the weights and bias.
//
// conv_bias_act: y = relu?(conv2d(x, w) + bias + residual). float32/bfloat16 with oneDNN (mkldnn) run through
//   mkldnn::_convolution_pointwise, the op inductor uses on CPU: the ReLU and the residual add are oneDNN
//   post-ops, applied as the output is written, and `weight` may be a prepacked oneDNN tensor
//   (mkldnn::_reorder_convolution_weight, cached by the block) so no weight reorder happens per call.
//   Other dtypes (float64, float16) go through at::convolution with the add and ReLU in place after it.
// res2net_chain_folded: the Res2Net 3x3 chain over the channel splits of x, written into one preallocated
//   channels_last output (no torch.split copies, no torch.cat): each conv's output is copied into its slice
//   of the output and added to the next split to form the next conv's input (ATen's copy and add).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../resfast.h"

namespace resfast {
namespace {

constexpr auto kCL = at::MemoryFormat::ChannelsLast;

// The layout rule of every resfast op: channels_last in -> channels_last out, anything else -> NCHW.
at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.is_contiguous(kCL) && !x.is_contiguous() ? kCL : at::MemoryFormat::Contiguous;
}

bool use_mkldnn(const at::Tensor& x, const at::Tensor& w) {
  if (w.is_mkldnn()) return true;  // a prepacked weight is only made where oneDNN runs
  return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16);
}

// mkldnn::_convolution_pointwise and its .binary overload, looked up once
const c10::OperatorHandle& pointwise_op(bool binary) {
  static const auto unary = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  static const auto with_other =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary");
  return binary ? with_other : unary;
}

// Whether the residual add can be oneDNN's "add" post-op. Two cases run the conv with its bias alone, then the add
// and the ReLU in place (the same arithmetic as eager: the conv output rounded to x's dtype, then the add):
// - a 1x1 output: its channels_last and contiguous strides coincide, so the residual's layout is ambiguous to
//   oneDNN (torch 2.11's fails "could not create a memory" when x is channels_last);
// - an NCHW input with an unpacked weight: mkldnn::_convolution_pointwise.binary does not fuse there either (it
//   runs the conv, then at::add_relu, which has no bfloat16 kernel in torch 2.11).
bool fuses_residual(const at::Tensor& x_cl, const at::Tensor& w, const at::Tensor& residual) {
  if (residual.size(2) * residual.size(3) == 1) return false;
  return w.is_mkldnn() || layout_of(x_cl) == kCL;
}

at::Tensor conv_mkldnn(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       const std::optional<at::Tensor>& residual, bool relu) {
  std::vector<c10::IValue> stack;
  const auto fmt = layout_of(x);
  const auto x_cl = x.contiguous(fmt);
  const c10::IValue none;
  const c10::IValue no_scalars = c10::List<std::optional<at::Scalar>>();
  if (residual.has_value() && !fuses_residual(x_cl, w, *residual)) {
    auto y = conv_mkldnn(x, w, bias, stride, padding, dilation, groups, std::nullopt, false);
    y.add_(*residual);
    if (relu) y.relu_();
    return y;
  }
  if (residual.has_value()) {
    // relu?(conv + bias + residual): oneDNN's binary "add" post-op, then the unary one
    stack = {x_cl, residual->contiguous(fmt), w, bias, padding.vec(), stride.vec(), dilation.vec(), groups,
             std::string("add"), none, relu ? c10::IValue(std::string("relu")) : none, no_scalars, none};
    pointwise_op(true).callBoxed(&stack);
  } else {
    stack = {x_cl, w, bias, padding.vec(), stride.vec(), dilation.vec(), groups,
             std::string(relu ? "relu" : "none"), no_scalars, none};
    pointwise_op(false).callBoxed(&stack);
  }
  return stack[0].toTensor();
}

void check_conv(const char* op, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  RESFAST_CHECK(x.dim() == 4, op, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  RESFAST_CHECK(x.device().is_cpu(), op, "the CPU kernel got x on ", x.device());
  RESFAST_CHECK(at::isFloatingType(x.scalar_type()), op, "x must be floating point, got ", x.scalar_type());
  RESFAST_CHECK(w.dim() == 4, op, "weight must be 4-D (C_out, C_in / groups, kH, kW), got ", w.dim(), "-D");
  RESFAST_CHECK(w.scalar_type() == x.scalar_type(), op, "weight must have x's dtype ", x.scalar_type(), ", got ",
                w.scalar_type());
  RESFAST_CHECK(groups >= 1 && x.size(1) % groups == 0 && w.size(0) % groups == 0, op, "groups=", groups,
                " must divide the input channels ", x.size(1), " and the output channels ", w.size(0));
  RESFAST_CHECK(w.size(1) * groups == x.size(1), op, "weight expects ", w.size(1) * groups,
                " input channels, x has ", x.size(1));
  RESFAST_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                "stride, padding and dilation must have 2 values");
  if (bias.has_value()) {
    RESFAST_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), op, "bias must have shape (", w.size(0),
                  "), got ", bias->sizes());
    RESFAST_CHECK(bias->scalar_type() == x.scalar_type(), op, "bias must have x's dtype ", x.scalar_type());
  }
}

}  // namespace

at::Tensor conv_bias_act_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t groups, const std::optional<at::Tensor>& residual, bool relu) {
  const char* op = "conv_bias_act";
  check_conv(op, x, weight, bias, stride, padding, dilation, groups);
  const auto out_size = [&](int d) {
    return (x.size(d + 2) + 2 * padding[d] - dilation[d] * (weight.size(d + 2) - 1) - 1) / stride[d] + 1;
  };
  RESFAST_CHECK(out_size(0) > 0 && out_size(1) > 0, op, "the output would be empty: input ", x.sizes(),
                ", kernel ", weight.sizes());
  if (residual.has_value()) {
    const std::vector<int64_t> expect{x.size(0), weight.size(0), out_size(0), out_size(1)};
    RESFAST_CHECK(residual->sizes() == at::IntArrayRef(expect), op, "residual must have shape ", expect, ", got ",
                  residual->sizes());
    RESFAST_CHECK(residual->scalar_type() == x.scalar_type(), op, "residual must have x's dtype");
  }
  const auto fmt = layout_of(x);
  if (x.size(0) == 0) {
    return at::empty({0, weight.size(0), out_size(0), out_size(1)}, x.options().memory_format(fmt));
  }
  if (use_mkldnn(x, weight)) return conv_mkldnn(x, weight, bias, stride, padding, dilation, groups, residual, relu);
  auto y = at::convolution(x.contiguous(fmt), weight, bias, stride, padding, dilation, false, {0, 0}, groups)
               .contiguous(fmt);
  if (residual.has_value()) y.add_(*residual);
  if (relu) y.relu_();
  return y;
}

namespace {

// Copies `src` into `dst` (a channel slice of the chain's output) and, with `nxt`, returns src + nxt as a new tensor
// in src's layout (the next conv's input). ATen's copy and add: their kernels are vectorised for the CPU they run on
// (this file is compiled for the baseline ISA; a hand loop here measured 1.2 ms slower per stage-1 chain than them).
at::Tensor write_split(const at::Tensor& src, const at::Tensor& dst, const std::optional<at::Tensor>& nxt) {
  dst.copy_(src);
  if (!nxt) return at::Tensor();
  auto out = at::empty_like(src);
  at::add_out(out, src, *nxt);
  return out;
}

}  // namespace

at::Tensor res2net_chain_folded_cpu(const at::Tensor& x_, at::TensorList weights, at::TensorList biases,
                                    int64_t width, int64_t stride, int64_t dilation, int64_t groups,
                                    c10::string_view block_type, at::IntArrayRef conv_splits, int64_t passthrough) {
  const char* op = "res2net_chain_folded";
  RESFAST_CHECK(x_.dim() == 4, op, "x must be 4-D (N, C, H, W), got ", x_.dim(), "-D");
  RESFAST_CHECK(block_type == "normal" || block_type == "stage", op, "block_type must be 'normal' or 'stage'");
  const bool stage = block_type == "stage";
  RESFAST_CHECK(stride >= 1 && dilation >= 1, op, "stride and dilation must be >= 1");
  RESFAST_CHECK(stage || stride == 1, op, "a 'normal' chain has stride 1, got ", stride);
  RESFAST_CHECK(weights.size() == conv_splits.size() && biases.size() == weights.size() && !weights.empty(), op,
                "need one weight and one bias per conv split: ", weights.size(), " weights, ", biases.size(),
                " biases, ", conv_splits.size(), " splits");
  RESFAST_CHECK(width >= 1, op, "width must be >= 1");
  const int64_t nsplit = (int64_t)conv_splits.size() + (passthrough >= 0 ? 1 : 0);
  const bool single = passthrough < 0 && conv_splits.size() == 1 && width == x_.size(1);
  RESFAST_CHECK(single || width * nsplit == x_.size(1), op, "x has ", x_.size(1), " channels, expected ",
                nsplit, " splits of ", width);
  const auto fmt = layout_of(x_);
  const auto x = x_.contiguous(fmt);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  auto out = at::empty({N, x.size(1), Ho, Wo}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  auto split = [&](const at::Tensor& t, int64_t i) { return single ? t : t.narrow(1, i * width, width); };
  const std::vector<int64_t> st{stride, stride}, pad{dilation, dilation}, dil{dilation, dilation};
  // the first conv's input: its split, made contiguous once (the later ones come out of write_split)
  at::Tensor inp = split(x, conv_splits[0]).contiguous(fmt);
  for (size_t k = 0; k < conv_splits.size(); ++k) {
    RESFAST_CHECK(weights[k].size(0) == width, op, "weight ", k, " must have ", width, " output channels");
    const auto y = conv_bias_act_cpu(inp, weights[k], biases[k], st, pad, dil, groups, std::nullopt, true);
    const bool last = k + 1 == conv_splits.size();
    std::optional<at::Tensor> nxt;
    if (!last && !stage) nxt = split(x, conv_splits[k + 1]);  // the next conv adds this conv's output
    const auto next_inp = write_split(y, split(out, conv_splits[k]), nxt);
    if (!last) inp = stage ? split(x, conv_splits[k + 1]).contiguous(fmt) : next_inp;
  }
  if (passthrough >= 0) {
    const auto src = split(x, passthrough);
    // timm: nn.AvgPool2d(3, stride, padding=1) with count_include_pad=True in 'stage' blocks, a copy otherwise
    write_split(stage ? at::avg_pool2d(src, {3, 3}, {stride, stride}, {1, 1}, false, true) : src,
                split(out, passthrough), std::nullopt);
  }
  return out;
}

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("conv_bias_act", &conv_bias_act_cpu);
  m.impl("res2net_chain_folded", &res2net_chain_folded_cpu);
}

// A weight prepacked for oneDNN (an opaque mkldnn tensor) makes the dispatcher pick the MkldnnCPU key.
TORCH_LIBRARY_IMPL(resfast, MkldnnCPU, m) {
  m.impl("conv_bias_act", &conv_bias_act_cpu);
  m.impl("res2net_chain_folded", &res2net_chain_folded_cpu);
}

}  // namespace resfast
