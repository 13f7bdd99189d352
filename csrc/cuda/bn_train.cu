// CUDA implementation of the training BatchNorm kernels (contract: csrc/bn_train.h; arithmetic: csrc/bn_math.h,
// shared with the CPU kernels so both devices evaluate the same formulas).
//
// Layout. Every activation is seen as lines of contiguous elements (inner stride 1): channels inner, a line is
// one pixel's C channels and element (n, c, p) sits at n * sN + p * sP + c; pixels inner, a line is one (n, c)
// plane of P pixels at n * sN + c * sC + p. Each tensor of a call keeps its own (sN, sP) or (sN, sC), so slices of
// larger tensors need no copies. In both kinds an element is addressed as (a, b, i) -> a * sa + b * sb + i with
// (a, b, i) = (n, p, c) or (n, c, p). All index arithmetic is int64 (a tensor may pass 2^31 elements).
//
// Reductions (stats, backward_reduce) run in two deterministic levels: a reduce kernel whose blocks each write one
// partial per (chunk = blockIdx.x, channel) into a workspace, then a finalize kernel with one thread per channel
// that combines the chunks in order. No atomics: the result depends only on the shape and the SM count.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../bn_math.h"
#include "../bn_train.h"

#ifdef RESFAST_WITH_CUDA

namespace resfast {
namespace {

// ------------------------------------------------------------------------------------------------------------
// Shared pieces

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int kThreads = 256;  // every 1-D block; also kLanes * kRows
constexpr int kLanes = 32;     // channels-inner reduction: channels per block (one warp reads 32 adjacent values)
constexpr int kRows = 8;       // channels-inner reduction: pixel rows per block

// An activation: element (a, b, i) at ptr[a * sa + b * sb + i]; ptr == nullptr for an absent optional tensor.
template <typename T>
struct Act {
  T* ptr;
  int64_t sa, sb;
  __device__ __forceinline__ int64_t off(int64_t a, int64_t b, int64_t i) const { return a * sa + b * sb + i; }
};

// V consecutive elements, aligned to their whole size so that V * sizeof(T) == 16 compiles to one 128-bit access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& x) {
  *reinterpret_cast<Pack<T, V>*>(p) = x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t chan_or(const acc_t* p, int64_t c, acc_t absent) {
  return p != nullptr ? p[c] : absent;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// How many blocks of `kernel` fill the current device once: more would only add a partially filled wave (and, for
// the reductions, more partials), fewer would leave SMs idle.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return sm_count() * std::max(per_sm, 1);
}

// ------------------------------------------------------------------------------------------------------------
// Host-side argument checks and views

ActView view_checked(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                     const ActView& rv) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              ref.scalar_type());
  const ActView v = act_view(t);
  TORCH_CHECK(v.N == rv.N && v.C == rv.C && v.P == rv.P, op, ": ", name, " has shape ", t.sizes(),
              ", expected the (N, C, H, W) of ", ref.sizes());
  return v;
}

void check_required(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is required");
}

// Per-channel tensors are read as plain (C,) arrays of the accumulation dtype.
void check_channel(const at::Tensor& t, const char* op, const char* name, int64_t C, at::ScalarType acc,
                   const at::Device& dev) {
  if (!t.defined()) return;
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), ", expected ", dev);
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", acc);
  TORCH_CHECK(t.numel() == C && t.is_contiguous(), op, ": ", name, " must be a contiguous (", C,
              ",) tensor, got sizes ", t.sizes(), " strides ", t.strides());
}

// The kind's inner stride must be 1 for every view (common_inner promises it; a wrong kind would read garbage).
void check_inner(const ActView& v, Inner kind, const char* op) {
  TORCH_CHECK(kind == Inner::Channels ? v.sC == 1 : v.sP == 1, op, ": internal error, a view of the chosen kind ",
              "has a non-unit inner stride");
}

template <typename T>
Act<T> make_act(T* ptr, const ActView& v, Inner kind) {
  return {ptr, v.sN, kind == Inner::Channels ? v.sP : v.sC};
}

// Whether the 16-byte path may run: every access (a * sa + b * sb + i0, i0 a multiple of V) must be V-aligned,
// i.e. the base pointer is 16-byte aligned and sa, sb are multiples of V. A dimension of size 1 has index 0 only,
// so its stride does not matter (act_view reports 1 for it).
struct VectorCheck {
  Inner kind;
  int64_t V;
  bool ok;
  void add(const at::Tensor& t, const ActView& v) {
    if (!t.defined()) return;
    const bool aligned = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
    const bool sn = v.N == 1 || v.sN % V == 0;
    const bool sb = kind == Inner::Channels ? (v.P == 1 || v.sP % V == 0) : (v.C == 1 || v.sC % V == 0);
    ok = ok && aligned && sn && sb;
  }
};

// ------------------------------------------------------------------------------------------------------------
// Elementwise walk: unit u in [0, lines * Lv), Lv = L / V units of V elements per line. Line l = (a, b) with
// b in [0, D): (n, p), D = P channels inner; (n, c), D = C pixels inner. A thread advances by a fixed grid stride,
// so its (l, j) and (a, b) positions advance by constants with one carry each: no 64-bit division per element.

struct Walk {
  int64_t total, Lv, D, step, step_j, step_a, step_b;
};

template <typename Op, bool kChannelsInner, int V>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(const Op op, const Walk w) {
  int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= w.total) return;
  const int64_t l = u / w.Lv;
  int64_t j = u - l * w.Lv;
  int64_t a = l / w.D;
  int64_t b = l - a * w.D;
  for (; u < w.total; u += w.step) {
    op.template unit<kChannelsInner, V>(a, b, j * V);
    // step_j < Lv and step_b < D, so one conditional subtraction per level keeps j < Lv and b < D
    j += w.step_j;
    const int64_t carry = j >= w.Lv ? 1 : 0;
    j -= carry * w.Lv;
    b += w.step_b + carry;
    a += w.step_a;
    if (b >= w.D) {
      b -= w.D;
      ++a;
    }
  }
}

template <bool kChannelsInner, int V, typename Op>
void launch_walk(const Op& op, const ActView& v, cudaStream_t stream) {
  const int64_t L = kChannelsInner ? v.C : v.P;
  Walk w;
  w.D = kChannelsInner ? v.P : v.C;
  w.Lv = L / V;
  w.total = v.N * w.D * w.Lv;
  const int64_t blocks = std::min(ceil_div(w.total, kThreads), sm_count() * 32);
  w.step = blocks * kThreads;
  const int64_t step_l = w.step / w.Lv;
  w.step_j = w.step % w.Lv;
  w.step_a = step_l / w.D;
  w.step_b = step_l % w.D;
  elementwise_kernel<Op, kChannelsInner, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int kVec, typename Op>
void launch_elementwise(const Op& op, Inner kind, bool vectorize, const ActView& v, cudaStream_t stream) {
  if (kind == Inner::Channels) {
    if (vectorize) launch_walk<true, kVec>(op, v, stream);
    else launch_walk<true, 1>(op, v, stream);
  } else {
    if (vectorize) launch_walk<false, kVec>(op, v, stream);
    else launch_walk<false, 1>(op, v, stream);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Two-level reductions. An Op provides State (trivial, for shared memory), identity(), combine(a, b), channel(c)
// (its per-channel constants, hoisted out of the element loop), add(state, chan, a, b, i), and the partial
// workspace: store_partial(idx, s), load_partial(idx), finish(c, s), with idx = chunk * C + c.

// Channels inner: a (kLanes x kRows) block reads kLanes adjacent channels of kRows pixel rows at a time; blockIdx.y
// walks channel tiles (grid-strided past the 65535 limit), blockIdx.x is the chunk of rows (grid-strided over M).
template <typename Op>
__global__ void __launch_bounds__(kLanes * kRows)
    reduce_channels_inner_kernel(const Op op, int64_t M, int64_t C, int64_t P, int64_t step_n, int64_t step_p) {
  using State = typename Op::State;
  __shared__ State sm[kRows][kLanes];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows + ty;
  const int64_t rstep = static_cast<int64_t>(gridDim.x) * kRows;
  const int64_t n0 = r0 / P, p0 = r0 - n0 * P;
  for (int64_t tile = blockIdx.y; tile * kLanes < C; tile += gridDim.y) {  // uniform over the block
    const int64_t c = tile * kLanes + tx;
    State s = Op::identity();
    if (c < C) {
      const auto ch = op.channel(c);
      int64_t n = n0, p = p0;
      for (int64_t r = r0; r < M; r += rstep) {
        op.add(s, ch, n, p, c);
        p += step_p;  // step_p < P: one carry
        n += step_n;
        if (p >= P) {
          p -= P;
          ++n;
        }
      }
    }
    sm[ty][tx] = s;
    __syncthreads();
    for (int h = kRows / 2; h > 0; h >>= 1) {
      if (ty < h) sm[ty][tx] = Op::combine(sm[ty][tx], sm[ty + h][tx]);
      __syncthreads();
    }
    // Only thread (0, tx) reads sm[0][tx] after the last barrier, and only it writes that slot in the next tile;
    // every other slot was last read before that barrier, so the next tile needs no extra barrier.
    if (ty == 0 && c < C) op.store_partial(static_cast<int64_t>(blockIdx.x) * C + c, sm[0][tx]);
  }
}

// Pixels inner: a 1-D block walks one channel's M values as a flat index m = n * P + p (so neither a small P nor a
// small N starves the block); blockIdx.y walks channels (grid-strided past 65535), blockIdx.x is the chunk.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    reduce_pixels_inner_kernel(const Op op, int64_t M, int64_t C, int64_t P, int64_t step_n, int64_t step_p) {
  using State = typename Op::State;
  __shared__ State sm[kThreads];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kThreads + tid;
  const int64_t mstep = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t n0 = m0 / P, p0 = m0 - n0 * P;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {  // uniform over the block
    State s = Op::identity();
    const auto ch = op.channel(c);
    int64_t n = n0, p = p0;
    for (int64_t m = m0; m < M; m += mstep) {
      op.add(s, ch, n, c, p);
      p += step_p;  // step_p < P: one carry
      n += step_n;
      if (p >= P) {
        p -= P;
        ++n;
      }
    }
    sm[tid] = s;
    __syncthreads();
    for (int h = kThreads / 2; h > 0; h >>= 1) {
      if (tid < h) sm[tid] = Op::combine(sm[tid], sm[tid + h]);
      __syncthreads();
    }
    // As above: after the last barrier only thread 0 reads, and only its own slot.
    if (tid == 0) op.store_partial(static_cast<int64_t>(blockIdx.x) * C + c, sm[0]);
  }
}

// One thread per channel combines the chunks in chunk order (fixed order: reproducible results).
template <typename Op>
__global__ void __launch_bounds__(kThreads) reduce_finalize_kernel(const Op op, int64_t chunks, int64_t C) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += stride) {
    typename Op::State s = Op::identity();
    for (int64_t k = 0; k < chunks; ++k) s = Op::combine(s, op.load_partial(k * C + c));
    op.finish(c, s);
  }
}

// Grid of a reduction: enough blocks to fill the device once, never more chunks than there are rows (channels
// inner) or kThreads-runs of values (pixels inner), so every chunk sees at least one value. Every (chunk, c) with
// c < C gets its partial written (the y loops cover all tiles / channels for every blockIdx.x).
struct ReducePlan {
  dim3 grid, block;
  int64_t chunks, step_n, step_p;
};

template <typename Op>
ReducePlan plan_reduction(Inner kind, int64_t M, int64_t C, int64_t P) {
  ReducePlan plan;
  int64_t ys, per_chunk, fill;
  if (kind == Inner::Channels) {
    plan.block = dim3(kLanes, kRows);
    ys = ceil_div(C, kLanes);
    per_chunk = kRows;
    fill = resident_blocks(reduce_channels_inner_kernel<Op>, kLanes * kRows);
  } else {
    plan.block = dim3(kThreads);
    ys = C;
    per_chunk = kThreads;
    fill = resident_blocks(reduce_pixels_inner_kernel<Op>, kThreads);
  }
  const int64_t gy = std::min<int64_t>(ys, 65535);
  plan.chunks = std::max<int64_t>(1, std::min(ceil_div(fill, gy), ceil_div(M, per_chunk)));
  plan.grid = dim3(static_cast<unsigned>(plan.chunks), static_cast<unsigned>(gy));
  const int64_t step = plan.chunks * per_chunk;
  plan.step_n = step / P;
  plan.step_p = step % P;
  return plan;
}

template <typename Op>
void launch_reduction(const Op& op, Inner kind, const ReducePlan& plan, int64_t M, int64_t C, int64_t P,
                      cudaStream_t stream) {
  if (kind == Inner::Channels) {
    reduce_channels_inner_kernel<Op><<<plan.grid, plan.block, 0, stream>>>(op, M, C, P, plan.step_n, plan.step_p);
  } else {
    reduce_pixels_inner_kernel<Op><<<plan.grid, plan.block, 0, stream>>>(op, M, C, P, plan.step_n, plan.step_p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t blocks = std::min(ceil_div(C, kThreads), sm_count() * 32);
  reduce_finalize_kernel<Op><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, plan.chunks, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------------------------
// stats: Moments per thread (add_value), merged per block and across chunks (merge_moments). No sum of squares:
// every intermediate stays within the data's magnitude and spread (see bn_math.h).

struct NoChannel {};

template <typename scalar_t, typename acc_t>
struct StatsOp {
  using State = Moments<acc_t>;
  Act<const scalar_t> z;
  acc_t* part_mean;
  acc_t* part_var;
  int64_t* part_n;
  acc_t* mean;
  acc_t* invstd;
  acc_t* var_unbiased;
  acc_t eps;

  __device__ static State identity() { return State{0, acc_t(0), acc_t(0)}; }
  __device__ static State combine(const State& a, const State& b) { return merge_moments(a, b); }
  __device__ NoChannel channel(int64_t) const { return {}; }
  __device__ void add(State& s, NoChannel, int64_t a, int64_t b, int64_t i) const {
    add_value(s, static_cast<acc_t>(z.ptr[z.off(a, b, i)]));
  }
  __device__ void store_partial(int64_t idx, const State& s) const {
    part_n[idx] = s.n;
    part_mean[idx] = s.mean;
    part_var[idx] = s.var;
  }
  __device__ State load_partial(int64_t idx) const { return State{part_n[idx], part_mean[idx], part_var[idx]}; }
  __device__ void finish(int64_t c, const State& s) const {
    finalize_moments(s, eps, mean + c, invstd + c, var_unbiased + c);
  }
};

void stats_cuda(const at::Tensor& z, double eps, const at::Tensor& mean, const at::Tensor& invstd,
                const at::Tensor& var_unbiased) {
  const char* op = "bn_train stats (CUDA)";
  check_required(z, op, "z");
  check_required(mean, op, "mean");
  check_required(invstd, op, "invstd");
  check_required(var_unbiased, op, "var_unbiased");
  TORCH_CHECK(z.is_cuda(), op, ": z is on ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const ActView v = act_view(z);
  const Inner kind = common_inner({v});
  check_inner(v, kind, op);
  const auto acc = acc_type(z.scalar_type());
  check_channel(mean, op, "mean", v.C, acc, z.device());
  check_channel(invstd, op, "invstd", v.C, acc, z.device());
  check_channel(var_unbiased, op, "var_unbiased", v.C, acc, z.device());
  const int64_t M = v.N * v.P;
  // M == 0: no statistics exist (the contract requires M > 0); the outputs are left untouched, as the running
  // buffers are for an empty batch.
  if (M == 0 || v.C == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "resfast_bn_stats_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    using Op = StatsOp<scalar_t, acc_t>;
    const ReducePlan plan = plan_reduction<Op>(kind, M, v.C, v.P);
    const int64_t parts = plan.chunks * v.C;
    auto part_acc = at::empty({2 * parts}, z.options().dtype(acc));
    auto part_n = at::empty({parts}, z.options().dtype(at::kLong));
    Op o;
    o.z = make_act(z.const_data_ptr<scalar_t>(), v, kind);
    o.part_mean = part_acc.mutable_data_ptr<acc_t>();
    o.part_var = o.part_mean + parts;
    o.part_n = part_n.mutable_data_ptr<int64_t>();
    o.mean = mean.mutable_data_ptr<acc_t>();
    o.invstd = invstd.mutable_data_ptr<acc_t>();
    o.var_unbiased = var_unbiased.mutable_data_ptr<acc_t>();
    o.eps = static_cast<acc_t>(eps);
    launch_reduction(o, kind, plan, M, v.C, v.P, stream);
  });
}

// ------------------------------------------------------------------------------------------------------------
// backward_reduce: plain sums of g and g * xhat in the accumulation dtype (the values are gradients, bounded in
// practice; the two-level tree keeps each partial sum short).

template <typename acc_t>
struct GradSums {
  acc_t g, gx;
};

template <typename acc_t>
struct NormChannel {
  acc_t mean, invstd;
};

template <typename scalar_t, typename acc_t>
struct GradSumsOp {
  using State = GradSums<acc_t>;
  Act<const scalar_t> dy, dy2, y, z;
  const acc_t* mean;
  const acc_t* invstd;
  acc_t* part_g;
  acc_t* part_gx;
  acc_t* sum_g;
  acc_t* sum_gxhat;

  __device__ static State identity() { return State{acc_t(0), acc_t(0)}; }
  __device__ static State combine(const State& a, const State& b) { return State{a.g + b.g, a.gx + b.gx}; }
  __device__ NormChannel<acc_t> channel(int64_t c) const { return {mean[c], invstd[c]}; }
  __device__ void add(State& s, const NormChannel<acc_t>& ch, int64_t a, int64_t b, int64_t i) const {
    // dy2 / y presence is uniform over the launch: these branches never diverge
    const acc_t d2 = dy2.ptr != nullptr ? static_cast<acc_t>(dy2.ptr[dy2.off(a, b, i)]) : acc_t(0);
    const acc_t yv = y.ptr != nullptr ? static_cast<acc_t>(y.ptr[y.off(a, b, i)]) : acc_t(0);
    const acc_t g = masked_grad(static_cast<acc_t>(dy.ptr[dy.off(a, b, i)]), d2, y.ptr != nullptr, yv);
    const acc_t xhat = (static_cast<acc_t>(z.ptr[z.off(a, b, i)]) - ch.mean) * ch.invstd;
    s.g += g;
    s.gx += g * xhat;
  }
  __device__ void store_partial(int64_t idx, const State& s) const {
    part_g[idx] = s.g;
    part_gx[idx] = s.gx;
  }
  __device__ State load_partial(int64_t idx) const { return State{part_g[idx], part_gx[idx]}; }
  __device__ void finish(int64_t c, const State& s) const {
    sum_g[c] = s.g;
    sum_gxhat[c] = s.gx;
  }
};

void backward_reduce_cuda(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                          const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_g,
                          const at::Tensor& sum_gxhat) {
  const char* op = "bn_train backward_reduce (CUDA)";
  check_required(dy, op, "dy");
  check_required(z, op, "z");
  check_required(mean, op, "mean");
  check_required(invstd, op, "invstd");
  check_required(sum_g, op, "sum_g");
  check_required(sum_gxhat, op, "sum_gxhat");
  TORCH_CHECK(dy.is_cuda(), op, ": dy is on ", dy.device());
  const c10::cuda::CUDAGuard guard(dy.device());
  const ActView vdy = act_view(dy);
  const ActView vz = view_checked(z, op, "z", dy, vdy);
  const ActView vdy2 = dy2.defined() ? view_checked(dy2, op, "dy2", dy, vdy) : vdy;
  const ActView vy = y.defined() ? view_checked(y, op, "y", dy, vdy) : vdy;
  const Inner kind = common_inner({vdy, vz, vdy2, vy});
  for (const ActView& v : {vdy, vz, vdy2, vy}) check_inner(v, kind, op);
  const auto acc = acc_type(dy.scalar_type());
  const int64_t C = vdy.C;
  check_channel(mean, op, "mean", C, acc, dy.device());
  check_channel(invstd, op, "invstd", C, acc, dy.device());
  check_channel(sum_g, op, "sum_g", C, acc, dy.device());
  check_channel(sum_gxhat, op, "sum_gxhat", C, acc, dy.device());
  const int64_t M = vdy.N * vdy.P;
  if (C == 0) return;
  if (M == 0) {  // sums over nothing
    sum_g.zero_();
    sum_gxhat.zero_();
    return;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "resfast_bn_backward_reduce_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    using Op = GradSumsOp<scalar_t, acc_t>;
    const ReducePlan plan = plan_reduction<Op>(kind, M, C, vdy.P);
    const int64_t parts = plan.chunks * C;
    auto part = at::empty({2 * parts}, dy.options().dtype(acc));
    Op o;
    o.dy = make_act(dy.const_data_ptr<scalar_t>(), vdy, kind);
    o.dy2 = dy2.defined() ? make_act(dy2.const_data_ptr<scalar_t>(), vdy2, kind) : Act<const scalar_t>{nullptr, 0, 0};
    o.y = y.defined() ? make_act(y.const_data_ptr<scalar_t>(), vy, kind) : Act<const scalar_t>{nullptr, 0, 0};
    o.z = make_act(z.const_data_ptr<scalar_t>(), vz, kind);
    o.mean = mean.const_data_ptr<acc_t>();
    o.invstd = invstd.const_data_ptr<acc_t>();
    o.part_g = part.mutable_data_ptr<acc_t>();
    o.part_gx = o.part_g + parts;
    o.sum_g = sum_g.mutable_data_ptr<acc_t>();
    o.sum_gxhat = sum_gxhat.mutable_data_ptr<acc_t>();
    launch_reduction(o, kind, plan, M, C, vdy.P, stream);
  });
}

// ------------------------------------------------------------------------------------------------------------
// apply: out = relu?((z - mean) * scale + shift + residual); next = out (rounded) + addend. Every input of a unit
// is loaded before any output is stored, so an output may alias an input element for element (in place).

template <typename scalar_t, typename acc_t>
struct ApplyOp {
  Act<const scalar_t> z, residual, addend;
  Act<scalar_t> out, next;
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  bool relu;

  template <bool kChannelsInner, int V>
  __device__ __forceinline__ void unit(int64_t a, int64_t b, int64_t i0) const {
    using PackT = Pack<scalar_t, V>;
    const PackT zv = load_pack<V>(z.ptr + z.off(a, b, i0));
    PackT rv, av;
    if (residual.ptr != nullptr) rv = load_pack<V>(residual.ptr + residual.off(a, b, i0));
    if (next.ptr != nullptr) av = load_pack<V>(addend.ptr + addend.off(a, b, i0));
    PackT ov, nv;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = kChannelsInner ? i0 + k : b;
      const acc_t r = residual.ptr != nullptr ? static_cast<acc_t>(rv.v[k]) : acc_t(0);
      const acc_t val = bn_forward_value(static_cast<acc_t>(zv.v[k]), chan_or(mean, c, acc_t(0)),
                                         chan_or(scale, c, acc_t(1)), chan_or(shift, c, acc_t(0)), r, relu);
      ov.v[k] = static_cast<scalar_t>(val);
      // eager's relu(bn(z)) + x_next adds the already rounded output
      if (next.ptr != nullptr) nv.v[k] = static_cast<scalar_t>(static_cast<acc_t>(ov.v[k]) + static_cast<acc_t>(av.v[k]));
    }
    store_pack<V>(out.ptr + out.off(a, b, i0), ov);
    if (next.ptr != nullptr) store_pack<V>(next.ptr + next.off(a, b, i0), nv);
  }
};

void apply_cuda(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                const at::Tensor& residual, bool relu, const at::Tensor& out, const at::Tensor& addend,
                const at::Tensor& next) {
  const char* op = "bn_train apply (CUDA)";
  check_required(z, op, "z");
  check_required(out, op, "out");
  TORCH_CHECK(addend.defined() == next.defined(), op, ": addend and next go together");
  TORCH_CHECK(z.is_cuda(), op, ": z is on ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const ActView vz = act_view(z);
  const ActView vout = view_checked(out, op, "out", z, vz);
  const ActView vres = residual.defined() ? view_checked(residual, op, "residual", z, vz) : vz;
  const ActView vadd = addend.defined() ? view_checked(addend, op, "addend", z, vz) : vz;
  const ActView vnext = next.defined() ? view_checked(next, op, "next", z, vz) : vz;
  const Inner kind = common_inner({vz, vout, vres, vadd, vnext});
  for (const ActView& v : {vz, vout, vres, vadd, vnext}) check_inner(v, kind, op);
  const auto acc = acc_type(z.scalar_type());
  check_channel(mean, op, "mean", vz.C, acc, z.device());
  check_channel(scale, op, "scale", vz.C, acc, z.device());
  check_channel(shift, op, "shift", vz.C, acc, z.device());
  if (z.numel() == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "resfast_bn_apply_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    VectorCheck vc{kind, kVec, (kind == Inner::Channels ? vz.C : vz.P) % kVec == 0};
    vc.add(z, vz);
    vc.add(out, vout);
    vc.add(residual, vres);
    vc.add(addend, vadd);
    vc.add(next, vnext);
    const Act<const scalar_t> none{nullptr, 0, 0};
    ApplyOp<scalar_t, acc_t> o;
    o.z = make_act(z.const_data_ptr<scalar_t>(), vz, kind);
    o.residual = residual.defined() ? make_act(residual.const_data_ptr<scalar_t>(), vres, kind) : none;
    o.addend = addend.defined() ? make_act(addend.const_data_ptr<scalar_t>(), vadd, kind) : none;
    o.out = make_act(out.mutable_data_ptr<scalar_t>(), vout, kind);
    o.next = next.defined() ? make_act(next.mutable_data_ptr<scalar_t>(), vnext, kind) : Act<scalar_t>{nullptr, 0, 0};
    o.mean = mean.defined() ? mean.const_data_ptr<acc_t>() : nullptr;
    o.scale = scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr;
    o.shift = shift.defined() ? shift.const_data_ptr<acc_t>() : nullptr;
    o.relu = relu;
    launch_elementwise<kVec>(o, kind, vc.ok, vz, stream);
  });
}

// ------------------------------------------------------------------------------------------------------------
// backward_apply: dz = bn_input_grad(g, xhat, sum_g / M, sum_gxhat / M, scale, batch_stats), dres = g. Inputs are
// loaded before outputs are stored (dz may alias dy element for element).

template <typename scalar_t, typename acc_t>
struct BackwardApplyOp {
  Act<const scalar_t> dy, dy2, y, z;
  Act<scalar_t> dz, dres;
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* scale;
  const acc_t* sum_g;
  const acc_t* sum_gxhat;
  acc_t count;  // M in acc_t: sum / M per element (the CPU kernels multiply by 1 / M: the last bit may differ)
  bool batch_stats;

  template <bool kChannelsInner, int V>
  __device__ __forceinline__ void unit(int64_t a, int64_t b, int64_t i0) const {
    using PackT = Pack<scalar_t, V>;
    const PackT dyv = load_pack<V>(dy.ptr + dy.off(a, b, i0));
    PackT d2v, yv, zv;
    if (dy2.ptr != nullptr) d2v = load_pack<V>(dy2.ptr + dy2.off(a, b, i0));
    if (y.ptr != nullptr) yv = load_pack<V>(y.ptr + y.off(a, b, i0));
    if (batch_stats) zv = load_pack<V>(z.ptr + z.off(a, b, i0));
    PackT dzv, drv;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = kChannelsInner ? i0 + k : b;
      const acc_t d2 = dy2.ptr != nullptr ? static_cast<acc_t>(d2v.v[k]) : acc_t(0);
      const acc_t ym = y.ptr != nullptr ? static_cast<acc_t>(yv.v[k]) : acc_t(0);
      const acc_t g = masked_grad(static_cast<acc_t>(dyv.v[k]), d2, y.ptr != nullptr, ym);
      acc_t d;
      if (batch_stats) {
        const acc_t xhat = (static_cast<acc_t>(zv.v[k]) - mean[c]) * invstd[c];
        d = bn_input_grad(g, xhat, sum_g[c] / count, sum_gxhat[c] / count, scale[c], true);
      } else {
        d = bn_input_grad(g, acc_t(0), acc_t(0), acc_t(0), scale[c], false);
      }
      dzv.v[k] = static_cast<scalar_t>(d);
      drv.v[k] = static_cast<scalar_t>(g);
    }
    store_pack<V>(dz.ptr + dz.off(a, b, i0), dzv);
    if (dres.ptr != nullptr) store_pack<V>(dres.ptr + dres.off(a, b, i0), drv);
  }
};

void backward_apply_cuda(const at::Tensor& dy, const at::Tensor& dy2, const at::Tensor& y, const at::Tensor& z,
                         const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& scale,
                         const at::Tensor& sum_g, const at::Tensor& sum_gxhat, bool batch_stats,
                         const at::Tensor& dz, const at::Tensor& dres) {
  const char* op = "bn_train backward_apply (CUDA)";
  check_required(dy, op, "dy");
  check_required(scale, op, "scale");
  check_required(dz, op, "dz");
  if (batch_stats) {
    check_required(z, op, "z");
    check_required(mean, op, "mean");
    check_required(invstd, op, "invstd");
    check_required(sum_g, op, "sum_g");
    check_required(sum_gxhat, op, "sum_gxhat");
  }
  TORCH_CHECK(dy.is_cuda(), op, ": dy is on ", dy.device());
  const c10::cuda::CUDAGuard guard(dy.device());
  const ActView vdy = act_view(dy);
  const ActView vdz = view_checked(dz, op, "dz", dy, vdy);
  const ActView vdy2 = dy2.defined() ? view_checked(dy2, op, "dy2", dy, vdy) : vdy;
  const ActView vy = y.defined() ? view_checked(y, op, "y", dy, vdy) : vdy;
  // z is read only with batch statistics; otherwise it plays no part (not even in the choice of layout)
  const ActView vz = batch_stats ? view_checked(z, op, "z", dy, vdy) : vdy;
  const ActView vdres = dres.defined() ? view_checked(dres, op, "dres", dy, vdy) : vdy;
  const Inner kind = common_inner({vdy, vdz, vdy2, vy, vz, vdres});
  for (const ActView& v : {vdy, vdz, vdy2, vy, vz, vdres}) check_inner(v, kind, op);
  const auto acc = acc_type(dy.scalar_type());
  const int64_t C = vdy.C;
  check_channel(scale, op, "scale", C, acc, dy.device());
  if (batch_stats) {
    check_channel(mean, op, "mean", C, acc, dy.device());
    check_channel(invstd, op, "invstd", C, acc, dy.device());
    check_channel(sum_g, op, "sum_g", C, acc, dy.device());
    check_channel(sum_gxhat, op, "sum_gxhat", C, acc, dy.device());
  }
  const int64_t M = vdy.N * vdy.P;
  if (M == 0 || C == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "resfast_bn_backward_apply_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    VectorCheck vc{kind, kVec, (kind == Inner::Channels ? C : vdy.P) % kVec == 0};
    vc.add(dy, vdy);
    vc.add(dz, vdz);
    vc.add(dy2, vdy2);
    vc.add(y, vy);
    if (batch_stats) vc.add(z, vz);
    vc.add(dres, vdres);
    const Act<const scalar_t> none{nullptr, 0, 0};
    BackwardApplyOp<scalar_t, acc_t> o;
    o.dy = make_act(dy.const_data_ptr<scalar_t>(), vdy, kind);
    o.dy2 = dy2.defined() ? make_act(dy2.const_data_ptr<scalar_t>(), vdy2, kind) : none;
    o.y = y.defined() ? make_act(y.const_data_ptr<scalar_t>(), vy, kind) : none;
    o.z = batch_stats ? make_act(z.const_data_ptr<scalar_t>(), vz, kind) : none;
    o.dz = make_act(dz.mutable_data_ptr<scalar_t>(), vdz, kind);
    o.dres = dres.defined() ? make_act(dres.mutable_data_ptr<scalar_t>(), vdres, kind) : Act<scalar_t>{nullptr, 0, 0};
    o.mean = batch_stats ? mean.const_data_ptr<acc_t>() : nullptr;
    o.invstd = batch_stats ? invstd.const_data_ptr<acc_t>() : nullptr;
    o.scale = scale.const_data_ptr<acc_t>();
    o.sum_g = batch_stats ? sum_g.const_data_ptr<acc_t>() : nullptr;
    o.sum_gxhat = batch_stats ? sum_gxhat.const_data_ptr<acc_t>() : nullptr;
    o.count = static_cast<acc_t>(M);
    o.batch_stats = batch_stats;
    launch_elementwise<kVec>(o, kind, vc.ok, vdy, stream);
  });
}

// ------------------------------------------------------------------------------------------------------------
// running_update: blended in the batch statistics' dtype, stored in the buffers' own dtype (nn.BatchNorm2d keeps
// float running buffers under half autocast).

template <typename run_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    running_update_kernel(run_t* running_mean, run_t* running_var, const acc_t* mean, const acc_t* var_unbiased,
                          acc_t factor, int64_t C) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += stride) {
    running_mean[c] = static_cast<run_t>(running_blend(static_cast<acc_t>(running_mean[c]), mean[c], factor));
    running_var[c] = static_cast<run_t>(running_blend(static_cast<acc_t>(running_var[c]), var_unbiased[c], factor));
  }
}

void running_update_cuda(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                         const at::Tensor& var_unbiased, double factor) {
  const char* op = "bn_train running_update (CUDA)";
  check_required(running_mean, op, "running_mean");
  check_required(running_var, op, "running_var");
  check_required(mean, op, "mean");
  check_required(var_unbiased, op, "var_unbiased");
  TORCH_CHECK(running_mean.is_cuda(), op, ": running_mean is on ", running_mean.device());
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const auto dev = running_mean.device();
  const int64_t C = running_mean.numel();
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous() && running_var.numel() == C &&
                  running_var.device() == dev,
              op, ": running_mean and running_var must be contiguous (C,) tensors on one device");
  TORCH_CHECK(running_var.scalar_type() == running_mean.scalar_type(), op,
              ": running_mean and running_var have different dtypes");
  const auto acc = mean.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, op, ": mean must be float or double, got ", acc);
  check_channel(mean, op, "mean", C, acc, dev);
  check_channel(var_unbiased, op, "var_unbiased", C, acc, dev);
  if (C == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(std::min(ceil_div(C, kThreads), sm_count() * 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "resfast_bn_running_update_cuda", [&] {
    if (acc == at::kDouble) {
      running_update_kernel<scalar_t, double><<<blocks, kThreads, 0, stream>>>(
          running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(),
          mean.const_data_ptr<double>(), var_unbiased.const_data_ptr<double>(), factor, C);
    } else {
      running_update_kernel<scalar_t, float><<<blocks, kThreads, 0, stream>>>(
          running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(),
          mean.const_data_ptr<float>(), var_unbiased.const_data_ptr<float>(), static_cast<float>(factor), C);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

const BnKernels& cuda_bn_kernels() {
  static const BnKernels table{&stats_cuda, &apply_cuda, &backward_reduce_cuda, &backward_apply_cuda,
                               &running_update_cuda};
  return table;
}

}  // namespace resfast

#endif  // RESFAST_WITH_CUDA
