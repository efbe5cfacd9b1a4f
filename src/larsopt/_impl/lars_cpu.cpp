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
// passes so that it is still in that core's cache. A call with fewer than kParallelNumel elements
// in all, or with threads == 1, opens no OpenMP parallel region at all: GNU libgomp's thread pool
// does not survive fork(), so a child forked after a region was opened (which the caller then runs
// with one thread) must never enter one, and for so little work waking threads costs more than
// it saves.
//
// Norms: squares are summed in float over blocks of kBlock elements and the blocks in double. A
// float block sum that is not finite (a square or the sum overflowed: entries around 1e19 and
// up) or below kExactFloatSum (squares under FLT_MIN lost digits) is summed again in double, so
// every finite tensor gets a finite and accurate norm; a real inf/NaN stays inf/NaN.

#include <omp.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kCooperativeNumel = 1 << 15;
constexpr int64_t kParallelNumel = 1 << 15;  // torch's own grain size for parallel loops
constexpr int64_t kBlock = 1024;  // float partial sums over 1024 elements, then added in double
constexpr int64_t kNormChunk = 1 << 16;  // larsopt_sums_of_squares: the unit of work of one thread
// A float block sum at or above this keeps its digits: each of its 1024 squares is off by at most
// 2^-150 (half the smallest subnormal), 2^-140 in all, a relative 2^-40 of the sum.
constexpr float kExactFloatSum = 0x1p-100f;

struct BFloat16 {
  uint16_t bits;
};

struct Float16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const BFloat16* p, int64_t i) { return bits_to_float(static_cast<uint32_t>(p[i].bits) << 16); }
// IEEE half to float, exactly: the exponent and mantissa moved into float's fields and scaled by
// 2^112 (which also makes subnormals normal); inf and NaN keep an all-ones exponent.
inline float load(const Float16* p, int64_t i) {
  const uint32_t h = p[i].bits, sign = (h & 0x8000u) << 16, magnitude = (h & 0x7fffu) << 13;
  const float value = (h & 0x7c00u) == 0x7c00u ? bits_to_float(magnitude | 0x7f800000u)
                                              : bits_to_float(magnitude) * 0x1p112f;
  return sign ? -value : value;
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

template <typename T> struct Compute { using type = float; };  // float32, bfloat16, float16
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

// Whether a block's sum of squares can be kept as summed (see "Norms" above): a float one that is
// finite and at least kExactFloatSum (NaN is neither); a double one always.
inline bool kept(float sum) { return sum >= kExactFloatSum && sum <= FLT_MAX; }
inline bool kept(double) { return true; }

// Sums of squares of w, of the rescaled gradient gr and (trust_norm "update") of gr + wd * w over
// [begin, end), added to out[0..2]. The values are those the update uses (gr and gr + wd * w in
// the compute dtype); only their squares and sums are widened where a float block needs it.
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
    if (kept(bw) && kept(bg) && (!TrustUpdate || kept(bu))) {
      ww += bw;
      gg += bg;
      uu += bu;
      continue;
    }
    double dw = 0, dg = 0, du = 0;
#pragma omp simd reduction(+ : dw, dg, du)
    for (int64_t i = start; i < stop; ++i) {
      const D wi = load(w, i);
      const D gi = rescaled<HasScale>(D(load(g, i)), sign, scale, rescale);
      dw += double(wi) * double(wi);
      dg += double(gi) * double(gi);
      if (TrustUpdate) {
        const double ui = double(gi + wd * wi);
        du += ui * ui;
      }
    }
    ww += dw;
    gg += dg;
    uu += du;
  }
  out[0] += ww;
  out[1] += gg;
  out[2] += uu;
}

// The sum of squares of x[begin, end) (larsopt_sums_of_squares), blocked as above.
template <typename T>
double sum_of_squares(const T* x, int64_t begin, int64_t end) {
  using D = typename Compute<T>::type;
  double total = 0;
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t stop = start + kBlock < end ? start + kBlock : end;
    D block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t i = start; i < stop; ++i) {
      const D xi = load(x, i);
      block += xi * xi;
    }
    if (kept(block)) {
      total += block;
      continue;
    }
    double wide = 0;
#pragma omp simd reduction(+ : wide)
    for (int64_t i = start; i < stop; ++i) {
      const double xi = load(x, i);
      wide += xi * xi;
    }
    total += wide;
  }
  return total;
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

// Whether this process (or the one it was forked from) has opened a parallel region, and so has
// an OpenMP thread pool that a forked child does not get.
std::atomic<bool> opened_parallel_region{false};

// Runs body(thread, threads) on `threads` OpenMP threads, or as body(0, 1) on the calling thread
// without touching OpenMP when threads == 1 (see "Threads" above).
template <typename Body>
void run_threads(int threads, const Body& body) {
  if (threads == 1) {
    body(0, 1);
    return;
  }
  opened_parallel_region.store(true, std::memory_order_relaxed);
#pragma omp parallel num_threads(threads)
  body(omp_get_thread_num(), omp_get_num_threads());
}

// The number of threads for a call over `total` elements, at most `threads` (at least 1).
int threads_for(int64_t total, int threads) { return threads > 1 && total >= kParallelNumel ? threads : 1; }

// Hands out [0, count) in runs of `run` to the threads that ask (OpenMP's schedule(dynamic, 4),
// without OpenMP's worksharing calls).
class Runs {
 public:
  Runs(int64_t count, int64_t run) : count_(count), run_(run) {}
  // The next run's first index, or -1 when none is left.
  int64_t next() {
    const int64_t first = next_.fetch_add(run_, std::memory_order_relaxed);
    return first < count_ ? first : -1;
  }
  int64_t end(int64_t first) const { return first + run_ < count_ ? first + run_ : count_; }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t count_, run_;
};

template <typename T>
void step(const LarsKernelArgs& a, const Hyper& h) {
  using D = typename Compute<T>::type;
  const int64_t count = a.count;
  const int64_t* numels = a.numels;
  int64_t total = 0;
  for (int64_t t = 0; t < count; ++t) total += numels[t];
  const int threads = threads_for(total, a.threads);
  const UpdateFn<T> update = pick_update<T>(h);
  const bool norms = h.adapt && a.phase != kUpdate;
  std::vector<int64_t> whole, cooperative;
  for (int64_t t = 0; t < count; ++t) (numels[t] < kCooperativeNumel || threads == 1 ? whole : cooperative).push_back(t);
  // Per-thread partial sums of squares of the cooperative tensors, three per (tensor, thread).
  std::vector<double> partial(cooperative.size() * threads * 3, 0.0);
  Runs whole_runs(static_cast<int64_t>(whole.size()), 4);

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

  run_threads(threads, [&](int tid, int nthreads) {
    for (int64_t first = whole_runs.next(); first >= 0; first = whole_runs.next()) {
      for (int64_t k = first; k < whole_runs.end(first); ++k) {
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
  });
}

// The sums of squares of `count` tensors of one dtype into sums_out[0..count), chunk by chunk:
// each chunk's sum is added to its tensor's in chunk order, so the result does not depend on the
// number of threads.
template <typename T>
void sums_of_tensors(int64_t count, const void* const* tensors, const int64_t* numels, int threads,
                     double* sums_out) {
  std::vector<int64_t> first_chunk(count + 1, 0);
  int64_t total = 0;
  for (int64_t t = 0; t < count; ++t) {
    first_chunk[t + 1] = first_chunk[t] + (numels[t] + kNormChunk - 1) / kNormChunk;
    total += numels[t];
  }
  const int64_t chunks = first_chunk[count];
  std::vector<double> chunk_sums(chunks, 0.0);
  std::vector<int64_t> owner(chunks);
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) owner[c] = t;
  }
  Runs runs(chunks, 1);
  run_threads(threads_for(total, threads), [&](int, int) {
    for (int64_t c = runs.next(); c >= 0; c = runs.next()) {
      const int64_t t = owner[c], begin = (c - first_chunk[t]) * kNormChunk;
      const int64_t end = begin + kNormChunk < numels[t] ? begin + kNormChunk : numels[t];
      chunk_sums[c] = sum_of_squares(static_cast<const T*>(tensors[t]), begin, end);
    }
  });
  for (int64_t t = 0; t < count; ++t) {
    double total = 0;
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) total += chunk_sums[c];
    sums_out[t] = total;
  }
}

double read_scalar(const void* ptr, int kind, double fallback) {
  if (kind == 1) return *static_cast<const float*>(ptr);
  if (kind == 2) return *static_cast<const double*>(ptr);
  return fallback;
}

}  // namespace

extern "C" int64_t larsopt_kernel_args_size() { return static_cast<int64_t>(sizeof(LarsKernelArgs)); }

extern "C" int larsopt_opened_parallel_region() { return opened_parallel_region.load() ? 1 : 0; }

// The sum of squares of each of `count` dense tensors of one dtype (0 float32, 1 float64,
// 2 bfloat16, 3 float16), as doubles, into sums_out. Returns 0, or 1 for an unknown dtype.
extern "C" int larsopt_sums_of_squares(int64_t count, const void* const* tensors, const int64_t* numels,
                                       int32_t dtype, int32_t threads, double* sums_out) {
  if (dtype == 0) {
    sums_of_tensors<float>(count, tensors, numels, threads, sums_out);
  } else if (dtype == 1) {
    sums_of_tensors<double>(count, tensors, numels, threads, sums_out);
  } else if (dtype == 2) {
    sums_of_tensors<BFloat16>(count, tensors, numels, threads, sums_out);
  } else if (dtype == 3) {
    sums_of_tensors<Float16>(count, tensors, numels, threads, sums_out);
  } else {
    return 1;
  }
  return 0;
}

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
