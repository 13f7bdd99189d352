// resfast's training ops (and eval with gradients), one implementation for every device: convolutions through
// ATen (cuDNN on CUDA, oneDNN on the CPU: at::convolution / at::convolution_backward), everything between them in
// the device kernels of bn_train.h (cpu/bn_train.cpp, cuda/bn_train.cu). The pattern of the Triton backend's
// training ops (resfast/backends/triton/training.py), with the same op signatures except that the Res2Net chain returns its
// raw conv outputs as a list (a cuDNN convolution allocates its own output).
//
// Declared mirror: resfast/backends/triton/training.py orchestrates the same per-op training ops
// (torch.ops.resfast_triton) over other primitives (Triton kernels; here ATen convolutions + the csrc kernels);
// the two are kept step for step in sync, and tests/test_training_mirrors.py runs both on the same inputs and
// compares every output.
//
// What is saved for backward is decided in Python (resfast/ops/training.py): raw conv outputs and per-channel
// statistics; the normalised activations are recomputed from them. Registered for CPU and, when built with CUDA,
// for CUDA.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "bn_train.h"
#include "resfast.h"

namespace resfast {

ActView act_view(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "resfast: internal error: act_view of a ", t.dim(), "-D tensor");
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const int64_t sH = t.stride(2), sW = t.stride(3);
  TORCH_CHECK(H <= 1 || W <= 1 || sH == W * sW,
              "resfast: internal error: the tensor's H and W do not collapse into one pixel index (strides ",
              t.strides(), ")");
  const int64_t P = H * W;
  const int64_t sP = W > 1 ? sW : (H > 1 ? sH : 1);
  return ActView{N, C, P, N > 1 ? t.stride(0) : 1, C > 1 ? t.stride(1) : 1, P > 1 ? sP : 1};
}

Inner common_inner(std::initializer_list<ActView> views) {
  bool ci = true, pi = true;
  int64_t P = 1;
  for (const auto& v : views) {
    ci = ci && v.sC == 1;
    pi = pi && v.sP == 1;
    P = std::max(P, v.P);
  }
  TORCH_CHECK(ci || pi, "resfast: internal error: the tensors of one kernel call mix channels-inner and "
              "pixels-inner layouts");
  return pi && (P > 1 || !ci) ? Inner::Pixels : Inner::Channels;
}

const BnKernels& bn_kernels(const at::Device& device) {
  if (device.is_cpu()) return cpu_bn_kernels();
#ifdef RESFAST_WITH_CUDA
  if (device.is_cuda()) return cuda_bn_kernels();
#endif
  TORCH_CHECK(false, "resfast: no BatchNorm kernels for tensors on ", device,
              device.is_cuda() ? " (resfast._C was built without CUDA)" : "");
}

namespace {

constexpr auto kCL = at::MemoryFormat::ChannelsLast;

at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.is_contiguous(kCL) && !x.is_contiguous() ? kCL : at::MemoryFormat::Contiguous;
}

at::Tensor none() { return at::Tensor(); }

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// A placeholder for a gradient not asked for (distinct per output: an op's outputs may not alias).
at::Tensor empty_like_none(const at::Tensor& like) { return at::empty({0}, like.options()); }

at::ScalarType acc_of(const at::Tensor& x) { return acc_type(x.scalar_type()); }

// --- argument checks: every message names the op and the argument --------------------------------------------

void check_activation(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  RESFAST_CHECK(t.dim() == 4, op, name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  RESFAST_CHECK(t.scalar_type() == x.scalar_type(), op, name, " must have x's dtype ", x.scalar_type(), ", got ",
                t.scalar_type());
  RESFAST_CHECK(t.device() == x.device(), op, name, " must be on x's device ", x.device(), ", got ", t.device());
}

void check_input(const char* op, const at::Tensor& x) {
  RESFAST_CHECK(x.dim() == 4, op, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  RESFAST_CHECK(at::isFloatingType(x.scalar_type()), op, "x must be floating point, got ", x.scalar_type());
  RESFAST_CHECK(x.device().is_cpu() || x.device().is_cuda(), op, "x is on ", x.device(),
                "; resfast's kernels take CPU or CUDA tensors");
}

void check_channel_vector(const char* op, const char* name, const at::Tensor& t, int64_t C, const at::Tensor& x) {
  if (!t.defined()) return;
  RESFAST_CHECK(t.dim() == 1 && t.size(0) == C, op, name, " must have shape (", C, "), got ", t.sizes());
  RESFAST_CHECK(t.device() == x.device(), op, name, " must be on x's device ", x.device(), ", got ", t.device());
  RESFAST_CHECK(at::isFloatingType(t.scalar_type()), op, name, " must be floating point, got ", t.scalar_type());
}

// A BatchNorm over C channels: its affine parameters and given statistics, each optional.
void check_bn(const char* op, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
              const std::optional<at::Tensor>& mean_in, const std::optional<at::Tensor>& invstd_in, int64_t C,
              const at::Tensor& x) {
  check_channel_vector(op, "gamma", opt(gamma), C, x);
  check_channel_vector(op, "beta", opt(beta), C, x);
  check_channel_vector(op, "mean_in", opt(mean_in), C, x);
  check_channel_vector(op, "invstd_in", opt(invstd_in), C, x);
  RESFAST_CHECK(mean_in.has_value() == invstd_in.has_value(), op, "mean_in and invstd_in come together");
}

void check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  RESFAST_CHECK(weight.dim() == 4, op, "weight must be 4-D (C_out, C_in / groups, kH, kW), got ", weight.dim(), "-D");
  RESFAST_CHECK(weight.scalar_type() == x.scalar_type(), op, "weight must have x's dtype ", x.scalar_type(),
                ", got ", weight.scalar_type());
  RESFAST_CHECK(weight.device() == x.device(), op, "weight must be on x's device ", x.device());
  RESFAST_CHECK(groups > 0, op, "groups must be positive, got ", groups);
  RESFAST_CHECK(weight.size(0) % groups == 0, op, "groups (", groups, ") must divide the output channels (",
                weight.size(0), ")");
  RESFAST_CHECK(x.size(1) == weight.size(1) * groups, op, "x has ", x.size(1),
                " channels but weight expects weight.size(1) * groups = ", weight.size(1) * groups);
  RESFAST_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                "stride, padding and dilation must have 2 values each");
  if (bias.defined()) {
    RESFAST_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), op, "bias must have shape (", weight.size(0),
                  "), got ", bias.sizes());
    RESFAST_CHECK(bias.scalar_type() == x.scalar_type() && bias.device() == x.device(), op,
                  "bias must have x's dtype and device");
  }
}

// --- pieces ---------------------------------------------------------------------------------------------------

// The convolution in `fmt` (cuDNN and oneDNN pick their output layout from the input and the weight; the ops
// promise x's layout, which the fake implementations state).
at::Tensor conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::MemoryFormat fmt) {
  const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  return at::convolution(x, weight.contiguous(fmt), b, stride, padding, dilation, false, {0, 0}, groups)
      .contiguous(fmt);
}

struct Stats {
  at::Tensor mean, invstd, var;
};

// Batch statistics of z, or copies of the given ones (an op's outputs may not alias its inputs). An empty batch
// gives zeros (the running buffers are left alone by the caller, as F.batch_norm does).
Stats get_stats(const at::Tensor& z, const at::Tensor& mean_in, const at::Tensor& invstd_in, double eps) {
  const int64_t C = z.size(1);
  const auto opts = z.options().dtype(acc_of(z));
  if (mean_in.defined()) {
    return {mean_in.to(opts, false, true), invstd_in.to(opts, false, true), at::zeros({C}, opts)};
  }
  Stats s{at::zeros({C}, opts), at::zeros({C}, opts), at::zeros({C}, opts)};
  if (z.numel() > 0) bn_kernels(z.device()).stats(z, eps, s.mean, s.invstd, s.var);
  return s;
}

// Per-channel tensors reach the kernels contiguous, in the accumulation dtype.
at::Tensor scale_of(const at::Tensor& invstd, const at::Tensor& gamma) {
  return gamma.defined() ? invstd * gamma.to(invstd.scalar_type()) : invstd.contiguous();
}

at::Tensor acc_or_none(const at::Tensor& t, at::ScalarType acc) {
  return t.defined() ? t.to(acc).contiguous() : t;
}

struct BnGrads {
  at::Tensor dz, dgamma, dbeta, dres;
};

// BatchNorm (+ ReLU, + residual) backward: g = (dy + dy2) masked by y > 0; dz, and g as the residual's gradient.
// dgamma/dbeta are the per-channel sums (returned in the acc dtype; the caller casts).
BnGrads bn_backward(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma, bool batch_stats,
                    bool need_sums, bool need_dres, at::MemoryFormat fmt) {
  const auto& k = bn_kernels(z.device());
  const auto opts = mean.options();
  BnGrads g;
  at::Tensor sum_g, sum_gx;
  if (batch_stats || need_sums) {
    sum_g = at::empty_like(mean, opts);
    sum_gx = at::empty_like(mean, opts);
    k.backward_reduce(dy, dy2, y, z, mean, invstd, sum_g, sum_gx);
    g.dgamma = sum_gx;
    g.dbeta = sum_g;
  }
  g.dz = at::empty_like(z, z.options().memory_format(fmt));
  if (need_dres) g.dres = at::empty_like(z, z.options().memory_format(fmt));
  k.backward_apply(dy, dy2, y, z, mean, invstd, scale_of(invstd, gamma), sum_g, sum_gx, batch_stats, g.dz, g.dres);
  return g;
}

// --- conv -> BatchNorm (-> + residual) (-> ReLU) ---------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& x_, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& mean_in,
    const std::optional<at::Tensor>& invstd_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, double eps) {
  const char* op = "conv_bn_train";
  check_input(op, x_);
  check_conv(op, x_, weight, opt(bias), stride, padding, dilation, groups);
  check_bn(op, gamma, beta, mean_in, invstd_in, weight.size(0), x_);
  const c10::OptionalDeviceGuard guard(x_.device());
  const auto fmt = layout_of(x_);
  const at::Tensor z = conv(x_.contiguous(fmt), weight, opt(bias), stride, padding, dilation, groups, fmt);
  at::Tensor res;
  if (residual.has_value()) {
    check_activation(op, "residual", *residual, x_);
    RESFAST_CHECK(residual->sizes() == z.sizes(), op, "residual must have the output's shape ", z.sizes(), ", got ",
                  residual->sizes());
    res = residual->contiguous(fmt);
  }
  Stats s = get_stats(z, opt(mean_in), opt(invstd_in), eps);
  const auto acc = acc_of(z);
  at::Tensor y = at::empty_like(z, z.options().memory_format(fmt));
  bn_kernels(z.device())
      .apply(z, s.mean, scale_of(s.invstd, opt(gamma)), acc_or_none(opt(beta), acc), res, relu, y, none(), none());
  return {y, z, s.mean, s.invstd, s.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& z,
    const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& gamma, const at::Tensor& mean,
    const at::Tensor& invstd, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool batch_stats, bool has_bias, const c10::List<bool>& need_) {
  const char* op = "conv_bn_train_backward";
  RESFAST_CHECK(need_.size() == 6, op, "need must have 6 flags");
  check_activation(op, "dy", dy, z);
  RESFAST_CHECK(dy.sizes() == z.sizes(), op, "dy must have the output's shape ", z.sizes(), ", got ", dy.sizes());
  const bool need_dx = need_[0], need_dw = need_[1], need_db = need_[2], need_dgamma = need_[3],
             need_dbeta = need_[4], need_dres = need_[5];
  const c10::OptionalDeviceGuard guard(x.device());
  const auto fmt = layout_of(z);
  const BnGrads g = bn_backward(dy.contiguous(fmt), none(), opt(y), z, mean, invstd, opt(gamma), batch_stats,
                                need_dgamma || need_dbeta, need_dres, fmt);
  at::Tensor dx, dw, db;
  if (need_dx || need_dw || (need_db && has_bias)) {
    std::tie(dx, dw, db) = at::convolution_backward(
        g.dz, x, weight, has_bias ? std::optional<at::IntArrayRef>(weight.sizes().slice(0, 1)) : std::nullopt,
        stride, padding, dilation, false, {0, 0}, groups, {need_dx, need_dw, need_db && has_bias});
  }
  const auto gdt = gamma.has_value() ? gamma->scalar_type() : mean.scalar_type();
  return {need_dx ? dx.contiguous(layout_of(x)) : empty_like_none(x),
          need_dw ? dw.contiguous(layout_of(weight)) : empty_like_none(weight),
          (need_db && has_bias) ? db : empty_like_none(weight),
          need_dgamma ? g.dgamma.to(gdt) : empty_like_none(mean),
          need_dbeta ? g.dbeta.to(gdt) : empty_like_none(mean),
          need_dres ? g.dres : empty_like_none(z)};
}

// --- BatchNorm -> ReLU -> conv (-> + residual) -----------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_conv_train(
    const at::Tensor& x_, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& mean_in, const std::optional<at::Tensor>& invstd_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double eps) {
  const char* op = "bn_relu_conv_train";
  check_input(op, x_);
  check_conv(op, x_, weight, opt(bias), stride, padding, dilation, groups);
  check_bn(op, gamma, beta, mean_in, invstd_in, x_.size(1), x_);
  const c10::OptionalDeviceGuard guard(x_.device());
  const auto fmt = layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  Stats s = get_stats(x, opt(mean_in), opt(invstd_in), eps);
  // the activation lives only until the conv has read it (backward recomputes it)
  at::Tensor act = at::empty_like(x, x.options().memory_format(fmt));
  bn_kernels(x.device())
      .apply(x, s.mean, scale_of(s.invstd, opt(gamma)), acc_or_none(opt(beta), acc_of(x)), none(), true, act, none(),
             none());
  at::Tensor y = conv(act, weight, opt(bias), stride, padding, dilation, groups, fmt);
  act.reset();
  if (residual.has_value()) {
    check_activation(op, "residual", *residual, x_);
    RESFAST_CHECK(residual->sizes() == y.sizes(), op, "residual must have the output's shape ", y.sizes(), ", got ",
                  residual->sizes());
    y.add_(*residual);
  }
  return {y, s.mean, s.invstd, s.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_conv_train_backward(
    const at::Tensor& dy, const at::Tensor& x_, const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& beta, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool batch_stats,
    bool has_bias, const c10::List<bool>& need_) {
  const char* op = "bn_relu_conv_train_backward";
  RESFAST_CHECK(need_.size() == 5, op, "need must have 5 flags");
  const bool need_dx = need_[0], need_dgamma = need_[1], need_dbeta = need_[2], need_dw = need_[3],
             need_db = need_[4];
  const c10::OptionalDeviceGuard guard(x_.device());
  const auto fmt = layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const auto& k = bn_kernels(x.device());
  at::Tensor act = at::empty_like(x, x.options().memory_format(fmt));
  k.apply(x, mean, scale_of(invstd, opt(gamma)), acc_or_none(opt(beta), acc_of(x)), none(), true, act, none(), none());
  const bool need_dact = need_dx || need_dgamma || need_dbeta;
  auto [dact, dw, db] = at::convolution_backward(
      dy, act, weight, has_bias ? std::optional<at::IntArrayRef>(weight.sizes().slice(0, 1)) : std::nullopt, stride,
      padding, dilation, false, {0, 0}, groups, {need_dact, need_dw, need_db && has_bias});
  at::Tensor dx, dgamma, dbeta;
  if (need_dact) {
    const BnGrads g = bn_backward(dact.contiguous(fmt), none(), act, x, mean, invstd, opt(gamma), batch_stats,
                                  need_dgamma || need_dbeta, false, fmt);
    dx = g.dz;
    dgamma = g.dgamma;
    dbeta = g.dbeta;
  }
  const auto gdt = gamma.has_value() ? gamma->scalar_type() : mean.scalar_type();
  return {need_dx ? dx : empty_like_none(x_),
          need_dgamma ? dgamma.to(gdt) : empty_like_none(mean),
          need_dbeta ? dbeta.to(gdt) : empty_like_none(mean),
          need_dw ? dw.contiguous(layout_of(weight)) : empty_like_none(weight),
          (need_db && has_bias) ? db : empty_like_none(weight)};
}

// --- the Res2Net chain -----------------------------------------------------------------------------------------

struct Chain {
  std::vector<int64_t> conv_splits;
  int64_t passthrough;  // -1: none
  int64_t width;
  bool normal;
  at::Tensor split(const at::Tensor& t, int64_t i) const {
    return passthrough < 0 ? t : t.narrow(1, i * width, width);
  }
};

// resfast.ops._args.chain_layout: timm order runs splits 0 .. scale-2 and passes the last through (scale 1: one
// conv over everything); paper order passes split 0 through and runs 1 .. scale-1.
Chain chain_of(const char* op, const at::Tensor& x, int64_t scale, int64_t stride, c10::string_view order,
               c10::string_view block_type) {
  RESFAST_CHECK(order == "timm" || order == "paper", op, "order must be 'timm' or 'paper', got '", order, "'");
  RESFAST_CHECK(block_type == "normal" || block_type == "stage", op, "block_type must be 'normal' or 'stage', got '",
                block_type, "'");
  RESFAST_CHECK(scale >= 1, op, "scale must be >= 1, got ", scale);
  RESFAST_CHECK(x.size(1) % scale == 0, op, "scale (", scale, ") must divide the channels (", x.size(1), ")");
  RESFAST_CHECK(block_type == "stage" || stride == 1, op, "a 'normal' block has stride 1, got ", stride);
  Chain c;
  c.normal = block_type == "normal";
  if (order == "timm") {
    if (scale > 1) {
      for (int64_t i = 0; i < scale - 1; ++i) c.conv_splits.push_back(i);
      c.passthrough = scale - 1;
    } else {
      c.conv_splits = {0};
      c.passthrough = -1;
    }
  } else {
    for (int64_t i = 1; i < scale; ++i) c.conv_splits.push_back(i);
    c.passthrough = 0;
  }
  c.width = c.passthrough < 0 ? x.size(1) : x.size(1) / scale;
  return c;
}

// The k-th tensor of an optional per-conv list (empty: none), without copying the list.
at::Tensor pick(at::TensorList ts, size_t k) { return ts.empty() ? at::Tensor() : ts[k]; }

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> res2net_chain_train(
    const at::Tensor& x_, at::TensorList weights, at::TensorList biases, at::TensorList gammas, at::TensorList betas,
    const std::optional<at::Tensor>& mean_in, const std::optional<at::Tensor>& invstd_in, int64_t scale,
    int64_t stride, int64_t dilation, int64_t groups, c10::string_view order, c10::string_view block_type,
    at::ArrayRef<double> eps) {
  const char* op = "res2net_chain_train";
  check_input(op, x_);
  const Chain ch = chain_of(op, x_, scale, stride, order, block_type);
  const size_t S = ch.conv_splits.size();
  RESFAST_CHECK(weights.size() == S, op, "expected ", S, " weights, got ", weights.size());
  RESFAST_CHECK(eps.size() == S, op, "expected ", S, " eps values, got ", eps.size());
  RESFAST_CHECK(biases.empty() || biases.size() == S, op, "biases must be empty or have ", S, " tensors");
  RESFAST_CHECK(gammas.empty() || gammas.size() == S, op, "gammas must be empty or have ", S, " tensors");
  RESFAST_CHECK(betas.empty() || betas.size() == S, op, "betas must be empty or have ", S, " tensors");
  RESFAST_CHECK(mean_in.has_value() == invstd_in.has_value(), op, "mean_in and invstd_in come together");
  const int64_t wd = ch.width;
  const std::vector<int64_t> st{stride, stride}, dl{dilation, dilation};
  const at::Tensor probe = x_.narrow(1, 0, wd);
  for (size_t k = 0; k < S; ++k) {
    check_conv(op, probe, weights[k], biases.empty() ? at::Tensor() : biases[k], st, dl, dl, groups);
    RESFAST_CHECK(weights[k].size(0) == wd, op, "weights[", k, "] must have ", wd, " output channels, got ",
                  weights[k].size(0));
    if (!gammas.empty()) check_channel_vector(op, "gammas[k]", gammas[k], wd, x_);
    if (!betas.empty()) check_channel_vector(op, "betas[k]", betas[k], wd, x_);
  }
  if (mean_in.has_value()) {
    RESFAST_CHECK(mean_in->dim() == 2 && mean_in->size(0) == static_cast<int64_t>(S) && mean_in->size(1) == wd &&
                      invstd_in->sizes() == mean_in->sizes(),
                  op, "mean_in and invstd_in must have shape (", S, ", ", wd, ")");
  }
  const c10::OptionalDeviceGuard guard(x_.device());
  const auto fmt = layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t H_out = (x.size(2) - 1) / stride + 1, W_out = (x.size(3) - 1) / stride + 1;
  at::Tensor out = at::empty({N, C, H_out, W_out}, x.options().memory_format(fmt));
  const auto acc = acc_of(x);
  const auto sopts = x.options().dtype(acc);
  at::Tensor mean = at::zeros({static_cast<int64_t>(S), wd}, sopts);
  at::Tensor invstd = at::zeros({static_cast<int64_t>(S), wd}, sopts);
  at::Tensor var = at::zeros({static_cast<int64_t>(S), wd}, sopts);
  if (mean_in.has_value()) {
    mean.copy_(*mean_in);
    invstd.copy_(*invstd_in);
  }
  const auto& kern = bn_kernels(x.device());
  std::vector<at::Tensor> zs;
  at::Tensor next_in;
  for (size_t k = 0; k < S; ++k) {
    const int64_t i = ch.conv_splits[k];
    const at::Tensor inp = (ch.normal && k > 0) ? next_in : ch.split(x, i);
    at::Tensor z = conv(inp, weights[k], pick(biases, k), st, dl, dl, groups, fmt);
    if (!mean_in.has_value() && z.numel() > 0) kern.stats(z, eps[k], mean[k], invstd[k], var[k]);
    const bool chained = ch.normal && k + 1 < S;
    at::Tensor addend = chained ? ch.split(x, ch.conv_splits[k + 1]) : at::Tensor();
    next_in = chained ? at::empty_like(addend, addend.options().memory_format(fmt)) : at::Tensor();
    kern.apply(z, mean[k], scale_of(invstd[k], pick(gammas, k)), acc_or_none(pick(betas, k), acc),
               none(), true, ch.split(out, i), addend, next_in);
    zs.push_back(std::move(z));
  }
  if (ch.passthrough >= 0) {
    const at::Tensor p = ch.split(x, ch.passthrough);
    // timm pools the pass-through split of every 'stage' block, stride 1 included (count_include_pad=True)
    ch.split(out, ch.passthrough)
        .copy_(ch.normal ? p : at::avg_pool2d(p, {3, 3}, {stride, stride}, {1, 1}, false, true));
  }
  return {out, zs, mean, invstd, var};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
res2net_chain_train_backward(const at::Tensor& dout, const at::Tensor& x_, const at::Tensor& out, at::TensorList zs,
                             at::TensorList weights, at::TensorList gammas, const at::Tensor& mean,
                             const at::Tensor& invstd, int64_t scale, int64_t stride, int64_t dilation, int64_t groups,
                             c10::string_view order, c10::string_view block_type, bool batch_stats, bool has_bias,
                             bool need_dx, bool need_dw, bool need_db, bool need_dgamma, bool need_dbeta) {
  const char* op = "res2net_chain_train_backward";
  check_input(op, x_);
  const Chain ch = chain_of(op, x_, scale, stride, order, block_type);
  const size_t S = ch.conv_splits.size();
  RESFAST_CHECK(zs.size() == S && weights.size() == S, op, "expected ", S, " raw outputs and weights");
  check_activation(op, "dout", dout, out);
  RESFAST_CHECK(dout.sizes() == out.sizes(), op, "dout must have the output's shape ", out.sizes());
  const c10::OptionalDeviceGuard guard(x_.device());
  const auto fmt = layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const at::Tensor dy = dout.contiguous(fmt);
  const int64_t wd = ch.width;
  const std::vector<int64_t> st{stride, stride}, dl{dilation, dilation};
  at::Tensor dx = need_dx ? at::empty_like(x, x.options().memory_format(fmt)) : empty_like_none(x);
  std::vector<at::Tensor> dws, dbs, dgammas, dbetas;
  for (size_t k = 0; k < S; ++k) {  // distinct placeholders: an op's outputs may not alias each other
    dws.push_back(empty_like_none(x));
    dbs.push_back(empty_like_none(x));
    dgammas.push_back(empty_like_none(mean));
    dbetas.push_back(empty_like_none(mean));
  }
  at::Tensor dnext;
  for (size_t kk = S; kk-- > 0;) {
    const int64_t i = ch.conv_splits[kk];
    const at::Tensor gamma = pick(gammas, kk);
    const BnGrads g = bn_backward(ch.split(dy, i), dnext, ch.split(out, i), zs[kk], mean[kk], invstd[kk], gamma,
                                  batch_stats, need_dgamma || need_dbeta, false, fmt);
    const auto gdt = gamma.defined() ? gamma.scalar_type() : mean.scalar_type();
    if (need_dgamma) dgammas[kk] = g.dgamma.to(gdt);
    if (need_dbeta) dbetas[kk] = g.dbeta.to(gdt);
    const bool chained = ch.normal && kk > 0;
    at::Tensor inp = ch.split(x, i);
    if (chained) inp = inp + ch.split(out, ch.conv_splits[kk - 1]);  // the conv's input, recomputed
    const bool want_din = need_dx || chained;
    auto [din, dw, db] = at::convolution_backward(
        g.dz, inp, weights[kk], has_bias ? std::optional<at::IntArrayRef>(weights[kk].sizes().slice(0, 1)) : std::nullopt,
        st, dl, dl, false, {0, 0}, groups, {want_din, need_dw, need_db && has_bias});
    if (need_dw) dws[kk] = dw.contiguous(layout_of(weights[kk]));
    if (need_db && has_bias) dbs[kk] = db;
    if (need_dx) ch.split(dx, i).copy_(din);
    // the input gradient also reaches the previous split's output through the add
    dnext = chained ? din.contiguous(fmt) : at::Tensor();
  }
  if (need_dx && ch.passthrough >= 0) {
    at::Tensor g = ch.split(dy, ch.passthrough);
    if (!ch.normal) {
      g = at::avg_pool2d_backward(g, ch.split(x, ch.passthrough), {3, 3}, {stride, stride}, {1, 1}, false, true,
                                  std::nullopt);
    }
    ch.split(dx, ch.passthrough).copy_(g);
  }
  (void)wd;
  return {dx, dws, dbs, dgammas, dbetas};
}

// --- statistics and running buffers as ops -----------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stats(const at::Tensor& x_, double eps) {
  const char* op = "bn_stats";
  check_input(op, x_);
  RESFAST_CHECK(eps >= 0, op, "eps must be >= 0, got ", eps);
  const c10::OptionalDeviceGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(layout_of(x_));
  const Stats s = get_stats(x, none(), none(), eps);
  return {s.mean, s.invstd, s.var};
}

void bn_running_update(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                       const at::Tensor& var, double factor) {
  const char* op = "bn_running_update";
  RESFAST_CHECK(running_mean.dim() == 1 && running_var.sizes() == running_mean.sizes() &&
                    mean.sizes() == running_mean.sizes() && var.sizes() == running_mean.sizes(),
                op, "running_mean, running_var, mean and var must all have shape (C,); got ", running_mean.sizes(),
                ", ", running_var.sizes(), ", ", mean.sizes(), ", ", var.sizes());
  RESFAST_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(), op,
                "running_mean and running_var must be contiguous (they are updated in place)");
  RESFAST_CHECK(running_mean.device() == mean.device() && running_var.device() == mean.device() &&
                    var.device() == mean.device(),
                op, "all tensors must be on one device");
  RESFAST_CHECK(mean.scalar_type() == var.scalar_type() &&
                    (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble),
                op, "mean and var must both be float32 or float64");
  const c10::OptionalDeviceGuard guard(mean.device());
  if (running_mean.numel() == 0) return;
  bn_kernels(mean.device())
      .running_update(running_mean, running_var, mean.contiguous(), var.contiguous(), factor);
}


// --- eval with BatchNorm folded into the weights, on devices without a dedicated kernel (CUDA): the schemas of
// cpu/conv_eval.cpp, computed as a cuDNN convolution and one fused pass (bias, residual, ReLU; in the chain also
// the next split's input) into the output or its slice

at::Tensor conv_bias_act_generic(const at::Tensor& x_, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, const std::optional<at::Tensor>& residual, bool relu) {
  const char* op = "conv_bias_act";
  check_input(op, x_);
  check_conv(op, x_, weight, opt(bias), stride, padding, dilation, groups);
  const c10::OptionalDeviceGuard guard(x_.device());
  const auto fmt = layout_of(x_);
  at::Tensor z = conv(x_.contiguous(fmt), weight, none(), stride, padding, dilation, groups, fmt);
  at::Tensor res;
  if (residual.has_value()) {
    check_activation(op, "residual", *residual, x_);
    RESFAST_CHECK(residual->sizes() == z.sizes(), op, "residual must have the output's shape ", z.sizes(), ", got ",
                  residual->sizes());
    res = residual->contiguous(fmt);
  }
  // in place: each element is read before it is written
  bn_kernels(z.device()).apply(z, none(), none(), acc_or_none(opt(bias), acc_of(z)), res, relu, z, none(), none());
  return z;
}

at::Tensor res2net_chain_folded_generic(const at::Tensor& x_, at::TensorList weights, at::TensorList biases,
                                        int64_t width, int64_t stride, int64_t dilation, int64_t groups,
                                        c10::string_view block_type, at::IntArrayRef conv_splits,
                                        int64_t passthrough) {
  const char* op = "res2net_chain_folded";
  check_input(op, x_);
  RESFAST_CHECK(block_type == "normal" || block_type == "stage", op, "block_type must be 'normal' or 'stage'");
  RESFAST_CHECK(weights.size() == conv_splits.size() && biases.size() == conv_splits.size(), op,
                "weights, biases and conv_splits must have one entry per conv");
  RESFAST_CHECK(width > 0 && x_.size(1) % width == 0, op, "width (", width, ") must divide the channels (",
                x_.size(1), ")");
  const int64_t n_splits = x_.size(1) / width;
  // every split of the output is written exactly once: by its conv or as the pass-through
  std::vector<int> covered(n_splits, 0);
  for (const int64_t i : conv_splits) {
    RESFAST_CHECK(i >= 0 && i < n_splits, op, "conv split ", i, " out of range");
    ++covered[i];
  }
  RESFAST_CHECK(passthrough >= -1 && passthrough < n_splits, op, "passthrough ", passthrough, " out of range");
  if (passthrough >= 0) ++covered[passthrough];
  for (int64_t i = 0; i < n_splits; ++i)
    RESFAST_CHECK(covered[i] == 1, op, "split ", i, " must be written once (by a conv or as the pass-through)");
  const bool normal = block_type == "normal";
  RESFAST_CHECK(!normal || stride == 1, op, "a 'normal' block has stride 1, got ", stride);
  const std::vector<int64_t> st{stride, stride}, dl{dilation, dilation};
  const c10::OptionalDeviceGuard guard(x_.device());
  const auto fmt = layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  auto split = [&](const at::Tensor& t, int64_t i) { return t.narrow(1, i * width, width); };
  for (size_t k = 0; k < weights.size(); ++k)
    check_conv(op, split(x, conv_splits[k]), weights[k], biases[k], st, dl, dl, groups);
  const int64_t H_out = (x.size(2) - 1) / stride + 1, W_out = (x.size(3) - 1) / stride + 1;
  at::Tensor out = at::empty({x.size(0), x.size(1), H_out, W_out}, x.options().memory_format(fmt));
  const auto& kern = bn_kernels(x.device());
  at::Tensor next_in;
  for (size_t k = 0; k < weights.size(); ++k) {
    const int64_t i = conv_splits[k];
    const at::Tensor inp = (normal && k > 0) ? next_in : split(x, i);
    const at::Tensor z = conv(inp, weights[k], none(), st, dl, dl, groups, fmt);
    const bool chained = normal && k + 1 < weights.size();
    const at::Tensor addend = chained ? split(x, conv_splits[k + 1]) : at::Tensor();
    next_in = chained ? at::empty_like(addend, addend.options().memory_format(fmt)) : at::Tensor();
    kern.apply(z, none(), none(), acc_or_none(biases[k], acc_of(x)), none(), true, split(out, i), addend, next_in);
  }
  if (passthrough >= 0) {
    const at::Tensor p = split(x, passthrough);
    split(out, passthrough).copy_(normal ? p : at::avg_pool2d(p, {3, 3}, {stride, stride}, {1, 1}, false, true));
  }
  return out;
}

void bn_relu_apply_(const at::Tensor& out, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd,
                    const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta) {
  const char* op = "bn_relu_apply_";
  check_input(op, z);
  check_activation(op, "out", out, z);
  RESFAST_CHECK(out.sizes() == z.sizes(), op, "out must have z's shape ", z.sizes(), ", got ", out.sizes());
  const int64_t C = z.size(1);
  check_channel_vector(op, "mean", mean, C, z);
  check_channel_vector(op, "invstd", invstd, C, z);
  check_channel_vector(op, "gamma", opt(gamma), C, z);
  check_channel_vector(op, "beta", opt(beta), C, z);
  RESFAST_CHECK(mean.scalar_type() == acc_of(z) && invstd.scalar_type() == acc_of(z), op,
                "mean and invstd must be ", acc_of(z), " (the statistics' dtype for ", z.scalar_type(), ")");
  const c10::OptionalDeviceGuard guard(z.device());
  bn_kernels(z.device())
      .apply(z.contiguous(layout_of(z)), mean.contiguous(), scale_of(invstd, opt(gamma)),
             acc_or_none(opt(beta), acc_of(z)), none(), true, out, none(), none());
}

}  // namespace

// The training ops run the same code on every device (the kernels are picked by bn_kernels(device)).
void impl_training_ops(torch::Library& m) {
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_running_update", &bn_running_update);
  m.impl("bn_relu_apply_", &bn_relu_apply_);
  m.impl("conv_bn_train", &conv_bn_train);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward);
  m.impl("bn_relu_conv_train", &bn_relu_conv_train);
  m.impl("bn_relu_conv_train_backward", &bn_relu_conv_train_backward);
  m.impl("res2net_chain_train", &res2net_chain_train);
  m.impl("res2net_chain_train_backward", &res2net_chain_train_backward);
}

TORCH_LIBRARY_IMPL(resfast, CPU, m) { impl_training_ops(m); }

#ifdef RESFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(resfast, CUDA, m) {
  impl_training_ops(m);
  // the eval ops' CUDA kernels (the CPU ones are cpu/conv_eval.cpp's oneDNN path)
  m.impl("conv_bias_act", &conv_bias_act_generic);
  m.impl("res2net_chain_folded", &res2net_chain_folded_generic);
}
#endif

}  // namespace resfast
