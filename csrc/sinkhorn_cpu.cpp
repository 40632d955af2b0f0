// C++ CPU backend of the batched entropic OT solve and the fused Sinkhorn KD forward
// (docs/ops/sinkhorn.md, docs/backends.md). The pure-PyTorch reference (selkd_kernels/ops/sinkhorn/reference.py) defines the
// semantics; this file must reproduce its iterates, stopping schedule and outputs.
//
// Problem, per row (paper 1, Eq. 5 / 12), entropy convention H(T) = -sum T (log T - 1):
//     S_eps(a, b) = min_{T >= 0, T 1 = a, T^T 1 = b} <T, M> - eps H(T)
// Dual (Eq. 13): max <alpha, a> + <beta, b> - eps sum_ij exp((alpha_i + beta_j - M_ij) / eps),
// optimal plan T = diag(u) K diag(v), K = exp(-M / eps), alpha = eps log u, beta = eps log v.
// One iteration (Alg. 3, Eq. 20) from u = v = 1: u <- a / (K v), then v <- b / (K^T u).
// Reported loss: the primal value of the plan after the last v-update,
//     <alpha, r> + <beta, b> - eps sum(r),   r = u * (K v)   (row sums of T),
// with zero-mass entries contributing nothing. Envelope gradients (Prop. 4.2):
//     dS/dz_S = (beta - <beta, p_S>) p_S / tau,   dS/dz_T = (alpha - <alpha, p_T>) p_T / tau.
//
// Two code paths, chosen like the reference's method="auto" (or forced by `method`); float32
// input whose cost range fits float64's standard domain but not float32's runs the first path in
// float64:
//  * shared cost and (max M - min M) / eps small for the dtype: the plain scaling iteration on
//    K = exp(-(M - min M) / eps), computed once, min M given back to alpha. A block of rows (one
//    per SIMD lane) is pushed through K together, so each K entry loaded from cache feeds a few
//    vectors of FMAs: register-tiled small GEMMs instead of one matrix-vector product per row.
//  * otherwise (large range, or one cost per row), per row, Schmitzer's stabilised scaling:
//    potentials f, g (units of eps) are kept apart from scalings u, v, and the row's kernel
//    Kt_ij = exp(f_i + g_j - M_ij / eps) is stored. Iterations are matrix-vector products with Kt;
//    whenever a new scaling would leave [1/thr, thr] (thr = 1e10 in float32, 1e100 in float64;
//    this also catches an underflowed denominator), the scalings are absorbed into the potentials
//    and that half-step is done exactly in the log domain, which rebuilds Kt with one pass of
//    exponentials. Entries of Kt below the smallest normal number are flushed to zero; with the
//    scalings bounded by thr the mass they could carry stays below ~1e-18 (float32) per entry.
// Both paths produce the reference's iterates up to rounding, so iteration counts under a
// tolerance agree with it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace selkd {
namespace {

// The hot loops are compiled for several x86 ISA levels and picked at load time, so one wheel runs
// everywhere and still uses FMA and AVX-512 instructions where the CPU has them. Helpers are
// force-inlined into the multiversioned entry points so that they inherit each clone's target.
// The x86-64-v4 clone lets the auto-vectoriser use 512-bit registers in the per-row path (1.5x on
// eps = 1e-3 problems on a Zen 5 core). The blocked path's vector type is explicit, so it gets a
// separate 512-bit build below instead.
// GCC, and clang >= 14 on ELF targets (target_clones needs ifunc), build the x86 ISA variants.
#if defined(__x86_64__) && defined(__GNUC__) && \
    (!defined(__clang__) || (__clang_major__ >= 14 && defined(__ELF__)))
#define SELKD_X86_DISPATCH 1
#else
#define SELKD_X86_DISPATCH 0
#endif
#if SELKD_X86_DISPATCH && !defined(SELKD_NO_MULTIVERSION)
#if defined(__clang__) || __GNUC__ >= 11  // the x86-64-v4 level name appeared in GCC 11
#define SELKD_CLONES \
  __attribute__((target_clones("default", "fma", "arch=haswell", "arch=x86-64-v4")))
#else
#define SELKD_CLONES __attribute__((target_clones("default", "fma", "arch=haswell")))
#endif
#else
#define SELKD_CLONES
#endif
// The shared-cost (blocked) path also has a 512-bit build, chosen at run time by vector_width().
#if SELKD_X86_DISPATCH && !defined(SELKD_NO_WIDE)
#define SELKD_HAVE_WIDE 1
#define SELKD_WIDE_TARGET \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi2")))
#else
#define SELKD_HAVE_WIDE 0
#endif
#if defined(__GNUC__)
#define SELKD_INLINE inline __attribute__((always_inline))
#else
#define SELKD_INLINE inline
#endif
// SELKD_OPENMP_SIMD: a serial build with -fopenmp-simd (the vectorisation pragmas, no runtime)
#if defined(_OPENMP) || defined(__clang__) || defined(SELKD_OPENMP_SIMD)
#define SELKD_PRAGMA(x) _Pragma(#x)
#else
#define SELKD_PRAGMA(x)
#endif
#define SELKD_SIMD SELKD_PRAGMA(omp simd)
#define SELKD_SIMD_SUM(v) SELKD_PRAGMA(omp simd reduction(+ : v))
#define SELKD_SIMD_MAX(v) SELKD_PRAGMA(omp simd reduction(max : v))

// ---------------------------------------------------------------------------------------------
// exp that the compiler can vectorise (libm's is a call per element). Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, Taylor polynomial for exp(r) (truncation below 1 ulp), 2^n built
// in the exponent bits. Inputs below `lo` return exactly 0 instead of a subnormal: subnormals are
// slow in the matrix-vector products and carry no usable mass (see the header comment).
template <typename T> struct ExpTraits;
template <> struct ExpTraits<float> {
  using Bits = uint32_t;
  static constexpr float lo = -86.5f, hi = 88.5f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr float shifter = 12582912.0f;  // 1.5 * 2^23: rounds to an integer in the mantissa
  static constexpr int mant = 23;
  static constexpr Bits bias = 127;
};
template <> struct ExpTraits<double> {
  using Bits = uint64_t;
  static constexpr double lo = -707.0, hi = 709.5;
  static constexpr double log2e = 1.4426950408889634;
  static constexpr double ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  static constexpr double shifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int mant = 52;
  static constexpr Bits bias = 1023;
};

template <typename T> SELKD_INLINE T exp_poly(T r);
template <> SELKD_INLINE float exp_poly<float>(float r) {
  // degree 7: remainder 0.347^8/8! ~ 5e-9 relative, under float's half ulp
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}
template <> SELKD_INLINE double exp_poly<double>(double r) {
  // degree 13: remainder 0.347^14/14! ~ 4e-18 relative
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  return p * r + 1.0;
}

// memcpy-based punning blocks GCC's vectoriser (it becomes a memset/memcpy pair); the builtin
// does not.
template <typename To, typename From> SELKD_INLINE To bit_cast(const From& x) {
#if defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 11)
  return __builtin_bit_cast(To, x);
#else
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
#endif
}

template <typename T> SELKD_INLINE T fast_exp(T x) {
  using E = ExpTraits<T>;
  using Bits = typename E::Bits;
  const T lo = E::lo, hi = E::hi;
  // comparisons are false for NaN, so NaN flows through to p and the result
  T xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  T kd = xc * E::log2e + E::shifter;
  T nf = kd - E::shifter;
  T r = xc - nf * E::ln2_hi;
  r = r - nf * E::ln2_lo;
  T p = exp_poly<T>(r);
  const Bits bits = (bit_cast<Bits>(kd) << E::mant) + (E::bias << E::mant);
  T y = p * bit_cast<T>(bits);
  const T zero = 0, inf = std::numeric_limits<T>::infinity();
  y = x < lo ? zero : y;
  return x > hi ? inf : y;
}

// Scalings outside [1/thr, thr] trigger an absorption into the potentials (stabilised path).
template <typename T> constexpr T scaling_threshold();
template <> constexpr float scaling_threshold<float>() { return 1e10f; }
template <> constexpr double scaling_threshold<double>() { return 1e100; }

// (max M - min M) / eps up to which K = exp(-(M - min M)/eps) is used directly, per compute
// dtype. The values are the reference's STANDARD_DOMAIN_MAX_RANGE, passed in by every call so
// that both implementations pick the same iteration from one definition.
struct RangeLimits {
  double f32, f64;
  template <typename T> double of() const { return std::is_same<T, double>::value ? f64 : f32; }
};

// SIMD vector of W bytes: 16 (baseline 128-bit build), 32 (the multiversioned build: AVX2 where
// the CPU has it) or 64 (AVX-512, where the CPU and OS support it); see vector_width().
template <typename T, int W> struct VecOf {
  typedef T type __attribute__((vector_size(W), may_alias));
};

inline bool cpu_has_avx512() {
#if SELKD_HAVE_WIDE
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return cpu;
#else
  return false;
#endif
}

// Vector bytes of the blocked path for this call: 64 where AVX-512 is usable, else 32, unless
// SELKD_CPU_VECTOR_BITS holds it to 128 / 256 / 512 bits (for comparisons). The variable is read
// on every solve (a getenv, well under a microsecond) so tests and benchmarks can compare the
// widths in one process; any other value, or 512 where the CPU or build has no AVX-512, is a
// ValueError rather than a silent fallback that would make a comparison meaningless.
inline int vector_width() {
  const char* bits = std::getenv("SELKD_CPU_VECTOR_BITS");
  if (bits == nullptr || bits[0] == '\0') return cpu_has_avx512() ? 64 : 32;
  if (std::strcmp(bits, "128") == 0) return 16;
  if (std::strcmp(bits, "256") == 0) return 32;
  TORCH_CHECK_VALUE(std::strcmp(bits, "512") == 0,
                    "SELKD_CPU_VECTOR_BITS must be 128, 256 or 512, got '", bits, "'");
  TORCH_CHECK_VALUE(cpu_has_avx512(), "SELKD_CPU_VECTOR_BITS=512, but this ",
                    SELKD_HAVE_WIDE ? "CPU (or its OS) does not support AVX-512"
                                    : "build has no 512-bit path (x86-64 with GCC or clang >= 14 only)",
                    "; use 256 or 128");
  return 64;
}

}  // namespace

namespace detail {

// Everything one solve needs; pointers are to contiguous row-major buffers of the compute dtype.
template <typename T> struct Problem {
  const T* a;          // (B, m)
  const T* b;          // (B, n)
  const T* M;          // (m, n) shared or (B, m, n)
  const uint8_t* bad;  // (B,) rows with a NaN or inf among their inputs
  int64_t B, m, n;
  bool shared;
  T eps;
  int64_t n_iters;
  bool use_tol;
  double tol;
  int64_t check_every;
  // shared-kernel path only
  const T* K;   // (m, n) exp(-(M - shift)/eps)
  const T* KT;  // (n, m) its transpose, so both products read K contiguously
  T shift;      // min M, given back to alpha
  // outputs
  T* loss;
  T* alpha;
  T* beta;
  int32_t* iters;
  T* err;
};

// Potentials, loss and error of one row from its final scalings. With potentials f, g (units of
// eps; stabilised path) alpha = eps (f + log u), beta = eps (g + log v). Without them (f, g null;
// plain scaling) they come from the last updates' denominators, alpha = eps (log a - log sden) +
// shift, beta = eps (log b - log cden), as in the reference's standard-domain solve: eps log u
// would be -inf where a tiny positive mass makes u underflow to 0, and alpha r = -inf * 0 = NaN.
template <typename T>
SELKD_INLINE void finalize_row(const T* a, const T* b, int64_t m, int64_t n, T eps, const T* f,
                               T shift, const T* u, const T* s, const T* g, const T* v,
                               const T* sden, const T* cden, T* alpha, T* beta, T* loss,
                               T* err) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const T tiny = std::numeric_limits<T>::min();  // smallest normal number
  // double accumulators: the loss is a difference of sums of comparable size
  double acc = 0.0, mass = 0.0, e = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    const T r = u[i] * s[i];
    T al = ninf;
    if (a[i] > 0) {
      // log u equals log a - log sden up to rounding while u is a normal number: one log
      if (f)
        al = eps * (f[i] + std::log(u[i]));
      else
        al = (u[i] >= tiny ? eps * std::log(u[i])
                           : eps * (std::log(a[i]) - std::log(sden[i]))) + shift;
      acc += static_cast<double>(al) * r;
    }
    alpha[i] = al;
    mass += r;
    e += std::abs(static_cast<double>(r) - a[i]);
  }
  for (int64_t j = 0; j < n; ++j) {
    T be = ninf;
    if (b[j] > 0) {
      if (g)
        be = eps * (g[j] + std::log(v[j]));
      else
        be = v[j] >= tiny ? eps * std::log(v[j]) : eps * (std::log(b[j]) - std::log(cden[j]));
      acc += static_cast<double>(be) * b[j];
    }
    beta[j] = be;
  }
  *loss = static_cast<T>(acc - static_cast<double>(eps) * mass);
  *err = static_cast<T>(e);
}

// ------------------------------------------------------------------ shared-kernel (blocked) path
// A block of rows is solved together: every per-class quantity is stored as NV SIMD vectors
// whose lanes are the block's rows, so the iteration becomes small GEMMs against the shared K.
// Y[i] = sum_j K[i, j] X[j] for R output rows at a time: R x NV accumulators stay in registers
// and every K entry, broadcast once, feeds NV fused multiply-adds (the 6 x 2-vector shape is the
// usual register tile of 16-register SIMD units).
template <typename T, typename V, int NV, int R>
SELKD_INLINE void lanes_tile(const T* K, int64_t cols, const V* X, V* Y) {
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NV; ++q) acc[r][q] = V{};
  for (int64_t j = 0; j < cols; ++j) {
    V x[NV];
    for (int q = 0; q < NV; ++q) x[q] = X[j * NV + q];
    for (int r = 0; r < R; ++r) {
      const T k = K[r * cols + j];
      for (int q = 0; q < NV; ++q) acc[r][q] += k * x[q];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NV; ++q) Y[r * NV + q] = acc[r][q];
}

template <typename T, typename V, int NV>
SELKD_INLINE void lanes_matmul(const T* K, int64_t rows, int64_t cols, const V* X, V* Y) {
  // 16 vector registers (AVX2) or 32 (AVX-512): R * NV accumulators, NV inputs, one broadcast.
  // For the 512-bit NV = 2 tile, R from 6 to 14 measured the same on the cifar workload.
  constexpr bool wide = sizeof(V) == 64;
  constexpr int R = NV == 1 ? (wide ? 16 : 8) : (wide ? 12 : 6);
  int64_t i = 0;
  for (; i + R <= rows; i += R) lanes_tile<T, V, NV, R>(K + i * cols, cols, X, Y + i * NV);
  for (; i + 2 <= rows; i += 2) lanes_tile<T, V, NV, 2>(K + i * cols, cols, X, Y + i * NV);
  for (; i < rows; ++i) lanes_tile<T, V, NV, 1>(K + i * cols, cols, X, Y + i * NV);
}

// The per-class quantities of one block of rows, NV vectors each (lane l = row r0 + l), carved
// out of caller-provided scratch so that a worker allocates once for all its blocks. Every member
// is force-inlined, like the other helpers, so that it takes the target of the clone it runs in.
template <typename T, int W, int NV> struct LaneBlock {
  using V = typename VecOf<T, W>::type;
  static constexpr int VL = static_cast<int>(sizeof(V) / sizeof(T));
  static constexpr int L = NV * VL;
  int64_t m, n;
  V *A, *U, *S, *Sp, *Bv, *Vv, *C;  // S = K v (next u's denominator), Sp: current u's; C = K^T u
  T *lu, *ls, *lv, *lsd, *lcd;      // one lane unpacked, for finalize_row

  SELKD_INLINE LaneBlock(int64_t m_, int64_t n_, T* raw) : m(m_), n(n_) {
    T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw) + sizeof(V) - 1) &
                                   ~(uintptr_t)(sizeof(V) - 1));
    A = reinterpret_cast<V*>(base);
    U = A + m * NV;
    S = U + m * NV;
    Sp = S + m * NV;
    Bv = Sp + m * NV;
    Vv = Bv + n * NV;
    C = Vv + n * NV;
    lu = reinterpret_cast<T*>(C + n * NV);
    ls = lu + m;
    lv = ls + m;
    lsd = lv + n;
    lcd = lsd + m;
  }
  // element of lane l in the NV-vector pack number idx
  SELKD_INLINE static T& at(V* arr, int64_t idx, int l) {
    return reinterpret_cast<T*>(arr + idx * NV + l / VL)[l % VL];
  }
  // spare lanes of a short block replay row r0 and are never written back
  SELKD_INLINE void load(const Problem<T>& P, int64_t r0, int nl) {
    for (int l = 0; l < L; ++l) {
      const int64_t row = r0 + (l < nl ? l : 0);
      const T* ar = P.a + row * m;
      const T* br = P.b + row * n;
      for (int64_t i = 0; i < m; ++i) at(A, i, l) = ar[i];
      for (int64_t j = 0; j < n; ++j) at(Bv, j, l) = br[j];
    }
  }
  // ||u * (K v) - a||_1 of lane l, accumulated in double as in the reference
  SELKD_INLINE double row_error(int l) const {
    double e = 0.0;
    for (int64_t i = 0; i < m; ++i)
      e += std::abs(static_cast<double>(at(U, i, l) * at(S, i, l)) - at(A, i, l));
    return e;
  }
  SELKD_INLINE void emit(const Problem<T>& P, int64_t row, int l, int32_t it) {
    for (int64_t i = 0; i < m; ++i) {
      lu[i] = at(U, i, l);
      ls[i] = at(S, i, l);
      lsd[i] = at(Sp, i, l);
    }
    for (int64_t j = 0; j < n; ++j) { lv[j] = at(Vv, j, l); lcd[j] = at(C, j, l); }
    finalize_row<T>(P.a + row * m, P.b + row * n, m, n, P.eps, nullptr, P.shift, lu, ls, nullptr,
                    lv, lsd, lcd, P.alpha + row * m, P.beta + row * n, P.loss + row, P.err + row);
    P.iters[row] = it;
  }
};

// Solves rows [r0, r0 + nl) with NV vectors per quantity (nl <= NV * lanes per vector). `raw` is
// scratch of at least blocked_scratch_size<T>(m, n) elements.
template <typename T, int W, int NV>
SELKD_INLINE void solve_block(const Problem<T>& P, int64_t r0, int nl, T* raw) {
  using Block = LaneBlock<T, W, NV>;
  using V = typename Block::V;
  constexpr int L = Block::L;
  const int64_t m = P.m, n = P.n;
  Block q(m, n, raw);
  q.load(P, r0, nl);
  bool done[L];
  for (int l = 0; l < L; ++l) done[l] = l >= nl;
  int left = nl;

  const V one = V{} + T(1);
  for (int64_t j = 0; j < n * NV; ++j) q.Vv[j] = one;
  lanes_matmul<T, V, NV>(P.K, m, n, q.Vv, q.S);
  for (int64_t t = 1; t <= P.n_iters && left > 0; ++t) {
    for (int64_t i = 0; i < m * NV; ++i) q.U[i] = q.A[i] / q.S[i];
    lanes_matmul<T, V, NV>(P.KT, n, m, q.U, q.C);
    for (int64_t j = 0; j < n * NV; ++j) q.Vv[j] = q.Bv[j] / q.C[j];
    // S = K v serves both this iteration's error and the next u-update; the old S, the
    // denominator of this U, is kept for the potentials (see finalize_row)
    std::swap(q.S, q.Sp);
    lanes_matmul<T, V, NV>(P.K, m, n, q.Vv, q.S);
    if (!P.use_tol || (t % P.check_every != 0 && t != P.n_iters)) continue;
    for (int l = 0; l < L; ++l) {
      // a NaN error never passes, as in the reference
      if (done[l] || !(q.row_error(l) <= P.tol)) continue;
      q.emit(P, r0 + l, l, static_cast<int32_t>(t));
      done[l] = true;
      --left;
    }
  }
  for (int l = 0; l < L; ++l)
    if (!done[l]) q.emit(P, r0 + l, l, static_cast<int32_t>(P.n_iters));
}

template <typename T, int W> constexpr int64_t block_rows() {
  return 2 * static_cast<int64_t>(W / sizeof(T));
}

template <typename T, int W> int64_t blocked_scratch_size(int64_t m, int64_t n) {
  constexpr int64_t L = block_rows<T, W>();
  return (4 * m + 3 * n) * L + 3 * m + 2 * n + 64;
}

// Blocks of block_rows<T, W>() rows; a block with at most half that many rows (the batch's tail)
// runs with one vector per quantity so that small batches do not pay for empty lanes.
template <typename T, int W>
SELKD_INLINE void blocked_worker_impl(const Problem<T>& P, int64_t blk_begin, int64_t blk_end) {
  constexpr int64_t LB = block_rows<T, W>();
  std::vector<T> raw(blocked_scratch_size<T, W>(P.m, P.n));
  for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
    const int64_t r0 = blk * LB;
    const int nl = static_cast<int>(std::min<int64_t>(LB, P.B - r0));
    if (nl <= LB / 2)
      solve_block<T, W, 1>(P, r0, nl, raw.data());
    else
      solve_block<T, W, 2>(P, r0, nl, raw.data());
  }
}

// ------------------------------------------------------------------ per-row stabilised path
// s_i = sum_j Kt_ij v_j, four rows at a time so v is loaded once per four FMAs.
template <typename T>
SELKD_INLINE void matvec_rows(const T* Kt, int64_t m, int64_t n, const T* v, T* s) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const T* k0 = Kt + i * n;
    const T* k1 = k0 + n;
    const T* k2 = k1 + n;
    const T* k3 = k2 + n;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    SELKD_PRAGMA(omp simd reduction(+ : s0, s1, s2, s3))
    for (int64_t j = 0; j < n; ++j) {
      const T x = v[j];
      s0 += k0[j] * x;
      s1 += k1[j] * x;
      s2 += k2[j] * x;
      s3 += k3[j] * x;
    }
    s[i] = s0; s[i + 1] = s1; s[i + 2] = s2; s[i + 3] = s3;
  }
  for (; i < m; ++i) {
    const T* k0 = Kt + i * n;
    T s0 = 0;
    SELKD_SIMD_SUM(s0)
    for (int64_t j = 0; j < n; ++j) s0 += k0[j] * v[j];
    s[i] = s0;
  }
}

// c_j = sum_i Kt_ij u_i, four rows per sweep over c.
template <typename T>
SELKD_INLINE void matvec_cols(const T* Kt, int64_t m, int64_t n, const T* u, T* c) {
  for (int64_t j = 0; j < n; ++j) c[j] = 0;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const T* k0 = Kt + i * n;
    const T* k1 = k0 + n;
    const T* k2 = k1 + n;
    const T* k3 = k2 + n;
    const T u0 = u[i], u1 = u[i + 1], u2 = u[i + 2], u3 = u[i + 3];
    SELKD_SIMD
    for (int64_t j = 0; j < n; ++j) c[j] += k0[j] * u0 + k1[j] * u1 + k2[j] * u2 + k3[j] * u3;
  }
  for (; i < m; ++i) {
    const T* k0 = Kt + i * n;
    const T u0 = u[i];
    SELKD_SIMD
    for (int64_t j = 0; j < n; ++j) c[j] += k0[j] * u0;
  }
}

// Exact log-domain u-update f_i = log a_i - LSE_j(g_j - M_ij/eps) (scalings already absorbed);
// rebuilds Kt_ij = exp(f_i + g_j - M_ij/eps), which is the normalised row of exponentials times
// a_i, so only one pass of exponentials is needed.
template <typename T>
SELKD_INLINE void log_u_update(const T* a, const T* g, const T* M, int64_t m, int64_t n, T inv_eps,
                               T* Kt, T* f) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < m; ++i) {
    T* k = Kt + i * n;
    const T* Mi = M + i * n;
    if (!(a[i] > 0)) {
      f[i] = ninf;
      for (int64_t j = 0; j < n; ++j) k[j] = 0;
      continue;
    }
    T mx = ninf;
    SELKD_SIMD_MAX(mx)
    for (int64_t j = 0; j < n; ++j) {
      const T x = g[j] - Mi[j] * inv_eps;
      mx = x > mx ? x : mx;
    }
    T sum = 0;
    SELKD_SIMD_SUM(sum)
    for (int64_t j = 0; j < n; ++j) {
      const T e = fast_exp<T>(g[j] - Mi[j] * inv_eps - mx);
      k[j] = e;
      sum += e;
    }
    f[i] = std::log(a[i]) - mx - std::log(sum);
    const T scale = a[i] / sum;
    SELKD_SIMD
    for (int64_t j = 0; j < n; ++j) k[j] *= scale;
  }
}

// Exact log-domain v-update g_j = log b_j - LSE_i(f_i - M_ij/eps), column-wise over a row-major
// Kt; colmax and colsum are length-n scratch.
template <typename T>
SELKD_INLINE void log_v_update(const T* b, const T* f, const T* M, int64_t m, int64_t n, T inv_eps,
                               T* Kt, T* g, T* colmax, T* colsum) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) { colmax[j] = ninf; colsum[j] = 0; }
  for (int64_t i = 0; i < m; ++i) {
    if (f[i] == ninf) continue;
    const T fi = f[i];
    const T* Mi = M + i * n;
    SELKD_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const T x = fi - Mi[j] * inv_eps;
      colmax[j] = x > colmax[j] ? x : colmax[j];
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    T* k = Kt + i * n;
    if (f[i] == ninf) {
      for (int64_t j = 0; j < n; ++j) k[j] = 0;
      continue;
    }
    const T fi = f[i];
    const T* Mi = M + i * n;
    SELKD_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const T e = fast_exp<T>(fi - Mi[j] * inv_eps - colmax[j]);
      k[j] = e;
      colsum[j] += e;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    if (b[j] > 0) {
      g[j] = std::log(b[j]) - colmax[j] - std::log(colsum[j]);
      colsum[j] = b[j] / colsum[j];  // now the column's scale
    } else {
      g[j] = ninf;
      colsum[j] = 0;
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    T* k = Kt + i * n;
    SELKD_SIMD
    for (int64_t j = 0; j < n; ++j) k[j] *= colsum[j];
  }
}

// out = num / den where num > 0 (0 elsewhere); false if one of those scalings leaves
// [1/thr, thr], which also catches a zero or subnormal denominator and NaN. One vectorised pass.
template <typename T>
SELKD_INLINE bool scaling_update(const T* num, const T* den, int64_t len, T* out) {
  const T thr = scaling_threshold<T>();
  const T ithr = T(1) / thr;
  const T zero = 0;
  int bad = 0;
  SELKD_PRAGMA(omp simd reduction(+ : bad))
  for (int64_t i = 0; i < len; ++i) {
    const T x = num[i];
    const T q = x / den[i];
    const bool has = x > zero;
    out[i] = has ? q : zero;
    bad += (has && !(q >= ithr && q <= thr)) ? 1 : 0;
  }
  return bad == 0;
}

template <typename T>
SELKD_INLINE void solve_row_stabilised(const Problem<T>& P, bool standard, int64_t row, T* Kt,
                                       T* f, T* g, T* u, T* v, T* s, T* c, T* w) {
  const int64_t m = P.m, n = P.n;
  const T* a = P.a + row * m;
  const T* b = P.b + row * n;
  const T* M = P.shared ? P.M : P.M + row * m * n;
  const T eps = P.eps;
  const T inv_eps = T(1) / eps;
  for (int64_t i = 0; i < m; ++i) { f[i] = 0; u[i] = 1; }
  for (int64_t j = 0; j < n; ++j) { g[j] = 0; v[j] = 1; }
  bool kt_valid = false;
  if (standard) {
    // the reference's standard domain: K = exp(-(M - min M)/eps), min M handed to alpha
    T mn = std::numeric_limits<T>::infinity();
    SELKD_PRAGMA(omp simd reduction(min : mn))
    for (int64_t k = 0; k < m * n; ++k) mn = M[k] < mn ? M[k] : mn;
    SELKD_SIMD
    for (int64_t k = 0; k < m * n; ++k) Kt[k] = fast_exp<T>(-(M[k] - mn) * inv_eps);
    for (int64_t i = 0; i < m; ++i) f[i] = mn * inv_eps;
    matvec_rows<T>(Kt, m, n, v, s);
    kt_valid = true;
  }
  int32_t it = 0;
  for (int64_t t = 1; t <= P.n_iters; ++t) {
    // u-update
    // a rejected candidate u is discarded: the fallback below resets u and reads only v
    if (!(kt_valid && scaling_update<T>(a, s, m, u))) {
      for (int64_t j = 0; j < n; ++j) { g[j] += std::log(v[j]); v[j] = 1; }
      log_u_update<T>(a, g, M, m, n, inv_eps, Kt, f);
      for (int64_t i = 0; i < m; ++i) u[i] = 1;
      kt_valid = true;
    }
    // v-update
    matvec_cols<T>(Kt, m, n, u, c);
    if (!scaling_update<T>(b, c, n, v)) {
      for (int64_t i = 0; i < m; ++i) { f[i] += std::log(u[i]); u[i] = 1; }
      log_v_update<T>(b, f, M, m, n, inv_eps, Kt, g, c, w);
      for (int64_t j = 0; j < n; ++j) v[j] = 1;
    }
    // s = Kt v: this iteration's row sums (with u) and the next u-update's denominator
    matvec_rows<T>(Kt, m, n, v, s);
    it = static_cast<int32_t>(t);
    if (P.use_tol && (t % P.check_every == 0 || t == P.n_iters)) {
      double e = 0.0;
      for (int64_t i = 0; i < m; ++i) e += std::abs(static_cast<double>(u[i] * s[i]) - a[i]);
      if (e <= P.tol) break;
    }
  }
  finalize_row<T>(a, b, m, n, eps, f, T(0), u, s, g, v, nullptr, nullptr, P.alpha + row * m,
                  P.beta + row * n, P.loss + row, P.err + row);
  P.iters[row] = it;
}

template <typename T>
SELKD_INLINE void rows_worker_impl(const Problem<T>& P, bool standard, int64_t begin,
                                   int64_t end) {
  const int64_t m = P.m, n = P.n;
  std::vector<T> buf(m * n + 4 * m + 5 * n);
  T* Kt = buf.data();
  T* f = Kt + m * n;
  T* u = f + m;
  T* s = u + m;
  T* g = s + m;
  T* v = g + n;
  T* c = v + n;
  T* w = c + n;
  for (int64_t row = begin; row < end; ++row) {
    if (P.bad[row]) continue;
    solve_row_stabilised<T>(P, standard, row, Kt, f, g, u, v, s, c, w);
  }
}

// Multiversioned entry points (see SELKD_CLONES); they must not be templates.
SELKD_CLONES void blocked_worker_f32(const Problem<float>& P, int64_t b, int64_t e) {
  blocked_worker_impl<float, 32>(P, b, e);
}
SELKD_CLONES void blocked_worker_f64(const Problem<double>& P, int64_t b, int64_t e) {
  blocked_worker_impl<double, 32>(P, b, e);
}
// 128-bit twins (SELKD_CPU_VECTOR_BITS=128): baseline x86-64 (SSE2) code, for comparisons.
void blocked_worker_f32_narrow(const Problem<float>& P, int64_t b, int64_t e) {
  blocked_worker_impl<float, 16>(P, b, e);
}
void blocked_worker_f64_narrow(const Problem<double>& P, int64_t b, int64_t e) {
  blocked_worker_impl<double, 16>(P, b, e);
}
#if SELKD_HAVE_WIDE
// 512-bit twins of the blocked path, called only when vector_width() says the CPU and the OS
// support AVX-512. On cores with full-width 512-bit FMA units (AMD Zen 5, Intel server cores)
// they double the multiply-add rate of the small GEMMs that dominate the shared-cost solve.
SELKD_WIDE_TARGET void blocked_worker_f32_wide(const Problem<float>& P, int64_t b, int64_t e) {
  blocked_worker_impl<float, 64>(P, b, e);
}
SELKD_WIDE_TARGET void blocked_worker_f64_wide(const Problem<double>& P, int64_t b, int64_t e) {
  blocked_worker_impl<double, 64>(P, b, e);
}
#endif
SELKD_CLONES void rows_worker_f32(const Problem<float>& P, bool st, int64_t b, int64_t e) {
  rows_worker_impl<float>(P, st, b, e);
}
SELKD_CLONES void rows_worker_f64(const Problem<double>& P, bool st, int64_t b, int64_t e) {
  rows_worker_impl<double>(P, st, b, e);
}
SELKD_CLONES void exp_fill_f32(float* out, const float* M, int64_t len, float shift, float inv_eps) {
  SELKD_SIMD
  for (int64_t k = 0; k < len; ++k) out[k] = fast_exp<float>(-(M[k] - shift) * inv_eps);
}
SELKD_CLONES void exp_fill_f64(double* out, const double* M, int64_t len, double shift,
                               double inv_eps) {
  SELKD_SIMD
  for (int64_t k = 0; k < len; ++k) out[k] = fast_exp<double>(-(M[k] - shift) * inv_eps);
}

// Rows [begin, end) of softmax(z / tau), like torch.softmax(z / tau): divide, shift by the row
// max, exponentiate, normalise. The vectorised exp flushes arguments below ExpTraits::lo to 0;
// torch gives subnormals there, so those rare entries are recomputed with std::exp to keep the
// same zero pattern (a zero probability means a -inf potential).
template <typename T>
SELKD_INLINE void softmax_block_impl(const T* z, int64_t begin, int64_t end, int64_t k, T tau,
                                     T* p) {
  const T lo = ExpTraits<T>::lo, ninf = -std::numeric_limits<T>::infinity();
  for (int64_t r = begin; r < end; ++r) {
    const T* zr = z + r * k;
    T* pr = p + r * k;
    T mx = ninf;
    // NaN entries never win the comparison; they turn the row's sum into NaN below
    SELKD_SIMD_MAX(mx)
    for (int64_t i = 0; i < k; ++i) {
      const T x = zr[i] / tau;
      pr[i] = x;
      mx = x > mx ? x : mx;
    }
    // an all -inf or NaN row: let NaN appear so the row is reported as bad
    if (std::isinf(mx)) mx = mx > 0 ? mx : T(0);
    T sum = 0;
    int tiny = 0;
    SELKD_PRAGMA(omp simd reduction(+ : sum, tiny))
    for (int64_t i = 0; i < k; ++i) {
      const T d = pr[i] - mx;
      const T e = fast_exp<T>(d);
      tiny += (d < lo && d > ninf) ? 1 : 0;
      pr[i] = e;
      sum += e;
    }
    if (tiny) {
      sum = 0;
      for (int64_t i = 0; i < k; ++i) {
        const T d = zr[i] / tau - mx;
        if (d < lo && d > ninf) pr[i] = std::exp(d);
        sum += pr[i];
      }
    }
    const T inv = T(1) / sum;
    SELKD_SIMD
    for (int64_t i = 0; i < k; ++i) pr[i] *= inv;
  }
}
SELKD_CLONES void softmax_block_f32(const float* z, int64_t b, int64_t e, int64_t k, float tau,
                                    float* p) {
  softmax_block_impl<float>(z, b, e, k, tau, p);
}
SELKD_CLONES void softmax_block_f64(const double* z, int64_t b, int64_t e, int64_t k, double tau,
                                    double* p) {
  softmax_block_impl<double>(z, b, e, k, tau, p);
}
inline void softmax_block(const float* z, int64_t b, int64_t e, int64_t k, float tau, float* p) {
  softmax_block_f32(z, b, e, k, tau, p);
}
inline void softmax_block(const double* z, int64_t b, int64_t e, int64_t k, double tau,
                          double* p) {
  softmax_block_f64(z, b, e, k, tau, p);
}

// Rows per block of the blocked path: it depends on the vector width chosen at run time.
// `width` (vector bytes) is decided once per solve (vector_width()) so the block count and every
// worker agree.
template <typename T> int64_t blocked_rows_per_block(int width) {
  return width == 64 ? block_rows<T, 64>() : width == 16 ? block_rows<T, 16>()
                                                         : block_rows<T, 32>();
}
inline void blocked_worker(const Problem<float>& P, int width, int64_t b, int64_t e) {
#if SELKD_HAVE_WIDE
  if (width == 64) return blocked_worker_f32_wide(P, b, e);
#endif
  if (width == 16) return blocked_worker_f32_narrow(P, b, e);
  blocked_worker_f32(P, b, e);
}
inline void blocked_worker(const Problem<double>& P, int width, int64_t b, int64_t e) {
#if SELKD_HAVE_WIDE
  if (width == 64) return blocked_worker_f64_wide(P, b, e);
#endif
  if (width == 16) return blocked_worker_f64_narrow(P, b, e);
  blocked_worker_f64(P, b, e);
}
inline void rows_worker(const Problem<float>& P, bool st, int64_t b, int64_t e) { rows_worker_f32(P, st, b, e); }
inline void rows_worker(const Problem<double>& P, bool st, int64_t b, int64_t e) { rows_worker_f64(P, st, b, e); }
inline void exp_fill(float* o, const float* M, int64_t len, float sh, float ie) { exp_fill_f32(o, M, len, sh, ie); }
inline void exp_fill(double* o, const double* M, int64_t len, double sh, double ie) { exp_fill_f64(o, M, len, sh, ie); }

}  // namespace detail

namespace {

using detail::Problem;

// Scalar arguments of one solve. method 0: as the reference's method="auto", 1: "standard",
// 2: "log".
struct SolveArgs {
  double eps;
  int64_t n_iters;
  double tol;  // <= 0: no tolerance
  int64_t check_every;
  int64_t method;
  RangeLimits limits;
};

// Output tensors of one solve, preallocated in the compute dtype.
struct SolveOut {
  at::Tensor loss, alpha, beta, iters, err;
};

SolveOut empty_outputs(int64_t B, int64_t m, int64_t n, const at::TensorOptions& opts) {
  return {at::empty({B}, opts), at::empty({B, m}, opts), at::empty({B, n}, opts),
          at::empty({B}, opts.dtype(at::kInt)), at::empty({B}, opts)};
}

// (max M - min M) / eps; NaN for a NaN cost
double cost_range(const at::Tensor& cost, double eps) {
  auto mm = at::aminmax(cost);
  return (std::get<1>(mm).item<double>() - std::get<0>(mm).item<double>()) / eps;
}

template <typename T> bool use_standard_domain(const at::Tensor& cost, const SolveArgs& s) {
  if (s.method == 1) return true;
  if (s.method == 2) return false;
  // a NaN range fails the comparison: the log path, like the reference
  return cost_range(cost, s.eps) <= s.limits.of<T>();
}

template <typename T>
void mark_bad_rows(const T* a, const T* b, const T* M, int64_t B, int64_t m, int64_t n,
                   bool shared, uint8_t* bad) {
  bool cost_ok = true;
  if (shared)
    for (int64_t k = 0; k < m * n; ++k) cost_ok = cost_ok && std::isfinite(M[k]);
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      bool ok = cost_ok;
      for (int64_t i = 0; i < m; ++i) ok = ok && std::isfinite(a[r * m + i]);
      for (int64_t j = 0; j < n; ++j) ok = ok && std::isfinite(b[r * n + j]);
      if (!shared) {
        const T* Mr = M + r * m * n;
        for (int64_t k = 0; k < m * n; ++k) ok = ok && std::isfinite(Mr[k]);
      }
      bad[r] = ok ? 0 : 1;
    }
  });
}

template <typename T>
void solve_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost,
                const SolveArgs& s, SolveOut& out);

// float32 input with a shared cost too wide for float32 scalings (eps = 0.01 with costs in
// [0, 1] is the common case) but within float64's standard-domain range: the blocked GEMM
// iteration in float64 is both faster than the per-row stabilised path (no per-row kernel, twice
// the flops of float32 but register-tiled) and more accurate than float32 arithmetic. Returns
// whether it solved the problem.
bool solve_float32_in_float64_band(const at::Tensor& a, const at::Tensor& b,
                                   const at::Tensor& cost, const SolveArgs& s, SolveOut& out) {
  if (cost.dim() != 2 || s.method != 0) return false;
  const double range = cost_range(cost, s.eps);
  if (!(range > s.limits.f32 && range <= s.limits.f64)) return false;
  const auto opts = a.options().dtype(at::kDouble);
  SolveOut o64 = empty_outputs(a.size(0), a.size(1), b.size(1), opts);
  o64.iters = out.iters;
  SolveArgs s64 = s;
  s64.method = 1;
  solve_into<double>(a.to(at::kDouble), b.to(at::kDouble), cost.to(at::kDouble), s64, o64);
  out.loss.copy_(o64.loss);
  out.alpha.copy_(o64.alpha);
  out.beta.copy_(o64.beta);
  out.err.copy_(o64.err);
  return true;
}

template <typename T>
Problem<T> make_problem(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost,
                        const SolveArgs& s, SolveOut& out, const uint8_t* bad) {
  Problem<T> P{};
  P.a = a.data_ptr<T>();
  P.b = b.data_ptr<T>();
  P.M = cost.data_ptr<T>();
  P.bad = bad;
  P.B = a.size(0); P.m = a.size(1); P.n = b.size(1);
  P.shared = cost.dim() == 2;
  P.eps = static_cast<T>(s.eps);
  P.n_iters = s.n_iters;
  P.use_tol = s.tol > 0;
  P.tol = s.tol;
  P.check_every = s.check_every;
  P.loss = out.loss.data_ptr<T>();
  P.alpha = out.alpha.data_ptr<T>();
  P.beta = out.beta.data_ptr<T>();
  P.iters = out.iters.data_ptr<int32_t>();
  P.err = out.err.data_ptr<T>();
  return P;
}

// The shared-kernel path: K = exp(-(M - min M)/eps) and its transpose once, then blocks of rows
// in parallel.
template <typename T> void run_blocked(Problem<T>& P, const at::Tensor& cost) {
  const int64_t m = P.m, n = P.n;
  std::vector<T> K(m * n), KT(n * m);
  const T shift = cost.min().item<T>();
  detail::exp_fill(K.data(), P.M, m * n, shift, T(1) / P.eps);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) KT[j * m + i] = K[i * n + j];
  P.K = K.data();
  P.KT = KT.data();
  P.shift = shift;
  const int width = vector_width();
  const int64_t L = detail::blocked_rows_per_block<T>(width);
  const int64_t blocks = (P.B + L - 1) / L;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    detail::blocked_worker(P, width, begin, end);
  });
}

// Rows with non-finite inputs: NaN loss, error and potentials whatever the arithmetic produced.
// Rows with non-finite inputs: NaN loss and error whatever the arithmetic produced. Rows without
// mass (a and b all zero): the only plan is T = 0, loss and error 0, potentials -inf, stopped at
// the first check (as the reference, whose error there is 0).
template <typename T> void poison_bad_rows(const Problem<T>& P) {
  const T nan = std::numeric_limits<T>::quiet_NaN(), ninf = -std::numeric_limits<T>::infinity();
  const auto zero = [](T x) { return x == T(0); };
  for (int64_t r = 0; r < P.B; ++r) {
    if (!P.bad[r] && std::all_of(P.a + r * P.m, P.a + (r + 1) * P.m, zero) &&
        std::all_of(P.b + r * P.n, P.b + (r + 1) * P.n, zero)) {
      P.loss[r] = 0;
      P.err[r] = 0;
      P.iters[r] = static_cast<int32_t>(P.use_tol ? std::min(P.check_every, P.n_iters)
                                                  : P.n_iters);
      std::fill(P.alpha + r * P.m, P.alpha + (r + 1) * P.m, ninf);
      std::fill(P.beta + r * P.n, P.beta + (r + 1) * P.n, ninf);
    }
    if (!P.bad[r]) continue;
    P.loss[r] = nan;
    P.err[r] = nan;
    P.iters[r] = static_cast<int32_t>(P.n_iters);
    for (int64_t i = 0; i < P.m; ++i) P.alpha[r * P.m + i] = nan;
    for (int64_t j = 0; j < P.n; ++j) P.beta[r * P.n + j] = nan;
  }
}

// Solve into preallocated outputs; a, b, cost contiguous, of dtype T.
template <typename T>
void solve_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost,
                const SolveArgs& s, SolveOut& out) {
  if constexpr (std::is_same<T, float>::value) {
    if (solve_float32_in_float64_band(a, b, cost, s, out)) return;
  }
  std::vector<uint8_t> bad(a.size(0));
  Problem<T> P = make_problem<T>(a, b, cost, s, out, bad.data());
  mark_bad_rows<T>(P.a, P.b, P.M, P.B, P.m, P.n, P.shared, bad.data());
  const bool standard = use_standard_domain<T>(cost, s);
  if (P.shared && standard) {
    run_blocked<T>(P, cost);
  } else {
    at::parallel_for(0, P.B, 1, [&](int64_t begin, int64_t end) {
      detail::rows_worker(P, standard, begin, end);
    });
  }
  poison_bad_rows<T>(P);
}

RangeLimits range_limits(c10::ArrayRef<double> standard_range) {
  TORCH_CHECK_VALUE(standard_range.size() == 2 && standard_range[0] > 0 && standard_range[1] > 0,
                    "standard_range must hold the float32 and float64 limits, got ",
                    standard_range);
  return {standard_range[0], standard_range[1]};
}

void check_common(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, double eps,
                  int64_t n_iters, int64_t check_every, int64_t method, const char* an,
                  const char* bn) {
  TORCH_CHECK_VALUE(a.device().is_cpu() && b.device().is_cpu() && cost.device().is_cpu(),
                    "selkd cpp backend: ", an, ", ", bn, " and cost must be CPU tensors");
  TORCH_CHECK_VALUE(a.dim() == 2, an, " must be 2-D, got ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 2, bn, " must be 2-D, got ", b.sizes());
  TORCH_CHECK_VALUE(a.size(0) == b.size(0), bn, " has batch size ", b.size(0), " but ", an,
                    " has ", a.size(0));
  const int64_t B = a.size(0), m = a.size(1), n = b.size(1);
  TORCH_CHECK_VALUE(B > 0 && m > 0 && n > 0, an, " and ", bn, " must not be empty");
  TORCH_CHECK_VALUE((cost.dim() == 2 && cost.size(0) == m && cost.size(1) == n) ||
                        (cost.dim() == 3 && cost.size(0) == B && cost.size(1) == m &&
                         cost.size(2) == n),
                    "cost must have shape (", m, ", ", n, ") or (", B, ", ", m, ", ", n,
                    "), got ", cost.sizes());
  const auto dt = a.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble,
                    an, " must be float32 or float64 (upcast half inputs first), got ", dt);
  TORCH_CHECK_VALUE(b.scalar_type() == dt && cost.scalar_type() == dt, an, ", ", bn,
                    " and cost must share one dtype");
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), "eps must be a finite number > 0, got ", eps);
  TORCH_CHECK_VALUE(n_iters >= 1, "n_iters must be >= 1, got ", n_iters);
  TORCH_CHECK_VALUE(n_iters <= std::numeric_limits<int32_t>::max(), "n_iters too large");
  TORCH_CHECK_VALUE(check_every >= 1, "check_every must be >= 1, got ", check_every);
  TORCH_CHECK_VALUE(method >= 0 && method <= 2, "method must be 0 (auto), 1 (standard) or 2 (log)");
  (void)vector_width();  // a bad SELKD_CPU_VECTOR_BITS is an error whichever path runs
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_solve_cpu(
    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& cost_in, double eps,
    int64_t n_iters, double tol, int64_t check_every, int64_t method,
    c10::ArrayRef<double> standard_range) {
  check_common(a_in, b_in, cost_in, eps, n_iters, check_every, method, "a", "b");
  const SolveArgs args{eps, n_iters, tol, check_every, method, range_limits(standard_range)};
  const auto a = a_in.contiguous(), b = b_in.contiguous(), cost = cost_in.contiguous();
  SolveOut out = empty_outputs(a.size(0), a.size(1), b.size(1), a.options());
  if (a.scalar_type() == at::kDouble)
    solve_into<double>(a, b, cost, args, out);
  else
    solve_into<float>(a, b, cost, args, out);
  return {out.loss, out.alpha, out.beta, out.iters, out.err};
}

// Row softmax of z / tau, computed like torch.softmax(z / tau) (divide, then shift by the max).
template <typename T> void softmax_rows(const T* z, int64_t B, int64_t k, T tau, T* p) {
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    detail::softmax_block(z, begin, end, k, tau, p);
  });
}

// (phi - <phi, p>) p / tau with phi = potential where p > 0, 0 elsewhere (Prop. 4.2 via the
// softmax Jacobian); entries without mass neither contribute nor receive gradient.
template <typename T>
void envelope_grad(const T* pot, const T* p, int64_t B, int64_t k, T tau, T* out) {
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* pr = p + r * k;
      const T* phr = pot + r * k;
      T* o = out + r * k;
      // zero probabilities take and give nothing; a NaN one (a NaN or inf logit) makes the
      // whole row's gradient NaN, as in the reference
      double mean = 0.0;
      for (int64_t i = 0; i < k; ++i)
        if (pr[i] != T(0)) mean += static_cast<double>(phr[i]) * pr[i];
      const T mu = static_cast<T>(mean);
      for (int64_t i = 0; i < k; ++i) o[i] = pr[i] == T(0) ? T(0) : (phr[i] - mu) * pr[i] / tau;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sinkhorn_kd_forward_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in,
                        const at::Tensor& cost_in, double tau, double eps, int64_t n_iters,
                        double tol, int64_t check_every, int64_t method, bool teacher_grad,
                        c10::ArrayRef<double> standard_range) {
  // the teacher is the source a, the student the target b (paper 1, Eq. 12)
  check_common(teacher_in, student_in, cost_in, eps, n_iters, check_every, method,
               "teacher_logits", "student_logits");
  TORCH_CHECK_VALUE(tau > 0 && std::isfinite(tau), "tau must be a finite number > 0, got ", tau);
  const SolveArgs args{eps, n_iters, tol, check_every, method, range_limits(standard_range)};
  const auto zs = student_in.contiguous(), zt = teacher_in.contiguous(),
             cost = cost_in.contiguous();
  const int64_t B = zs.size(0), n = zs.size(1), m = zt.size(1);
  auto opts = zs.options();
  at::Tensor p_t = at::empty({B, m}, opts), p_s = at::empty({B, n}, opts);
  SolveOut out = empty_outputs(B, m, n, opts);
  at::Tensor g_s = at::empty({B, n}, opts),
             g_t = teacher_grad ? at::empty({B, m}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "sinkhorn_kd_forward_cpu", [&] {
    const scalar_t tau_ = static_cast<scalar_t>(tau);
    softmax_rows<scalar_t>(zt.data_ptr<scalar_t>(), B, m, tau_, p_t.data_ptr<scalar_t>());
    softmax_rows<scalar_t>(zs.data_ptr<scalar_t>(), B, n, tau_, p_s.data_ptr<scalar_t>());
    solve_into<scalar_t>(p_t, p_s, cost, args, out);
    envelope_grad<scalar_t>(out.beta.data_ptr<scalar_t>(), p_s.data_ptr<scalar_t>(), B, n, tau_,
                            g_s.data_ptr<scalar_t>());
    if (teacher_grad)
      envelope_grad<scalar_t>(out.alpha.data_ptr<scalar_t>(), p_t.data_ptr<scalar_t>(), B, m,
                              tau_, g_t.data_ptr<scalar_t>());
  });
  return {out.loss, g_s, g_t, out.alpha, out.beta, out.iters, out.err};
}

// sk.sinkhorn's input check in one pass: bit 0 set if a has a negative entry, bit 1 if b has, bit 2
// if some row's masses differ, |sum a - sum b| / max(|sum a|, 1e-30) > tol (row sums in double;
// rows with inf or NaN entries are skipped, they surface as NaN losses instead).
int64_t marginal_flags_cpu(const at::Tensor& a_in, const at::Tensor& b_in, double tol) {
  TORCH_CHECK_VALUE(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(0) == b_in.size(0),
                    "marginal_flags: a and b must be (B, m) and (B, n), got ", a_in.sizes(),
                    " and ", b_in.sizes());
  TORCH_CHECK_VALUE(a_in.scalar_type() == b_in.scalar_type() &&
                        (a_in.scalar_type() == at::kFloat || a_in.scalar_type() == at::kDouble),
                    "marginal_flags: a and b must share one dtype, float32 or float64");
  const auto a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t B = a.size(0), m = a.size(1), n = b.size(1);
  std::atomic<int> flags{0};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "marginal_flags", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      int local = 0;
      for (int64_t r = begin; r < end; ++r) {
        double sa = 0.0, sb = 0.0;
        int neg_a = 0, neg_b = 0;
        const scalar_t* ar = pa + r * m;
        const scalar_t* br = pb + r * n;
        for (int64_t i = 0; i < m; ++i) { sa += ar[i]; neg_a |= ar[i] < 0; }
        for (int64_t j = 0; j < n; ++j) { sb += br[j]; neg_b |= br[j] < 0; }
        const double gap = std::abs(sa - sb) / std::max(std::abs(sa), 1e-30);
        local |= neg_a | (neg_b << 1) |
                 ((gap > tol && gap < std::numeric_limits<double>::infinity()) ? 4 : 0);
      }
      if (local) flags.fetch_or(local);
    });
  });
  return flags.load();
}

// Width in bits of the vectors the shared-cost (blocked) path uses for this call's settings: 512
// (AVX-512 build, see vector_width()), 256 (AVX2 clone) or 128 (baseline x86-64 code, or the
// 256-bit type lowered to 128-bit instructions on a CPU without AVX2); 0 when the compiler
// picked the instructions (builds without the x86 ISA variants).
int64_t cpu_vector_bits() {
  const int width = vector_width();  // validates SELKD_CPU_VECTOR_BITS on every build
#if SELKD_X86_DISPATCH
  if (width == 64) return 512;
  if (width == 16) return 128;
#if !defined(SELKD_NO_MULTIVERSION)
  if (__builtin_cpu_supports("avx2")) return 256;
#endif
  return 128;
#else
  (void)width;
  return 0;
#endif
}

}  // namespace

// The one TORCH_LIBRARY block of the `selkd` namespace; other files add ops with
// TORCH_LIBRARY_FRAGMENT(selkd, m).
TORCH_LIBRARY(selkd, m) {
  // standard_range: the reference's STANDARD_DOMAIN_MAX_RANGE for float32 and float64
  m.def("sinkhorn_solve(Tensor a, Tensor b, Tensor cost, float eps, int n_iters, float tol, "
        "int check_every, int method, float[2] standard_range) -> (Tensor loss, Tensor alpha, "
        "Tensor beta, Tensor iters, Tensor err)");
  m.def("sinkhorn_kd_forward(Tensor student_logits, Tensor teacher_logits, Tensor cost, "
        "float tau, float eps, int n_iters, float tol, int check_every, int method, "
        "bool teacher_grad, float[2] standard_range) -> (Tensor loss, Tensor grad_student, "
        "Tensor grad_teacher, Tensor alpha, Tensor beta, Tensor iters, Tensor err)");
  m.def("marginal_flags(Tensor a, Tensor b, float tol) -> int");
  // no tensor arguments, so no dispatch key: a catch-all kernel
  m.def("cpu_vector_bits() -> int", &cpu_vector_bits);
}

TORCH_LIBRARY_IMPL(selkd, CPU, m) {
  m.impl("sinkhorn_solve", &sinkhorn_solve_cpu);
  m.impl("sinkhorn_kd_forward", &sinkhorn_kd_forward_cpu);
  m.impl("marginal_flags", &marginal_flags_cpu);
}

}  // namespace selkd
