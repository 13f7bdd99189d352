// The CPU kernels of the BnKernels contract (../bn_train.h), written once and compiled twice by bn_train.cpp: for
// the baseline x86-64 ISA and, on GCC, for AVX2 + FMA (picked at run time), each copy in its own namespace
// RESFAST_CPU_ISA. No include guard: this file is meant to be included once per ISA.
//
// How the loops are written, so that the compiler vectorizes them in either ISA:
// - every flag is a compile-time constant (with_flag), so inner loops have no per-element branches: a
//   data-dependent branch per element made the forward pass 8x slower, and the earlier branchy backward kernels
//   ran 3-15x slower than ATen's;
// - inner loops walk one contiguous run: a pixel's channels (channels inner: per-channel values come from arrays
//   indexed by the channel) or one (n, c) plane (pixels inner: per-channel values are scalars);
// - reductions over a plane keep kLanes independent partial sums (lane k sums elements k, k + kLanes, ...), which
//   vectorizes without reassociating floating-point adds (no -ffast-math): results do not depend on the ISA's
//   vector width, and they are deterministic (fixed chunks, summed in a fixed order, whatever the thread count).
//
// Statistics and backward sums accumulate in double whatever the activation dtype: with it |x| up to 1e30 in fp32
// cannot overflow a sum of squared deviations, and long sums lose nothing. Each chunk of the data (a block of
// pixels x all channels, channels inner; one (n, c) plane, pixels inner) is reduced in two passes over
// cache-resident data (the mean, then squared deviations from it); channels-inner chunks combine through the exact
// parallel-axis decomposition, the N planes of a channel with bn_math.h's weighted merge.

namespace RESFAST_CPU_ISA {

constexpr int64_t kLanes = 8;

// Rows [r0, r1) of channels-inner views (row r = pixel (n, p), p < P): f(n, p), without a division per row.
template <typename F>
inline void for_rows(int64_t r0, int64_t r1, int64_t P, F&& f) {
  int64_t n = r0 / P, p = r0 % P;
  for (int64_t r = r0; r < r1; ++r) {
    f(n, p);
    if (++p == P) {
      p = 0;
      ++n;
    }
  }
}

// Offset of element (n, c, p) of a view, for the first element of a run.
inline int64_t at_np(const ActView& v, int64_t n, int64_t p) { return n * v.sN + p * v.sP; }
inline int64_t at_nc(const ActView& v, int64_t n, int64_t c) { return n * v.sN + c * v.sC; }

// Every run of an elementwise pass, split over threads: f(n, j, c0, cs). Channels inner: run (n, pixel j), its
// elements are channels c0 + k * cs = k; pixels inner: run (n, channel j), every element is channel c0 = j (cs = 0).
// A run starts at run_at(view, ci, n, j) in each view.
template <typename F>
void for_each_run(bool ci, int64_t N, int64_t C, int64_t P, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(ci ? C : P, 1));
  if (ci) {
    at::parallel_for(0, N * P, grain, [&](int64_t b, int64_t e) {
      for_rows(b, e, P, [&](int64_t n, int64_t p) { f(n, p, int64_t(0), int64_t(1)); });
    });
  } else {
    at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) f(r / C, r % C, r % C, int64_t(0));
    });
  }
}

inline int64_t run_at(const ActView& v, bool ci, int64_t n, int64_t j) { return n * v.sN + j * (ci ? v.sP : v.sC); }

// sum of x[p] and sum of (x[p] - m)^2, p < P, in double, kLanes partial sums each
template <typename scalar_t>
inline void plane_moments(const scalar_t* __restrict__ x, int64_t P, double* mean, double* var) {
  double s[kLanes] = {0};
  int64_t p = 0;
  for (; p + kLanes <= P; p += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) s[k] += static_cast<double>(x[p + k]);
  double sum = 0;
  for (int64_t k = 0; k < kLanes; ++k) sum += s[k];
  for (; p < P; ++p) sum += static_cast<double>(x[p]);
  const double m = sum / static_cast<double>(P);
  double q[kLanes] = {0};
  for (p = 0; p + kLanes <= P; p += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) {
      const double d = static_cast<double>(x[p + k]) - m;
      q[k] += d * d;
    }
  double sq = 0;
  for (int64_t k = 0; k < kLanes; ++k) sq += q[k];
  for (; p < P; ++p) {
    const double d = static_cast<double>(x[p]) - m;
    sq += d * d;
  }
  *mean = m;
  *var = sq / static_cast<double>(P);
}

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
    const int64_t rows = chunk_rows(C);
    const int64_t chunks = (M + rows - 1) / rows;
    // per chunk and channel: the mean and the sum of squared deviations from it
    std::vector<double> part_mean(chunks * C), part_m2(chunks * C);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t r0 = k * rows, r1 = std::min(M, r0 + rows);
        const double n = static_cast<double>(r1 - r0);
        double* __restrict__ mc = part_mean.data() + k * C;
        double* __restrict__ q = part_m2.data() + k * C;
        std::fill(mc, mc + C, 0.0);
        for_rows(r0, r1, P, [&](int64_t i, int64_t p) {
          const scalar_t* __restrict__ row = zp + at_np(v, i, p);
          for (int64_t c = 0; c < C; ++c) mc[c] += static_cast<double>(row[c]);
        });
        for (int64_t c = 0; c < C; ++c) mc[c] /= n;
        std::fill(q, q + C, 0.0);
        for_rows(r0, r1, P, [&](int64_t i, int64_t p) {
          const scalar_t* __restrict__ row = zp + at_np(v, i, p);
          for (int64_t c = 0; c < C; ++c) {
            const double d = static_cast<double>(row[c]) - mc[c];
            q[c] += d * d;
          }
        });
      }
    });
    // The chunks combine exactly (the parallel-axis decomposition, in double, no sequential merges with a division
    // and a square root per chunk and channel): mean = sum n_k mean_k / M, M2 = sum M2_k + n_k (mean_k - mean)^2.
    std::vector<double> tm(C, 0.0), tq(C, 0.0);
    for (int64_t k = 0; k < chunks; ++k) {
      const double nk = static_cast<double>(std::min(M, (k + 1) * rows) - k * rows);
      const double* __restrict__ mc = part_mean.data() + k * C;
      for (int64_t c = 0; c < C; ++c) tm[c] += nk * mc[c];
    }
    for (int64_t c = 0; c < C; ++c) tm[c] /= static_cast<double>(M);
    for (int64_t k = 0; k < chunks; ++k) {
      const double nk = static_cast<double>(std::min(M, (k + 1) * rows) - k * rows);
      const double* __restrict__ mc = part_mean.data() + k * C;
      const double* __restrict__ q = part_m2.data() + k * C;
      for (int64_t c = 0; c < C; ++c) {
        const double d = mc[c] - tm[c];
        tq[c] += q[c] + nk * d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) per_channel[c] = {M, tm[c], tq[c] / static_cast<double>(M)};
  } else {
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        for (int64_t n = 0; n < v.N; ++n) {
          double m, var;
          plane_moments(zp + at_nc(v, n, c), P, &m, &var);
          per_channel[c] = merge_moments(per_channel[c], Moments<double>{P, m, var});
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

// ------------------------------------------------------------------------------------------------------------
// fused forward: out = relu?((z - mean) * scale + shift + residual); next = out + addend

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
  const int64_t len = ci ? C : P;
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
        // one run: `len` elements at offsets oz.. of each tensor; per-channel values m[j * cs] (cs = 1: channels
        // inner, the channel is j; cs = 0: one channel for the whole run)
        auto run = [&](int64_t oz, int64_t oo, int64_t orr, int64_t oa, int64_t on, const acc_t* __restrict__ m,
                       const acc_t* __restrict__ sc, const acc_t* __restrict__ sh, int64_t cs) {
          const scalar_t* __restrict__ zr = zp + oz;
          scalar_t* __restrict__ orow = op + oo;
          const scalar_t* __restrict__ rr = kRes ? rp + orr : nullptr;
          const scalar_t* __restrict__ ar = kNext ? ap + oa : nullptr;
          scalar_t* __restrict__ nr = kNext ? np + on : nullptr;
          for (int64_t j = 0; j < len; ++j) {
            const acc_t v = bn_forward_value<acc_t>(static_cast<acc_t>(zr[j]), m[j * cs], sc[j * cs], sh[j * cs],
                                                    kRes ? static_cast<acc_t>(rr[j]) : acc_t(0), kRelu);
            const scalar_t o = static_cast<scalar_t>(v);
            orow[j] = o;
            if constexpr (decltype(kNext)::value) {
              nr[j] = static_cast<scalar_t>(static_cast<acc_t>(o) + static_cast<acc_t>(ar[j]));
            }
          }
        };
        for_each_run(ci, vz.N, C, P, [&](int64_t n, int64_t j, int64_t c0, int64_t cs) {
          run(run_at(vz, ci, n, j), run_at(vo, ci, n, j), run_at(vr, ci, n, j), run_at(va, ci, n, j),
              run_at(vn, ci, n, j), mv.data() + c0, sv.data() + c0, bv.data() + c0, cs);
        });
      });
    });
  });
}

// ------------------------------------------------------------------------------------------------------------
// backward

// The per-element inputs of the backward passes, resolved once per call.
template <typename scalar_t>
struct GradInputs {
  ActView vdy, vdy2, vy, vz;
  bool ci;
  const scalar_t *dy, *dy2, *y, *z;

  GradInputs(const at::Tensor& dy_, const at::Tensor& dy2_, const at::Tensor& y_, const at::Tensor& z_,
             std::initializer_list<ActView> outs) {
    vz = act_view(z_);
    vdy = act_view(dy_);
    vdy2 = dy2_.defined() ? act_view(dy2_) : vz;
    vy = y_.defined() ? act_view(y_) : vz;
    bool all_ci = true, all_pi = true;
    for (const ActView* v : {&vz, &vdy, &vdy2, &vy}) {
      all_ci = all_ci && v->sC == 1;
      all_pi = all_pi && v->sP == 1;
    }
    for (const auto& v : outs) {
      all_ci = all_ci && v.sC == 1;
      all_pi = all_pi && v.sP == 1;
    }
    TORCH_CHECK(all_ci || all_pi,
                "resfast: internal error: the backward's tensors mix channels-inner and pixels-inner layouts");
    ci = all_ci && !(all_pi && vz.P > 1);
    dy = dy_.const_data_ptr<scalar_t>();
    dy2 = ptr_or_null<scalar_t>(dy2_);
    y = ptr_or_null<scalar_t>(y_);
    z = ptr_or_null<scalar_t>(z_);
  }
};

// g = (dy + dy2) masked by y > 0, with the flags as constants
template <bool kDy2, bool kMask, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t grad_at(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ dy2,
                     const scalar_t* __restrict__ y, int64_t j) {
  return masked_grad<acc_t>(static_cast<acc_t>(dy[j]), kDy2 ? static_cast<acc_t>(dy2[j]) : acc_t(0), kMask,
                            kMask ? static_cast<acc_t>(y[j]) : acc_t(0));
}

template <typename scalar_t>
void backward_reduce_impl(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                          const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_g,
                          const at::Tensor& sum_gxhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const GradInputs<scalar_t> in(dy, dy2, y, z, {});
  const int64_t C = in.vz.C, P = in.vz.P, N = in.vz.N;
  // sum_gxhat = invstd * sum of g * (z - mean): the deviations summed, scaled once per channel
  std::vector<double> mean_d(C), sg(C, 0.0), sgd(C, 0.0);
  for (int64_t c = 0; c < C; ++c) mean_d[c] = static_cast<double>(mean.const_data_ptr<acc_t>()[c]);
  with_flag(in.dy2 != nullptr, [&](auto kDy2) {
    with_flag(in.y != nullptr, [&](auto kMask) {
      constexpr bool d2 = decltype(kDy2)::value, mk = decltype(kMask)::value;
      if (in.ci) {
        const int64_t rows = chunk_rows(C);
        const int64_t M = N * P, chunks = (M + rows - 1) / rows;
        std::vector<double> part_g(chunks * C, 0.0), part_gd(chunks * C, 0.0);
        at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
          const double* __restrict__ md = mean_d.data();
          for (int64_t k = b; k < e; ++k) {
            double* __restrict__ pg = part_g.data() + k * C;
            double* __restrict__ pgd = part_gd.data() + k * C;
            for_rows(k * rows, std::min(M, (k + 1) * rows), P, [&](int64_t n, int64_t p) {
              const scalar_t* __restrict__ dyr = in.dy + at_np(in.vdy, n, p);
              const scalar_t* __restrict__ dy2r = d2 ? in.dy2 + at_np(in.vdy2, n, p) : nullptr;
              const scalar_t* __restrict__ yr = mk ? in.y + at_np(in.vy, n, p) : nullptr;
              const scalar_t* __restrict__ zr = in.z + at_np(in.vz, n, p);
              for (int64_t c = 0; c < C; ++c) {
                const double g = static_cast<double>(grad_at<d2, mk>(dyr, dy2r, yr, c));
                pg[c] += g;
                pgd[c] += g * (static_cast<double>(zr[c]) - md[c]);
              }
            });
          }
        });
        for (int64_t k = 0; k < chunks; ++k)
          for (int64_t c = 0; c < C; ++c) {
            sg[c] += part_g[k * C + c];
            sgd[c] += part_gd[k * C + c];
          }
      } else {
        at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
          for (int64_t c = b; c < e; ++c) {
            const double m = mean_d[c];
            double lg[kLanes] = {0}, lgd[kLanes] = {0};
            double tg = 0, tgd = 0;  // the tails
            for (int64_t n = 0; n < N; ++n) {
              const scalar_t* __restrict__ dyr = in.dy + at_nc(in.vdy, n, c);
              const scalar_t* __restrict__ dy2r = d2 ? in.dy2 + at_nc(in.vdy2, n, c) : nullptr;
              const scalar_t* __restrict__ yr = mk ? in.y + at_nc(in.vy, n, c) : nullptr;
              const scalar_t* __restrict__ zr = in.z + at_nc(in.vz, n, c);
              int64_t p = 0;
              for (; p + kLanes <= P; p += kLanes)
                // kept a loop (not unrolled into straight-line code, which does not vectorize with the mask)
#pragma GCC unroll 1
                for (int64_t l = 0; l < kLanes; ++l) {
                  const double g = static_cast<double>(grad_at<d2, mk>(dyr, dy2r, yr, p + l));
                  lg[l] += g;
                  lgd[l] += g * (static_cast<double>(zr[p + l]) - m);
                }
              for (; p < P; ++p) {
                const double g = static_cast<double>(grad_at<d2, mk>(dyr, dy2r, yr, p));
                tg += g;
                tgd += g * (static_cast<double>(zr[p]) - m);
              }
            }
            for (int64_t l = 0; l < kLanes; ++l) {
              tg += lg[l];
              tgd += lgd[l];
            }
            sg[c] = tg;
            sgd[c] = tgd;
          }
        });
      }
    });
  });
  acc_t* gp = sum_g.mutable_data_ptr<acc_t>();
  acc_t* gxp = sum_gxhat.mutable_data_ptr<acc_t>();
  const acc_t* isp = invstd.const_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    gp[c] = static_cast<acc_t>(sg[c]);
    gxp[c] = static_cast<acc_t>(sgd[c] * static_cast<double>(isp[c]));
  }
}

template <typename scalar_t>
void backward_apply_impl(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                         const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& scale,
                         const at::Tensor& sum_g, const at::Tensor& sum_gxhat, bool batch_stats,
                         const at::Tensor& dz, const at::Tensor& dres) {
  using acc_t = at::opmath_type<scalar_t>;
  const ActView vdz = act_view(dz);
  const ActView vdr = dres.defined() ? act_view(dres) : vdz;
  const GradInputs<scalar_t> in(dy, dy2, y, z, {vdz, vdr});
  const int64_t C = in.vz.C, P = in.vz.P;
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(in.vz.N * P);
  // per channel: the mean of g and of g * xhat (batch statistics), as bn_input_grad takes them
  const auto sv = channel_values<acc_t>(scale, C, acc_t(1));
  auto mg = channel_values<acc_t>(batch_stats ? sum_g : at::Tensor(), C, acc_t(0));
  auto mgx = channel_values<acc_t>(batch_stats ? sum_gxhat : at::Tensor(), C, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    mg[c] *= inv_m;
    mgx[c] *= inv_m;
  }
  const auto mv = channel_values<acc_t>(batch_stats ? mean : at::Tensor(), C, acc_t(0));
  const auto iv = channel_values<acc_t>(batch_stats ? invstd : at::Tensor(), C, acc_t(0));
  scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
  scalar_t* drp = dres.defined() ? dres.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t len = in.ci ? C : P;
  with_flag(in.dy2 != nullptr, [&](auto kDy2) {
    with_flag(in.y != nullptr, [&](auto kMask) {
      with_flag(batch_stats, [&](auto kBatch) {
        with_flag(drp != nullptr, [&](auto kRes) {
          constexpr bool d2 = decltype(kDy2)::value, mk = decltype(kMask)::value;
          // one run of `len` elements; per-channel arrays indexed j * cs (cs = 1: channels inner; 0: one channel)
          auto run = [&](int64_t ody, int64_t ody2, int64_t oy, int64_t oz, int64_t odz, int64_t odr, int64_t c0,
                         int64_t cs) {
            const scalar_t* __restrict__ dyr = in.dy + ody;
            const scalar_t* __restrict__ dy2r = d2 ? in.dy2 + ody2 : nullptr;
            const scalar_t* __restrict__ yr = mk ? in.y + oy : nullptr;
            const scalar_t* __restrict__ zr = kBatch ? in.z + oz : nullptr;
            scalar_t* __restrict__ dzr = dzp + odz;
            scalar_t* __restrict__ drr = kRes ? drp + odr : nullptr;
            const acc_t* __restrict__ s = sv.data() + c0;
            const acc_t* __restrict__ m = mv.data() + c0;
            const acc_t* __restrict__ is = iv.data() + c0;
            const acc_t* __restrict__ a = mg.data() + c0;
            const acc_t* __restrict__ ax = mgx.data() + c0;
            for (int64_t j = 0; j < len; ++j) {
              const int64_t i = j * cs;
              const acc_t g = grad_at<d2, mk>(dyr, dy2r, yr, j);
              const acc_t xhat = kBatch ? (static_cast<acc_t>(zr[j]) - m[i]) * is[i] : acc_t(0);
              dzr[j] = static_cast<scalar_t>(bn_input_grad<acc_t>(g, xhat, a[i], ax[i], s[i], kBatch));
              if constexpr (decltype(kRes)::value) drr[j] = static_cast<scalar_t>(g);
            }
          };
          for_each_run(in.ci, in.vz.N, C, P, [&](int64_t n, int64_t j, int64_t c0, int64_t cs) {
            run(run_at(in.vdy, in.ci, n, j), run_at(in.vdy2, in.ci, n, j), run_at(in.vy, in.ci, n, j),
                run_at(in.vz, in.ci, n, j), run_at(vdz, in.ci, n, j), run_at(vdr, in.ci, n, j), c0, cs);
          });
        });
      });
    });
  });
}

// ------------------------------------------------------------------------------------------------------------

void stats(const at::Tensor& z, double eps, const at::Tensor& mean, const at::Tensor& invstd,
           const at::Tensor& var_unbiased) {
  if (z.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "resfast_bn_stats_cpu",
                                  [&] { stats_impl<scalar_t>(z, eps, mean, invstd, var_unbiased); });
}

void apply(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
           const at::Tensor& residual, bool relu, const at::Tensor& out, const at::Tensor& addend,
           const at::Tensor& next) {
  if (z.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "resfast_bn_apply_cpu", [&] {
    apply_impl<scalar_t>(z, mean, scale, shift, residual, relu, out, addend, next);
  });
}

void backward_reduce(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
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

void backward_apply(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& scale,
                    const at::Tensor& sum_g, const at::Tensor& sum_gxhat, bool batch_stats, const at::Tensor& dz,
                    const at::Tensor& dres) {
  if (dz.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "resfast_bn_backward_apply_cpu", [&] {
    backward_apply_impl<scalar_t>(dy, dy2, y, z, mean, invstd, scale, sum_g, sum_gxhat, batch_stats, dz, dres);
  });
}

}  // namespace RESFAST_CPU_ISA
