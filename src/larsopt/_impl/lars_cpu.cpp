// One LARS step over a list of CPU tensors of one dtype, in a single native call.
//
// Built at first use by larsopt/_impl/fused_cpu.py and called through ctypes. The formulas are
// those of larsopt/_impl/reference.py, written element by element in the same order of
// operations (no FMA contraction: the build uses -ffp-contract=off), so results match the
// reference up to the summation order of the norms (and, in float64, the last bit of a norm's
// square root: torch's vectorised float64 sqrt, which the reference and the two-phase sharded
// step take, is not always correctly rounded; std::sqrt is).
//
// Memory traffic: a tensor processed whole by one thread has its two passes back to back: pass 1
// reads w and g for the norms, pass 2 reads them again (from cache, for tensors whose w + g fit in
// it) with the momentum buffer and writes w and the buffer: SGD's 20 bytes/param of DRAM traffic
// instead of LARS's 28. Pass 2 walks the chunks last to first, so a tensor too large for the
// caches still finds the part pass 1 read last in them. With |w|^2 carried from the previous step
// (weight_sums_in), pass 1 reads g only. Nothing is allocated but the schedule's arrays (a few
// numbers per tensor or chunk), before the threads start.
//
// Schedule (one parallel region per call, no barrier in it): a tensor of kSharedNumel elements or
// more is shared by the threads, its chunks' norms handed out one at a time, and each chunk
// updated by the thread that summed it (so the update finds it in that core's cache); a thread
// waits a little (kReadyWait, once per step at most) for the other threads' last chunks of a
// tensor before updating its own. Smaller tensors are taken whole, largest first (small ones in
// runs), by whichever thread is free. A thread out of work takes the updates of other threads'
// chunks once ready: a thread the machine takes away delays the step by the chunk or whole
// tensor it is in, not by all of its share. A call with fewer than kParallelNumel elements in
// all, or with threads == 1, opens no OpenMP parallel region at all: waking threads costs more
// than it saves there (and much more on a busy machine), and GNU libgomp's thread pool does not
// survive fork(), so a forked child (which the caller runs with one thread) must never enter one.
//
// Norms: squares are summed over blocks of kBlock elements in kLanes float lanes added in a fixed
// order, blocks in double within chunks of kChunk elements, and chunks in double in order. The
// order of every addition is written out, so a tensor's sum does not depend on the threads, the
// schedule or the loop that computes it: the update pass, summing the squares of the weights it
// writes (weight_sums_out), gets the bits the next norm pass would. A float block sum that is not
// finite (a square or the sum overflowed: entries around 1e19 and up) or below kExactFloatSum
// (squares under FLT_MIN lost digits) is summed again in double, so every finite tensor gets a
// finite and accurate norm; a real inf/NaN stays inf/NaN.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kParallelNumel = 1 << 18;  // below this in all, one thread (about 0.1-0.3 ms of work)
constexpr int64_t kBlock = 1024;             // float partial sums over 1024 elements, then added in double
constexpr int kLanes = 64;                   // the float partial sums of a block (4 independent vector chains)
constexpr int64_t kChunk = 1 << 16;          // shared tensors are handed out in chunks; blocks are summed per chunk
// Tensors this large are shared by the threads, chunk by chunk. Smaller ones are faster whole: no
// waiting for another thread's norms, and a tensor's passes stay on one core. Up to 2^21 elements,
// two threads' whole tensors (w + g: 16 MiB each at most in float32) still fit the L3 together;
// measured on a 2-vCPU EPYC (32 MiB L3), kernel alone against fused SGD, 2^18-2^20-element
// tensors took 0.99-1.27x whole (median 1.06x) against 1.10-1.40x shared (median 1.25x).
constexpr int64_t kSharedNumel = 1 << 21;
constexpr int64_t kRunNumel = 1 << 14;       // small whole tensors are handed out in runs of this many elements
// The update prefetches w, g and b this far ahead of the element it writes, a run of kUpdateRun
// elements at a time: on a 2-vCPU Xeon VM, whose caches beyond the 2 MiB L2 return the update pass
// next to nothing of what the norm pass read (a core then reads about 12 GB/s, bound by the misses
// it has in flight), it made the kernel 6% faster on ResNet-50 and BERT-base shapes (median of 5
// runs each, 3-16%; docs/performance.md).
constexpr int64_t kPrefetchBytes = 2048;
constexpr int64_t kUpdateRun = 256;
// A float block sum at or above this keeps its digits: each of its 1024 squares is off by at most
// 2^-150 (half the smallest subnormal), 2^-140 in all, a relative 2^-40 of the sum.
constexpr float kExactFloatSum = 0x1p-100f;
static_assert(kChunk % kBlock == 0 && kBlock % kLanes == 0, "chunks are whole blocks, blocks whole lane rows");

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

// The lanes of a block added in a fixed order (pairwise).
template <typename D>
inline D lanes_total(D* lanes) {
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] = lanes[j] + lanes[j + width];
  }
  return lanes[0];
}

// A block's sum from its lanes: added pairwise, kept, or (not kept) summed again in double one
// value after the other.
template <typename D, typename Value>
inline double lanes_sum(D* lanes, int64_t start, int64_t stop, const Value& value) {
  const D sum = lanes_total(lanes);
  if (kept(sum)) return double(sum);
  double wide = 0;
  for (int64_t k = start; k < stop; ++k) {
    const double x = double(value(k));
    wide += x * x;
  }
  return wide;
}

// The sum of squares of value(start) .. value(stop - 1), one block (at most kBlock elements, in
// the compute dtype D): element i goes to lane (i - start) % kLanes, the lanes are added pairwise;
// a sum that is not kept is summed again in double, one value after the other. The order is
// fixed, so every loop over the same values gets the same bits.
template <typename D, typename Value>
inline double block_sum(int64_t start, int64_t stop, const Value& value) {
  D lanes[kLanes] = {};
  int64_t i = start;
  for (; i + kLanes <= stop; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const D x = value(i + j);
      lanes[j] += x * x;
    }
  }
  for (int j = 0; i < stop; ++i, ++j) {
    const D x = value(i);
    lanes[j] += x * x;
  }
  return lanes_sum(lanes, start, stop, value);
}

// Sums of squares over [begin, end), a range of whole chunks of one tensor (its end may be the
// tensor's end), added to out[0..2] chunk by chunk: |w|^2 (when NeedW), |gr|^2 and (TrustUpdate)
// |gr + wd * w|^2, with gr and gr + wd * w the values the update uses, in the compute dtype. One
// loop reads w and g together (two streams the prefetcher follows); each sum has its own lanes,
// filled as block_sum fills them, so |w|^2 has block_sum's bits.
template <typename T, bool NeedW, bool TrustUpdate, bool HasScale>
void sums_of_squares(const T* w, const T* g, int64_t begin, int64_t end, const Hyper& h, double* out) {
  using D = typename Compute<T>::type;
  const D sign = h.maximize ? D(-1) : D(1), scale = D(h.grad_scale), rescale = D(h.rescale), wd = D(h.weight_decay);
  const auto w_at = [&](int64_t i) { return D(load(w, i)); };
  const auto g_at = [&](int64_t i) { return rescaled<HasScale>(D(load(g, i)), sign, scale, rescale); };
  const auto u_at = [&](int64_t i) { return D(g_at(i) + wd * w_at(i)); };
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    const int64_t chunk_end = chunk + kChunk < end ? chunk + kChunk : end;
    double ww = 0, gg = 0, uu = 0;
    for (int64_t start = chunk; start < chunk_end; start += kBlock) {
      const int64_t stop = start + kBlock < chunk_end ? start + kBlock : chunk_end;
      D lw[kLanes] = {}, lg[kLanes] = {}, lu[kLanes] = {};
      int64_t i = start;
      for (; i + kLanes <= stop; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const D wi = w_at(i + j), gi = g_at(i + j);
          if (NeedW) lw[j] += wi * wi;
          lg[j] += gi * gi;
          if (TrustUpdate) {
            const D ui = gi + wd * wi;
            lu[j] += ui * ui;
          }
        }
      }
      for (int j = 0; i < stop; ++i, ++j) {
        const D wi = w_at(i), gi = g_at(i);
        if (NeedW) lw[j] += wi * wi;
        lg[j] += gi * gi;
        if (TrustUpdate) {
          const D ui = gi + wd * wi;
          lu[j] += ui * ui;
        }
      }
      if (NeedW) ww += lanes_sum(lw, start, stop, w_at);
      gg += lanes_sum(lg, start, stop, g_at);
      if (TrustUpdate) uu += lanes_sum(lu, start, stop, u_at);
    }
    if (NeedW) out[0] += ww;
    out[1] += gg;
    if (TrustUpdate) out[2] += uu;
  }
}

// The sum of squares of x[start, stop), one block, as the norm pass sums |w|^2.
template <typename T>
double block_sum_of_squares(const T* x, int64_t start, int64_t stop) {
  using D = typename Compute<T>::type;
  return block_sum<D>(start, stop, [&](int64_t i) { return D(load(x, i)); });
}

// The sum of squares of x[begin, end), a range of whole chunks, chunk by chunk.
template <typename T>
double sum_of_squares(const T* x, int64_t begin, int64_t end) {
  double total = 0;
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    const int64_t chunk_end = chunk + kChunk < end ? chunk + kChunk : end;
    double sum = 0;
    for (int64_t start = chunk; start < chunk_end; start += kBlock) {
      sum += block_sum_of_squares(x, start, start + kBlock < chunk_end ? start + kBlock : chunk_end);
    }
    total += sum;
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

// The update over [begin, end) with trust ratio lam (reference._updated, element-wise), in runs of
// kUpdateRun elements, each run prefetching w, g and b kPrefetchBytes ahead (up to prefetch_end).
template <typename T, int F, bool Nesterov, bool HasWd, bool HasScale>
void update_range(T* w, const T* g, T* b, int64_t begin, int64_t end, int64_t prefetch_end,
                  typename Compute<T>::type lam, const Hyper& h) {
  using D = typename Compute<T>::type;
  const D sign = h.maximize ? D(-1) : D(1), scale = D(h.grad_scale), rescale = D(h.rescale);
  const D wd = D(h.weight_decay), mu = D(h.momentum), lr = D(h.lr);
  const D clip = D(h.clip);  // +inf when clip_gradient is None: the clamp is then the identity
  const D step_size = lr * lam;
  constexpr int64_t ahead = kPrefetchBytes / int64_t(sizeof(T)), line = 64 / int64_t(sizeof(T));
  for (int64_t run = begin; run < end; run += kUpdateRun) {
    const int64_t run_end = run + kUpdateRun < end ? run + kUpdateRun : end;
    for (int64_t p = run + ahead; p < run_end + ahead && p < prefetch_end; p += line) {
      __builtin_prefetch(w + p, 1);
      __builtin_prefetch(g + p, 0);
      if (F != kNoMomentum) __builtin_prefetch(b + p, 1);
    }
#pragma omp simd
    for (int64_t i = run; i < run_end; ++i) {
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
}

template <typename T>
using UpdateFn = void (*)(T*, const T*, T*, int64_t, int64_t, int64_t, typename Compute<T>::type, const Hyper&);

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

// The sums of squares of [begin, end) (whole chunks of one tensor) into out[0..2]; |w|^2 only
// when need_w (else it is carried from the previous step), unless trust_norm "update" needs w.
template <typename T>
void sums(const T* w, const T* g, int64_t begin, int64_t end, const Hyper& h, bool need_w, double* out) {
  if (h.trust_update && h.has_wd) {
    if (h.has_scale) sums_of_squares<T, true, true, true>(w, g, begin, end, h, out);
    else sums_of_squares<T, true, true, false>(w, g, begin, end, h, out);
    return;
  }
  if (need_w) {
    if (h.has_scale) sums_of_squares<T, true, false, true>(w, g, begin, end, h, out);
    else sums_of_squares<T, true, false, false>(w, g, begin, end, h, out);
  } else {
    if (h.has_scale) sums_of_squares<T, false, false, true>(w, g, begin, end, h, out);
    else sums_of_squares<T, false, false, false>(w, g, begin, end, h, out);
  }
  if (h.trust_update) out[2] = out[1];  // wd == 0: g + wd * w is g
}

// The update of [begin, end) (whole chunks of one tensor), last chunk first: the norm pass has
// just read the range first to last, so its end is what the caches still hold. With `written`,
// also stores there, one per chunk, the sum of squares of the weights it writes, summed block by
// block right after writing them (from L1) exactly as the next norm pass would sum them.
template <typename T>
void update_chunks(UpdateFn<T> update, T* w, const T* g, T* b, int64_t begin, int64_t end,
                   typename Compute<T>::type lam, const Hyper& h, double* written) {
  for (int64_t c = (end - begin + kChunk - 1) / kChunk - 1; c >= 0; --c) {
    const int64_t chunk = begin + c * kChunk, chunk_end = chunk + kChunk < end ? chunk + kChunk : end;
    if (written == nullptr) {
      update(w, g, b, chunk, chunk_end, chunk_end, lam, h);
      continue;
    }
    double sum = 0;
    for (int64_t start = chunk; start < chunk_end; start += kBlock) {
      const int64_t stop = start + kBlock < chunk_end ? start + kBlock : chunk_end;
      update(w, g, b, start, stop, chunk_end, lam, h);
      sum += block_sum_of_squares(w, start, stop);
    }
    written[c] = sum;
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
  const double* weight_sums_in;  // optional (null): count |w|^2 carried from the previous step (< 0: unknown)
  double* weight_sums_out;    // optional (null): count |w|^2 of the weights written (tensors of at least
                              // larsopt_carry_min_numel() elements; -1 for the others)
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

// Runs body() on `threads` OpenMP threads, or once on the calling thread without touching OpenMP
// when threads == 1 (see "Schedule" above).
template <typename Body>
void run_threads(int threads, const Body& body) {
  if (threads == 1) {
    body();
    return;
  }
#pragma omp parallel num_threads(threads)
  body();
}

// The number of threads for a call over `total` elements, at most `threads` (at least 1).
int threads_for(int64_t total, int threads) { return threads > 1 && total >= kParallelNumel ? threads : 1; }

// Hands out the indices 0, 1, ... count-1, each to the first thread that asks.
class Counter {
 public:
  explicit Counter(int64_t count) : count_(count) {}
  // The next index, or -1 when none is left.
  int64_t next() {
    const int64_t index = next_.fetch_add(1, std::memory_order_relaxed);
    return index < count_ ? index : -1;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t count_;
};

constexpr int64_t kCarryMinNumel = 1 << 17;  // smaller tensors stay in cache between the passes: nothing to gain

// How long a thread waits for the other threads' last chunks of a shared tensor before doing other
// work. Threads that keep pace update their chunks while in cache; one that the machine took away
// (or that woke up late) costs this once per step: after a wait runs out, nobody waits any more.
constexpr auto kReadyWait = std::chrono::microseconds(500);

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// A tensor shared by the threads: its chunks' norms go one at a time to whichever thread asks,
// so the threads finish them within a chunk of each other whatever their speeds (static halves
// left one thread waiting for the other, or giving up on the update from cache: measured 10-15%
// apart on BERT's embedding). Each chunk's update goes to the thread that summed it (its owner),
// which finds it in its core's cache. Chunk c's owner and sums (3 each) are at index first + c
// of the step's owners and chunk_sums.
struct Shared {
  int64_t tensor, first, chunks;
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
  const bool norms = h.adapt && a.phase != kUpdate, updates = a.phase != kNorms;
  std::vector<Shared> shared;
  std::vector<int64_t> whole;
  int64_t shared_chunks = 0;
  for (int64_t t = 0; t < count; ++t) {
    if (threads > 1 && numels[t] >= kSharedNumel) {
      const int64_t chunks = (numels[t] + kChunk - 1) / kChunk;
      shared.push_back({t, shared_chunks, chunks});
      shared_chunks += chunks;
    } else {
      whole.push_back(t);
    }
  }
  std::sort(whole.begin(), whole.end(), [&](int64_t x, int64_t y) { return numels[x] > numels[y]; });
  std::vector<std::pair<int64_t, int64_t>> runs;  // the whole tensors in runs [first, last) of the order
  for (size_t first = 0; first < whole.size();) {
    size_t last = first;
    for (int64_t run = 0; last < whole.size() && run < kRunNumel; ++last) run += numels[whole[last]];
    runs.emplace_back(int64_t(first), int64_t(last));
    first = last;
  }
  const int64_t tasks = int64_t(shared.size()) * threads;  // updates: one per (shared tensor, owner)
  auto writes_sum = [&](int64_t t) { return a.weight_sums_out != nullptr && numels[t] >= kCarryMinNumel; };
  // The sums of squares of the weights written, one per chunk: tensor t's from written_first[t].
  std::vector<int64_t> written_first(a.weight_sums_out != nullptr ? count + 1 : 0, 0);
  for (int64_t t = 0; t + 1 < int64_t(written_first.size()); ++t) {
    written_first[t + 1] = written_first[t] + (writes_sum(t) ? (numels[t] + kChunk - 1) / kChunk : 0);
  }
  std::vector<double> chunk_sums(shared_chunks * 3, 0.0);
  std::vector<int> owners(shared_chunks, 0);
  std::vector<double> chunk_written(written_first.empty() ? 0 : written_first[count]);
  std::vector<D> shared_lam(shared.size(), D(1));
  // Each update task is claimed once (by its owner, or by a thread that ran out of work).
  std::vector<std::atomic<bool>> update_claimed(tasks);
  std::deque<Counter> next_chunk;  // hands out each shared tensor's chunks for their norms (none without norms)
  std::vector<std::atomic<int64_t>> chunks_left(shared.size());  // chunks whose norms are not summed yet
  std::vector<std::atomic<bool>> ready(shared.size());           // the tensor's trust ratio is known
  for (int64_t k = 0; k < tasks; ++k) update_claimed[k].store(!updates, std::memory_order_relaxed);
  for (size_t s = 0; s < shared.size(); ++s) {
    const Shared& sh = shared[s];
    next_chunk.emplace_back(norms ? sh.chunks : 0);
    chunks_left[s].store(sh.chunks, std::memory_order_relaxed);
    ready[s].store(!norms, std::memory_order_relaxed);
    if (!norms) {  // no norms to hand out: thread k updates the k-th of `threads` equal runs of chunks
      shared_lam[s] = h.adapt ? D(a.trust_in[sh.tensor]) : D(1);
      for (int k = 0; k < threads; ++k) {
        std::fill(&owners[sh.first + k * sh.chunks / threads], &owners[sh.first + (k + 1) * sh.chunks / threads], k);
      }
    }
  }
  std::atomic<int64_t> updates_left{updates ? shared_chunks : 0};  // shared chunks not updated yet

  // (trust_norm "update" with weight decay reads w for |g + wd * w| anyway, and sums |w|^2 with it)
  const bool may_carry = a.weight_sums_in != nullptr && !(h.trust_update && h.has_wd);
  auto carried = [&](int64_t t) { return may_carry && !(a.weight_sums_in[t] < 0); };
  // One tensor's trust ratio from its sums (or as given), and what the step reports of it.
  auto ratio = [&](int64_t t, const double* totals) -> D {
    if (a.phase == kUpdate) return h.adapt ? D(a.trust_in[t]) : D(1);
    const D lam = trust_ratio<D>(totals, h);
    if (a.stats_out != nullptr) {
      a.stats_out[3 * t] = h.adapt ? float(std::sqrt(totals[0])) : NAN;
      a.stats_out[3 * t + 1] = h.adapt ? float(std::sqrt(totals[1])) : NAN;
      a.stats_out[3 * t + 2] = float(lam);
    }
    return lam;
  };
  auto claim = [](std::atomic<bool>& flag) { return !flag.load(std::memory_order_relaxed) && !flag.exchange(true); };

  auto run_whole = [&](int64_t first, int64_t last) {
    for (int64_t position = first; position < last; ++position) {
      const int64_t t = whole[position], n = numels[t];
      T* w = static_cast<T*>(a.params[t]);
      const T* g = static_cast<const T*>(a.grads[t]);
      double totals[3] = {carried(t) ? a.weight_sums_in[t] : 0.0, 0, 0};
      if (norms) sums(w, g, 0, n, h, !carried(t), totals);
      if (a.phase == kNorms) {
        for (int j = 0; j < 3; ++j) a.sums_out[3 * t + j] = totals[j];
        continue;
      }
      update_chunks(update, w, g, buffer<T>(a.buffers, t), 0, n, ratio(t, totals), h,
                    writes_sum(t) ? &chunk_written[written_first[t]] : nullptr);
    }
  };
  // The norms of chunk c of shared tensor s, by thread `me` (its owner from now on); the last
  // chunk summed adds the chunks' sums in order and takes the ratio (or, in phase kNorms, reports
  // the sums).
  auto run_norms = [&](int64_t s, int64_t c, int me) {
    const Shared& sh = shared[s];
    const int64_t t = sh.tensor;
    owners[sh.first + c] = me;  // (read by the updates after `ready`, which the last chunk releases)
    sums(static_cast<const T*>(a.params[t]), static_cast<const T*>(a.grads[t]), c * kChunk,
         std::min((c + 1) * kChunk, numels[t]), h, !carried(t), &chunk_sums[(sh.first + c) * 3]);
    if (chunks_left[s].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    double totals[3] = {carried(t) ? a.weight_sums_in[t] : 0.0, 0, 0};
    for (int64_t c = 0; c < sh.chunks; ++c) {
      for (int j = 0; j < 3; ++j) totals[j] += chunk_sums[(sh.first + c) * 3 + j];
    }
    if (a.phase == kNorms) {
      for (int j = 0; j < 3; ++j) a.sums_out[3 * t + j] = totals[j];
    } else {
      shared_lam[s] = ratio(t, totals);
    }
    ready[s].store(true, std::memory_order_release);
  };
  // The update of the chunks of shared tensor s that thread k owns, last to first (the task
  // claimed, the tensor ready).
  auto run_update = [&](int64_t s, int k) {
    const Shared& sh = shared[s];
    const int64_t t = sh.tensor;
    int64_t updated = 0;
    for (int64_t c = sh.chunks - 1; c >= 0; --c) {
      if (owners[sh.first + c] != k) continue;
      update_chunks(update, static_cast<T*>(a.params[t]), static_cast<const T*>(a.grads[t]), buffer<T>(a.buffers, t),
                    c * kChunk, std::min((c + 1) * kChunk, numels[t]), shared_lam[s], h,
                    writes_sum(t) ? &chunk_written[written_first[t] + c] : nullptr);
      ++updated;
    }
    if (updated > 0) updates_left.fetch_sub(updated, std::memory_order_acq_rel);
  };
  auto try_update = [&](int64_t s, int k) -> bool {  // runs it if ready and not taken; true if it is done or taken
    if (update_claimed[s * threads + k].load(std::memory_order_relaxed)) return true;
    if (!ready[s].load(std::memory_order_acquire)) return false;
    if (claim(update_claimed[s * threads + k])) run_update(s, k);
    return true;
  };

  Counter next_run(int64_t(runs.size()));
  std::atomic<bool> gave_up{false};
  run_threads(threads, [&]() {
    const int me = threads == 1 ? 0 : omp_get_thread_num();
    if (threads > 1 && omp_get_num_threads() < threads) {
      gave_up.store(true, std::memory_order_relaxed);  // a smaller team than asked for: nobody to wait for
    }
    std::vector<int64_t> mine;  // shared tensors with chunks of mine whose update awaits
    int64_t next_norm = 0;
    for (;;) {
      // 1. the shared tensors in order: chunks' norms while any is left, then the update of mine
      //    as soon as the tensor is ready (while they are in this core's cache): wait a little
      //    for the other threads' last chunks (a thread the machine took away is not waited for)
      if (next_norm < int64_t(shared.size())) {
        const int64_t s = next_norm++;
        bool took = false;
        for (int64_t c = next_chunk[s].next(); c >= 0; c = next_chunk[s].next()) {
          run_norms(s, c, me);
          took = true;
        }
        if (took || !norms) mine.push_back(s);
        if (took && !gave_up.load(std::memory_order_relaxed)) {
          const auto deadline = std::chrono::steady_clock::now() + kReadyWait;
          while (!ready[mine.back()].load(std::memory_order_acquire)) {
            if (std::chrono::steady_clock::now() > deadline) {
              gave_up.store(true, std::memory_order_relaxed);  // a thread is away: stop waiting this step
              break;
            }
            pause();
          }
        }
      }
      mine.erase(std::remove_if(mine.begin(), mine.end(), [&](int64_t s) { return try_update(s, me); }), mine.end());
      if (next_norm < int64_t(shared.size())) continue;
      // 2. the whole tensors, whoever is free
      const int64_t run = next_run.next();
      if (run >= 0) {
        run_whole(runs[run].first, runs[run].second);
        continue;
      }
      // 3. out of work: the updates of other threads' chunks, once ready (a thread the machine took
      //    away; or one that summed no chunk of a tensor, whose task is then empty)
      bool stole = false;
      for (int64_t k = 0; k < tasks && !stole; ++k) {
        if (!update_claimed[k].load(std::memory_order_relaxed) && ready[k / threads].load(std::memory_order_acquire)
            && claim(update_claimed[k])) {
          run_update(k / threads, int(k % threads));
          stole = true;
        }
      }
      if (stole) continue;
      if (updates_left.load(std::memory_order_acquire) == 0 || !updates) break;
      std::this_thread::yield();  // updates left whose norms another thread is still summing
    }
  });
  if (a.weight_sums_out != nullptr) {
    for (int64_t t = 0; t < count; ++t) {
      if (!writes_sum(t)) {
        a.weight_sums_out[t] = -1;
      } else if (updates) {
        double written = 0;  // (the chunks in order, as the norm pass adds them)
        for (int64_t c = written_first[t]; c < written_first[t + 1]; ++c) written += chunk_written[c];
        a.weight_sums_out[t] = written;
      }
    }
  }
}

// The sums of squares of `count` tensors of one dtype into sums_out[0..count), chunk by chunk:
// the chunks' sums are added in order, so the result does not depend on the number of threads
// (and equals the |w|^2 of the step's norm pass).
template <typename T>
void sums_of_tensors(int64_t count, const void* const* tensors, const int64_t* numels, int threads,
                     double* sums_out) {
  std::vector<int64_t> first_chunk(count + 1, 0);
  int64_t total = 0;
  for (int64_t t = 0; t < count; ++t) {
    first_chunk[t + 1] = first_chunk[t] + (numels[t] + kChunk - 1) / kChunk;
    total += numels[t];
  }
  const int64_t chunks = first_chunk[count];
  std::vector<double> chunk_sums(chunks, 0.0);
  std::vector<int64_t> owner(chunks);
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) owner[c] = t;
  }
  Counter next_chunk(chunks);
  run_threads(threads_for(total, threads), [&]() {
    for (int64_t c = next_chunk.next(); c >= 0; c = next_chunk.next()) {
      const int64_t t = owner[c], begin = (c - first_chunk[t]) * kChunk;
      chunk_sums[c] = sum_of_squares(static_cast<const T*>(tensors[t]), begin, std::min(begin + kChunk, numels[t]));
    }
  });
  for (int64_t t = 0; t < count; ++t) {
    double sum = 0;
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) sum += chunk_sums[c];
    sums_out[t] = sum;
  }
}

double read_scalar(const void* ptr, int kind, double fallback) {
  if (kind == 1) return *static_cast<const float*>(ptr);
  if (kind == 2) return *static_cast<const double*>(ptr);
  return fallback;
}

}  // namespace

extern "C" int64_t larsopt_kernel_args_size() { return static_cast<int64_t>(sizeof(LarsKernelArgs)); }

// Tensors of at least this many elements get their |w|^2 in weight_sums_out.
extern "C" int64_t larsopt_carry_min_numel() { return kCarryMinNumel; }

// Tensors of at least this many elements are shared by the threads (the tests size theirs from it).
extern "C" int64_t larsopt_shared_min_numel() { return kSharedNumel; }

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
