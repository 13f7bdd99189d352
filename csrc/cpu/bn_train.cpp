// CPU kernels behind the training ops (the BnKernels contract of ../bn_train.h).
//
// Statistics and backward sums accumulate in double whatever the activation dtype: CPU double arithmetic costs
// little next to the memory traffic, and with it |x| up to 1e30 in fp32 cannot overflow. Each chunk of the data
// (a block of pixels x all channels in channels-inner layout, one (n, c) plane in pixels-inner layout) is reduced
// in two passes over cache-resident data (the mean, then squared deviations from it), and chunks merge with
// bn_math.h's weighted-average merge. Elementwise passes walk contiguous runs (a pixel's channels, or a plane) so the
// channel is known per run and the inner loop vectorizes.
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../bn_math.h"
#include "../bn_train.h"

namespace resfast {
namespace {

// Elements per chunk of the channels-inner reductions: small enough to stay in L2 between the two passes.
constexpr int64_t kChunkElems = 16384;

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Offset of a run's first element: run r is pixel (n, p) in channels-inner layout, plane (n, c) in pixels-inner.
inline int64_t run_offset(const ActView& v, bool ci, int64_t r, int64_t runs_per_n) {
  const int64_t n = r / runs_per_n, j = r % runs_per_n;
  return n * v.sN + j * (ci ? v.sP : v.sC);
}

// ------------------------------------------------------------------------------------------------------------
// statistics

template <typename scalar_t>
void stats_impl(const at::Tensor& z, double eps, const at::Tensor& mean, const at::Tensor& invstd,
                const at::Tensor& var_unbiased) {
  using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const ActView v = act_view(z);
  const bool ci = common_inner({v}) == Inner::Channels;
  const int64_t C = v.C, P = v.P, M = v.N * P;
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  std::vector<Moments<double>> per_channel(C, Moments<double>{0, 0.0, 0.0});
  if (ci) {
    const int64_t rows = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1));
    const int64_t chunks = (M + rows - 1) / rows;
    std::vector<Moments<double>> part(chunks * C);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      std::vector<double> sum(C);
      for (int64_t k = b; k < e; ++k) {
        const int64_t r0 = k * rows, r1 = std::min(M, r0 + rows), n = r1 - r0;
        std::fill(sum.begin(), sum.end(), 0.0);
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = zp + run_offset(v, true, r, P);
          for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<double>(row[c]);
        }
        Moments<double>* out = part.data() + k * C;
        for (int64_t c = 0; c < C; ++c) out[c] = {n, sum[c] / n, 0.0};
        std::fill(sum.begin(), sum.end(), 0.0);
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = zp + run_offset(v, true, r, P);
          for (int64_t c = 0; c < C; ++c) {
            const double d = static_cast<double>(row[c]) - out[c].mean;
            sum[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) out[c].var = sum[c] / n;
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        for (int64_t k = 0; k < chunks; ++k) per_channel[c] = merge_moments(per_channel[c], part[k * C + c]);
    });
  } else {
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        for (int64_t n = 0; n < v.N; ++n) {
          const scalar_t* plane = zp + n * v.sN + c * v.sC;
          double s = 0.0;
          for (int64_t p = 0; p < P; ++p) s += static_cast<double>(plane[p]);
          const double m = s / P;
          double q = 0.0;
          for (int64_t p = 0; p < P; ++p) {
            const double d = static_cast<double>(plane[p]) - m;
            q += d * d;
          }
          per_channel[c] = merge_moments(per_channel[c], Moments<double>{P, m, q / P});
        }
      }
    });
  }
  out_t* mp = mean.mutable_data_ptr<out_t>();
  out_t* ip = invstd.mutable_data_ptr<out_t>();
  out_t* vp = var_unbiased.mutable_data_ptr<out_t>();
  for (int64_t c = 0; c < C; ++c) {
    double m, is, vu;
    finalize_moments(per_channel[c], eps, &m, &is, &vu);
    mp[c] = static_cast<out_t>(m);
    ip[c] = static_cast<out_t>(is);
    vp[c] = static_cast<out_t>(vu);
  }
}

void stats_cpu(const at::Tensor& z, double eps, const at::Tensor& mean, const at::Tensor& invstd,
               const at::Tensor& var_unbiased) {
  if (z.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "resfast_bn_stats_cpu",
                                  [&] { stats_impl<scalar_t>(z, eps, mean, invstd, var_unbiased); });
}

// ------------------------------------------------------------------------------------------------------------
// fused forward: out = relu?((z - mean) * scale + shift + residual); next = out + addend

// Calls f with std::true_type / std::false_type: hot loops get their flags as compile-time constants, so they have
// no per-element branches (a data-dependent ReLU branch alone made the forward pass 8x slower) and vectorize.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Per-channel values, or a constant when the tensor is absent, as a dense array of C values.
template <typename acc_t>
std::vector<acc_t> channel_values(const at::Tensor& t, int64_t C, acc_t absent) {
  std::vector<acc_t> v(C, absent);
  if (t.defined()) std::copy(t.const_data_ptr<acc_t>(), t.const_data_ptr<acc_t>() + C, v.begin());
  return v;
}

template <typename scalar_t>
void apply_impl(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                const at::Tensor& residual, bool relu, const at::Tensor& out, const at::Tensor& addend,
                const at::Tensor& next) {
  using acc_t = at::opmath_type<scalar_t>;
  const ActView vz = act_view(z), vo = act_view(out);
  const ActView vr = residual.defined() ? act_view(residual) : vz;
  const ActView va = addend.defined() ? act_view(addend) : vz;
  const ActView vn = next.defined() ? act_view(next) : vz;
  const bool ci = common_inner({vz, vo, vr, va, vn}) == Inner::Channels;
  const int64_t C = vz.C, P = vz.P;
  const int64_t runs_per_n = ci ? P : C, runs = vz.N * runs_per_n, len = ci ? C : P;
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const scalar_t* rp = ptr_or_null<scalar_t>(residual);
  const scalar_t* ap = ptr_or_null<scalar_t>(addend);
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  scalar_t* np = next.defined() ? next.mutable_data_ptr<scalar_t>() : nullptr;
  const auto mv = channel_values<acc_t>(mean, C, acc_t(0));
  const auto sv = channel_values<acc_t>(scale, C, acc_t(1));
  const auto bv = channel_values<acc_t>(shift, C, acc_t(0));
  with_flag(relu, [&](auto kRelu) {
    with_flag(rp != nullptr, [&](auto kRes) {
      with_flag(np != nullptr, [&](auto kNext) {
       with_flag(ci, [&](auto kCi) {
        constexpr int64_t cs = decltype(kCi)::value ? 1 : 0;
        at::parallel_for(0, runs, std::max<int64_t>(1, 4096 / std::max<int64_t>(len, 1)), [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) {
            const scalar_t* __restrict__ zr = zp + run_offset(vz, ci, r, runs_per_n);
            scalar_t* __restrict__ orow = op + run_offset(vo, ci, r, runs_per_n);
            const scalar_t* __restrict__ rr = kRes ? rp + run_offset(vr, ci, r, runs_per_n) : nullptr;
            const scalar_t* __restrict__ ar = kNext ? ap + run_offset(va, ci, r, runs_per_n) : nullptr;
            scalar_t* __restrict__ nr = kNext ? np + run_offset(vn, ci, r, runs_per_n) : nullptr;
            const int64_t c_run = r % runs_per_n;  // the channel of a pixels-inner run
            // channels inner: the channel is j; pixels inner: one channel per run (stride 0 into the arrays)
            const acc_t* __restrict__ m = mv.data() + (ci ? 0 : c_run);
            const acc_t* __restrict__ sc = sv.data() + (ci ? 0 : c_run);
            const acc_t* __restrict__ sh = bv.data() + (ci ? 0 : c_run);
            for (int64_t j = 0; j < len; ++j) {
              const acc_t v = bn_forward_value<acc_t>(static_cast<acc_t>(zr[j]), m[j * cs], sc[j * cs], sh[j * cs],
                                                      kRes ? static_cast<acc_t>(rr[j]) : acc_t(0), kRelu);
              const scalar_t o = static_cast<scalar_t>(v);
              orow[j] = o;
              if constexpr (decltype(kNext)::value) {
                nr[j] = static_cast<scalar_t>(static_cast<acc_t>(o) + static_cast<acc_t>(ar[j]));
              }
            }
          }
        });
       });
      });
    });
  });
}

void apply_cpu(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
               const at::Tensor& residual, bool relu, const at::Tensor& out, const at::Tensor& addend,
               const at::Tensor& next) {
  if (z.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "resfast_bn_apply_cpu", [&] {
    apply_impl<scalar_t>(z, mean, scale, shift, residual, relu, out, addend, next);
  });
}

// ------------------------------------------------------------------------------------------------------------
// backward

// The per-element inputs of the backward passes, resolved once per call.
template <typename scalar_t>
struct GradInputs {
  using acc_t = at::opmath_type<scalar_t>;
  ActView vdy, vdy2, vy, vz;
  bool ci;
  int64_t runs_per_n, runs, len;
  const scalar_t *dy, *dy2, *y, *z;
  const acc_t *mean, *invstd;

  GradInputs(const at::Tensor& dy_, const at::Tensor& dy2_, const at::Tensor& y_, const at::Tensor& z_,
             const at::Tensor& mean_, const at::Tensor& invstd_, std::initializer_list<ActView> outs) {
    vz = act_view(z_);
    vdy = act_view(dy_);
    vdy2 = dy2_.defined() ? act_view(dy2_) : vz;
    vy = y_.defined() ? act_view(y_) : vz;
    std::vector<ActView> all{vz, vdy, vdy2, vy};
    all.insert(all.end(), outs.begin(), outs.end());
    ci = true;
    bool pi = true;
    for (const auto& v : all) {
      ci = ci && v.sC == 1;
      pi = pi && v.sP == 1;
    }
    TORCH_CHECK(ci || pi, "resfast: internal error: the backward's tensors mix channels-inner and pixels-inner layouts");
    if (pi && vz.P > 1) ci = false;
    runs_per_n = ci ? vz.P : vz.C;
    runs = vz.N * runs_per_n;
    len = ci ? vz.C : vz.P;
    dy = dy_.const_data_ptr<scalar_t>();
    dy2 = ptr_or_null<scalar_t>(dy2_);
    y = ptr_or_null<scalar_t>(y_);
    z = ptr_or_null<scalar_t>(z_);
    mean = ptr_or_null<acc_t>(mean_);
    invstd = ptr_or_null<acc_t>(invstd_);
  }

  // g of element j of run r, and the run's pointers
  acc_t g(int64_t off_dy, int64_t off_dy2, int64_t off_y, int64_t j) const {
    return masked_grad<acc_t>(static_cast<acc_t>(dy[off_dy + j]), dy2 ? static_cast<acc_t>(dy2[off_dy2 + j]) : acc_t(0),
                              y != nullptr, y ? static_cast<acc_t>(y[off_y + j]) : acc_t(0));
  }
};

template <typename scalar_t>
void backward_reduce_impl(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                          const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_g,
                          const at::Tensor& sum_gxhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const GradInputs<scalar_t> in(dy, dy2, y, z, mean, invstd, {});
  const int64_t C = in.vz.C;
  std::vector<double> sg(C, 0.0), sgx(C, 0.0);
  auto run_sums = [&](int64_t r, double* g_acc, double* gx_acc, bool per_channel) {
    const int64_t o_dy = run_offset(in.vdy, in.ci, r, in.runs_per_n);
    const int64_t o_dy2 = run_offset(in.vdy2, in.ci, r, in.runs_per_n);
    const int64_t o_y = run_offset(in.vy, in.ci, r, in.runs_per_n);
    const int64_t o_z = run_offset(in.vz, in.ci, r, in.runs_per_n);
    const int64_t c_run = r % in.runs_per_n;
    for (int64_t j = 0; j < in.len; ++j) {
      const int64_t c = in.ci ? j : c_run;
      const double g = static_cast<double>(in.g(o_dy, o_dy2, o_y, j));
      const double xhat = (static_cast<double>(in.z[o_z + j]) - static_cast<double>(in.mean[c])) *
                          static_cast<double>(in.invstd[c]);
      const int64_t slot = per_channel ? c : 0;
      g_acc[slot] += g;
      gx_acc[slot] += g * xhat;
    }
  };
  if (in.ci) {
    const int64_t rows = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1));
    const int64_t chunks = (in.runs + rows - 1) / rows;
    std::vector<double> part_g(chunks * C, 0.0), part_gx(chunks * C, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        for (int64_t r = k * rows; r < std::min(in.runs, (k + 1) * rows); ++r)
          run_sums(r, part_g.data() + k * C, part_gx.data() + k * C, true);
    });
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = 0; c < C; ++c) {
        sg[c] += part_g[k * C + c];
        sgx[c] += part_gx[k * C + c];
      }
  } else {
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        for (int64_t n = 0; n < in.vz.N; ++n) run_sums(n * C + c, &sg[c], &sgx[c], false);
    });
  }
  acc_t* gp = sum_g.mutable_data_ptr<acc_t>();
  acc_t* gxp = sum_gxhat.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    gp[c] = static_cast<acc_t>(sg[c]);
    gxp[c] = static_cast<acc_t>(sgx[c]);
  }
}

void backward_reduce_cpu(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                         const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_g,
                         const at::Tensor& sum_gxhat) {
  if (z.numel() == 0) {
    sum_g.zero_();
    sum_gxhat.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "resfast_bn_backward_reduce_cpu", [&] {
    backward_reduce_impl<scalar_t>(dy, dy2, y, z, mean, invstd, sum_g, sum_gxhat);
  });
}

template <typename scalar_t>
void backward_apply_impl(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                         const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& scale,
                         const at::Tensor& sum_g, const at::Tensor& sum_gxhat, bool batch_stats,
                         const at::Tensor& dz, const at::Tensor& dres) {
  using acc_t = at::opmath_type<scalar_t>;
  const ActView vdz = act_view(dz);
  const ActView vdr = dres.defined() ? act_view(dres) : vdz;
  const GradInputs<scalar_t> in(dy, dy2, y, z, mean, invstd, {vdz, vdr});
  const acc_t* sp = scale.const_data_ptr<acc_t>();
  const acc_t* sgp = batch_stats ? sum_g.const_data_ptr<acc_t>() : nullptr;
  const acc_t* sgxp = batch_stats ? sum_gxhat.const_data_ptr<acc_t>() : nullptr;
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(in.vz.N * in.vz.P);
  scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
  scalar_t* drp = dres.defined() ? dres.mutable_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, in.runs, std::max<int64_t>(1, 4096 / std::max<int64_t>(in.len, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t o_dy = run_offset(in.vdy, in.ci, r, in.runs_per_n);
      const int64_t o_dy2 = run_offset(in.vdy2, in.ci, r, in.runs_per_n);
      const int64_t o_y = run_offset(in.vy, in.ci, r, in.runs_per_n);
      const int64_t o_z = run_offset(in.vz, in.ci, r, in.runs_per_n);
      scalar_t* dzr = dzp + run_offset(vdz, in.ci, r, in.runs_per_n);
      scalar_t* drr = drp ? drp + run_offset(vdr, in.ci, r, in.runs_per_n) : nullptr;
      const int64_t c_run = r % in.runs_per_n;
      for (int64_t j = 0; j < in.len; ++j) {
        const int64_t c = in.ci ? j : c_run;
        const acc_t g = in.g(o_dy, o_dy2, o_y, j);
        acc_t d;
        if (batch_stats) {
          const acc_t xhat = (static_cast<acc_t>(in.z[o_z + j]) - in.mean[c]) * in.invstd[c];
          d = bn_input_grad<acc_t>(g, xhat, sgp[c] * inv_m, sgxp[c] * inv_m, sp[c], true);
        } else {
          d = bn_input_grad<acc_t>(g, acc_t(0), acc_t(0), acc_t(0), sp[c], false);
        }
        dzr[j] = static_cast<scalar_t>(d);
        if (drr) drr[j] = static_cast<scalar_t>(g);
      }
    }
  });
}

void backward_apply_cpu(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                        const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& scale,
                        const at::Tensor& sum_g, const at::Tensor& sum_gxhat, bool batch_stats, const at::Tensor& dz,
                        const at::Tensor& dres) {
  if (dz.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "resfast_bn_backward_apply_cpu", [&] {
    backward_apply_impl<scalar_t>(dy, dy2, y, z, mean, invstd, scale, sum_g, sum_gxhat, batch_stats, dz, dres);
  });
}

// ------------------------------------------------------------------------------------------------------------

void running_update_cpu(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                        const at::Tensor& var_unbiased, double factor) {
  const int64_t C = running_mean.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "resfast_running_update_cpu",
                                  [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "resfast_running_update_cpu_stats", [&] {
      using acc_t = scalar_t;
      run_t* rm = running_mean.mutable_data_ptr<run_t>();
      run_t* rv = running_var.mutable_data_ptr<run_t>();
      const acc_t* bm = mean.const_data_ptr<acc_t>();
      const acc_t* bv = var_unbiased.const_data_ptr<acc_t>();
      const acc_t f = static_cast<acc_t>(factor);
      for (int64_t c = 0; c < C; ++c) {
        rm[c] = static_cast<run_t>(running_blend<acc_t>(static_cast<acc_t>(rm[c]), bm[c], f));
        rv[c] = static_cast<run_t>(running_blend<acc_t>(static_cast<acc_t>(rv[c]), bv[c], f));
      }
    });
  });
}

}  // namespace

const BnKernels& cpu_bn_kernels() {
  static const BnKernels table{&stats_cpu, &apply_cpu, &backward_reduce_cpu, &backward_apply_cpu,
                               &running_update_cpu};
  return table;
}

}  // namespace resfast
