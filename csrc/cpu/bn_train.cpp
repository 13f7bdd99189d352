// CPU kernels behind the training ops (the BnKernels contract of ../bn_train.h). The kernels themselves are in
// bn_train_kernels.h, compiled here once for the baseline ISA and once for AVX2 + FMA; cpu_bn_kernels() picks the
// copy the CPU runs (RESFAST_CPU_ISA=baseline in the environment forces the baseline one, which the tests use to
// check both copies against each other).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../bn_math.h"
#include "../bn_train.h"

namespace resfast {
namespace {

// Rows (pixels) per chunk of the channels-inner reductions: about 16K elements, small enough to stay in L2 between
// a chunk's two passes, and at least 64 rows, so that wide layers (C = 1024, 2048) do not spend their time merging
// hundreds of per-chunk partial results per channel.
inline int64_t chunk_rows(int64_t C) { return std::max<int64_t>(64, 16384 / std::max<int64_t>(C, 1)); }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

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

#define RESFAST_CPU_ISA baseline
#include "bn_train_kernels.h"
#undef RESFAST_CPU_ISA

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RESFAST_HAVE_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define RESFAST_CPU_ISA avx2
#include "bn_train_kernels.h"
#undef RESFAST_CPU_ISA
#pragma GCC pop_options
#endif

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

namespace {

bool use_avx2_copy() {
#ifdef RESFAST_HAVE_AVX2_COPY
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  // read per call (a getenv next to a kernel over a whole activation), so a test can switch copies
  const char* forced = std::getenv("RESFAST_CPU_ISA");
  return has_avx2 && !(forced != nullptr && std::strcmp(forced, "baseline") == 0);
#else
  return false;
#endif
}

}  // namespace

const char* cpu_kernel_isa() { return use_avx2_copy() ? "avx2" : "baseline"; }

const BnKernels& cpu_bn_kernels() {
  static const BnKernels baseline_table{&baseline::stats, &baseline::apply, &baseline::backward_reduce,
                                        &baseline::backward_apply, &running_update_cpu};
#ifdef RESFAST_HAVE_AVX2_COPY
  static const BnKernels avx2_table{&avx2::stats, &avx2::apply, &avx2::backward_reduce, &avx2::backward_apply,
                                    &running_update_cpu};
  if (use_avx2_copy()) return avx2_table;
#endif
  return baseline_table;
}

}  // namespace resfast
