// One LARS step over a list of CPU tensors of one dtype, in a single native call.
//
// Built at first use by larsopt/_impl/fused_cpu.py and called through ctypes. The formulas are
// those of larsopt/_impl/reference.py, written element by element in the same order of
// operations (no FMA contraction: the build uses -ffp-contract=off), so results match the
// reference up to the summation order of the norms.
//
// Memory traffic: each tensor is processed whole before the next one: pass 1 reads w and g for
// the norms, pass 2 reads them again (from cache for tensors whose w + g fit in the last-level
// cache) together with the momentum buffer and writes w and the buffer. For cache-sized tensors
// that is SGD's 20 bytes/param of DRAM traffic instead of LARS's 28. Nothing is allocated.
//
// Threads: tensors below kCooperativeNumel are spread whole over the threads; larger tensors are
// split into one contiguous slice per thread, and the same slice goes to the same thread in both
// passes so that it is still in that core's cache.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kCooperativeNumel = 1 << 15;
constexpr int64_t kBlock = 1024;  // float partial sums over 1024 elements, then added in double

struct BFloat16 {
  uint16_t bits;
};

inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const BFloat16* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i].bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline void store(BFloat16* p, int64_t i, float v) {
  // Round to nearest even, NaN to the canonical quiet NaN: what torch's float -> bfloat16 does.
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p[i].bits = 0x7fc0;
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p[i].bits = static_cast<uint16_t>(u >> 16);
}

template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

enum Form : int { kNoMomentum = 0, kPaper = 1, kTorch = 2 };

struct Hyper {
  double lr, weight_decay, momentum, eta, epsilon, rescale, clip, grad_scale;
  bool adapt, nesterov, trust_update, trust_clip, maximize, has_scale, has_wd;
  int form;
};

// The rescaled gradient gr = ((±g) / scale) * r, in the reference's order. Multiplying by ±1 and
// by r = 1 is exact; the division (slow) is compiled in only when there is an AMP scale.
template <bool HasScale, typename D>
inline D rescaled(D g, D sign, D scale, D rescale) {
  const D signed_g = g * sign;
  return (HasScale ? signed_g / scale : signed_g) * rescale;
}

// Sums of squares of w, of the rescaled gradient gr and (trust_norm "update") of gr + wd * w over
// [begin, end), added to out[0..2].
template <typename T, bool TrustUpdate, bool HasScale>
void sums_of_squares(const T* w, const T* g, int64_t begin, int64_t end, const Hyper& h, double* out) {
  using D = typename Compute<T>::type;
  const D sign = h.maximize ? D(-1) : D(1), scale = D(h.grad_scale), rescale = D(h.rescale), wd = D(h.weight_decay);
  double ww = 0, gg = 0, uu = 0;
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t stop = start + kBlock < end ? start + kBlock : end;
    D bw = 0, bg = 0, bu = 0;
#pragma omp simd reduction(+ : bw, bg, bu)
    for (int64_t i = start; i < stop; ++i) {
      const D wi = load(w, i);
      const D gi = rescaled<HasScale>(D(load(g, i)), sign, scale, rescale);
      bw += wi * wi;
      bg += gi * gi;
      if (TrustUpdate) {
        const D ui = gi + wd * wi;
        bu += ui * ui;
      }
    }
    ww += bw;
    gg += bg;
    uu += bu;
  }
  out[0] += ww;
  out[1] += gg;
  out[2] += uu;
}

// lam from the sums of squares, as reference.trust_ratio / clip_trust_ratio compute it: the
// fallback lam = 1 when |w| == 0, |g| == 0 or a norm is not finite (and, for "update", when
// |g + wd * w| is 0 or not finite).
template <typename D>
D trust_ratio(const double* sums, const Hyper& h) {
  if (!h.adapt) return D(1);
  const D w_norm = D(std::sqrt(sums[0])), g_norm = D(std::sqrt(sums[1]));
  bool valid = w_norm > 0 && g_norm > 0 && std::isfinite(w_norm) && std::isfinite(g_norm);
  D denominator;
  if (h.trust_update) {
    const D u_norm = D(std::sqrt(sums[2]));
    valid = valid && u_norm > 0 && std::isfinite(u_norm);
    denominator = u_norm + D(h.epsilon);
  } else {
    denominator = (g_norm + D(h.weight_decay) * w_norm) + D(h.epsilon);
  }
  D lam = valid ? (D(h.eta) * w_norm) / denominator : D(1);
  if (h.trust_clip) lam = lam < D(h.lr) ? lam / D(h.lr) : D(1);
  return lam;
}

// The update over [begin, end) with trust ratio lam (reference._updated, element-wise).
template <typename T, int F, bool Nesterov, bool HasWd, bool HasScale>
void update_range(T* w, const T* g, T* b, int64_t begin, int64_t end, typename Compute<T>::type lam,
                  const Hyper& h) {
  using D = typename Compute<T>::type;
  const D sign = h.maximize ? D(-1) : D(1), scale = D(h.grad_scale), rescale = D(h.rescale);
  const D wd = D(h.weight_decay), mu = D(h.momentum), lr = D(h.lr);
  const D clip = D(h.clip);  // +inf when clip_gradient is None: the clamp is then the identity
  const D step_size = lr * lam;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const D wi = load(w, i);
    D u = rescaled<HasScale>(D(load(g, i)), sign, scale, rescale);
    u = u < -clip ? -clip : (u > clip ? clip : u);  // NaN passes through, as in torch.clamp
    if (HasWd) u = u + wd * wi;
    if (F == kNoMomentum) {
      store(w, i, wi - step_size * u);
    } else if (F == kPaper) {
      const D step = step_size * u;
      const D v = mu * D(load(b, i)) - step;
      store(b, i, v);
      store(w, i, wi + (Nesterov ? mu * v - step : v));
    } else {
      const D scaled = lam * u;
      const D v = mu * D(load(b, i)) + scaled;
      store(b, i, v);
      store(w, i, wi - lr * (Nesterov ? scaled + mu * v : v));
    }
  }
}

template <typename T>
using UpdateFn = void (*)(T*, const T*, T*, int64_t, int64_t, typename Compute<T>::type, const Hyper&);

// The update_range instance for the flags of h (one compiled loop per combination, no branches
// inside the loop).
template <typename T, int F, bool Nesterov, bool HasWd>
UpdateFn<T> pick_scale(const Hyper& h) {
  return h.has_scale ? update_range<T, F, Nesterov, HasWd, true> : update_range<T, F, Nesterov, HasWd, false>;
}

template <typename T, int F, bool Nesterov>
UpdateFn<T> pick_wd(const Hyper& h) {
  return h.has_wd ? pick_scale<T, F, Nesterov, true>(h) : pick_scale<T, F, Nesterov, false>(h);
}

template <typename T>
UpdateFn<T> pick_update(const Hyper& h) {
  if (h.form == kPaper) return h.nesterov ? pick_wd<T, kPaper, true>(h) : pick_wd<T, kPaper, false>(h);
  if (h.form == kTorch) return h.nesterov ? pick_wd<T, kTorch, true>(h) : pick_wd<T, kTorch, false>(h);
  return pick_wd<T, kNoMomentum, false>(h);
}

template <typename T>
void sums(const T* w, const T* g, int64_t begin, int64_t end, const Hyper& h, double* out) {
  if (h.trust_update && h.has_wd) {
    if (h.has_scale) sums_of_squares<T, true, true>(w, g, begin, end, h, out);
    else sums_of_squares<T, true, false>(w, g, begin, end, h, out);
  } else {
    if (h.has_scale) sums_of_squares<T, false, true>(w, g, begin, end, h, out);
    else sums_of_squares<T, false, false>(w, g, begin, end, h, out);
    if (h.trust_update) out[2] = out[1];  // wd == 0: g + wd * w is g
  }
}

// Momentum buffers are absent (a null array) when momentum == 0.
template <typename T>
T* buffer(void* const* buffers, int64_t t) {
  return buffers != nullptr ? static_cast<T*>(buffers[t]) : nullptr;
}

}  // namespace

// The kernel's arguments, by name; mirrored field for field by fused_cpu._KernelArgs (ctypes),
// whose size is checked against larsopt_kernel_args_size() when the library is loaded.
struct LarsKernelArgs {
  int64_t count;              // tensors, all of one dtype
  void* const* params;        // count pointers
  void* const* grads;         // count pointers
  void* const* buffers;       // count pointers, or null without momentum
  const int64_t* numels;      // count element counts
  const void* lr_tensor;      // 0-d tensors read at call time (null: absent), kinds 1 float32, 2 float64
  const void* grad_scale_tensor;
  const void* found_inf_tensor;
  double* sums_out;           // phase kNorms: count x 3 sums of squares (|w|^2, |g|^2, |g + wd w|^2)
  const double* trust_in;     // phase kUpdate: count trust ratios
  float* stats_out;           // phase kWhole, optional (null): count x 3 (|w|, |g|, lam)
  double lr;                  // used when lr_tensor is null
  double weight_decay;
  double momentum;
  double eta;
  double epsilon;
  double rescale_grad;
  double clip_gradient;       // +inf: off
  int32_t dtype;              // 0 float32, 1 float64, 2 bfloat16
  int32_t lr_kind;
  int32_t grad_scale_kind;
  int32_t found_inf_kind;
  int32_t phase;              // 0 whole step, 1 norms only, 2 update with given trust ratios
  int32_t adapt;
  int32_t nesterov;
  int32_t trust_update;       // trust_norm == "update"
  int32_t trust_clip;
  int32_t maximize;
  int32_t momentum_form;      // 0 no momentum, 1 paper, 2 torch
  int32_t threads;
};

namespace {

enum Phase : int { kWhole = 0, kNorms = 1, kUpdate = 2 };

template <typename T>
void step(const LarsKernelArgs& a, const Hyper& h) {
  using D = typename Compute<T>::type;
  const int threads = a.threads < 1 ? 1 : a.threads;
  const int64_t count = a.count;
  const int64_t* numels = a.numels;
  const UpdateFn<T> update = pick_update<T>(h);
  const bool norms = h.adapt && a.phase != kUpdate;
  std::vector<int64_t> whole, cooperative;
  for (int64_t t = 0; t < count; ++t) (numels[t] < kCooperativeNumel || threads == 1 ? whole : cooperative).push_back(t);
  // Per-thread partial sums of squares of the cooperative tensors, three per (tensor, thread).
  std::vector<double> partial(cooperative.size() * threads * 3, 0.0);

  // One tensor's trust ratio from its sums (or as given), and what the step reports of it.
  auto ratio = [&](int64_t t, const double* totals, bool report) -> D {
    if (a.phase == kUpdate) return h.adapt ? D(a.trust_in[t]) : D(1);
    const D lam = trust_ratio<D>(totals, h);
    if (report && a.stats_out != nullptr) {
      a.stats_out[3 * t] = h.adapt ? float(std::sqrt(totals[0])) : NAN;
      a.stats_out[3 * t + 1] = h.adapt ? float(std::sqrt(totals[1])) : NAN;
      a.stats_out[3 * t + 2] = float(lam);
    }
    return lam;
  };

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    const int nthreads = omp_get_num_threads();
#pragma omp for schedule(dynamic, 4) nowait
    for (int64_t k = 0; k < static_cast<int64_t>(whole.size()); ++k) {
      const int64_t t = whole[k];
      T* w = static_cast<T*>(a.params[t]);
      const T* g = static_cast<const T*>(a.grads[t]);
      double totals[3] = {0, 0, 0};
      if (norms) sums(w, g, 0, numels[t], h, totals);
      if (a.phase == kNorms) {
        for (int j = 0; j < 3; ++j) a.sums_out[3 * t + j] = totals[j];
      } else {
        update(w, g, buffer<T>(a.buffers, t), 0, numels[t], ratio(t, totals, true), h);
      }
    }
    for (size_t k = 0; k < cooperative.size(); ++k) {
      const int64_t t = cooperative[k], n = numels[t];
      // Slices aligned to 16 elements (64 bytes for float32) so threads do not share cache lines.
      const int64_t per_thread = ((n + nthreads - 1) / nthreads + 15) / 16 * 16;
      const int64_t begin = tid * per_thread < n ? tid * per_thread : n;
      const int64_t end = begin + per_thread < n ? begin + per_thread : n;
      T* w = static_cast<T*>(a.params[t]);
      const T* g = static_cast<const T*>(a.grads[t]);
      if (norms) {
        sums(w, g, begin, end, h, &partial[(k * threads + tid) * 3]);
#pragma omp barrier
      }
      double totals[3] = {0, 0, 0};
      for (int other = 0; other < nthreads; ++other) {  // same order in every thread: same lam
        for (int j = 0; j < 3; ++j) totals[j] += partial[(k * threads + other) * 3 + j];
      }
      if (a.phase == kNorms) {
        if (tid == 0) {
          for (int j = 0; j < 3; ++j) a.sums_out[3 * t + j] = totals[j];
        }
        continue;
      }
      update(w, g, buffer<T>(a.buffers, t), begin, end, ratio(t, totals, tid == 0), h);
    }
  }
}

double read_scalar(const void* ptr, int kind, double fallback) {
  if (kind == 1) return *static_cast<const float*>(ptr);
  if (kind == 2) return *static_cast<const double*>(ptr);
  return fallback;
}

}  // namespace

extern "C" int64_t larsopt_kernel_args_size() { return static_cast<int64_t>(sizeof(LarsKernelArgs)); }

// One phase (or the whole) of a LARS step over the tensors of `args`. Returns 0, or 1 when
// found_inf > 0 (nothing written, as AMP's skipped step).
extern "C" int larsopt_lars_step(const LarsKernelArgs* args) {
  const LarsKernelArgs& a = *args;
  if (a.found_inf_kind != 0 && read_scalar(a.found_inf_tensor, a.found_inf_kind, 0.0) > 0) return 1;
  Hyper h;
  h.lr = read_scalar(a.lr_tensor, a.lr_kind, a.lr);
  h.weight_decay = a.weight_decay;
  h.momentum = a.momentum;
  h.eta = a.eta;
  h.epsilon = a.epsilon;
  h.rescale = a.rescale_grad;
  h.clip = a.clip_gradient;
  h.has_scale = a.grad_scale_kind != 0;
  h.grad_scale = read_scalar(a.grad_scale_tensor, a.grad_scale_kind, 1.0);
  h.adapt = a.adapt != 0;
  h.nesterov = a.nesterov != 0;
  h.trust_update = a.trust_update != 0;
  h.trust_clip = a.trust_clip != 0;
  h.maximize = a.maximize != 0;
  h.form = a.momentum_form;
  h.has_wd = h.weight_decay != 0;
  if (a.dtype == 0) {
    step<float>(a, h);
  } else if (a.dtype == 1) {
    step<double>(a, h);
  } else {
    step<BFloat16>(a, h);
  }
  return 0;
}
