// CPU kernels for the open-set coupling of Selective KD (paper 2, Eq. 12-14; docs/ops/partial_ot.md).
//
// Every coupling in this problem is P = diag(s) K with K = exp(Z / eps), so both methods reduce to
// a map from the row log-masses l_i = logsumexp_j(Z_ij / eps) to the coupling's row log-masses
// rho_i, and log P_ij = Z_ij / eps - l_i + rho_i. Working on l and rho keeps huge and tiny scores
// finite. The semantics (sorting, tie handling, fallback when gamma = m) mirror
// selkd_kernels/partial_ot_reference.py, which defines the right answer.
//
// Registered with TORCH_LIBRARY_FRAGMENT because the library `selkd` itself is declared in
// sinkhorn_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kExact = 0;
constexpr int64_t kBregman = 1;

template <typename T>
inline T log_add_exp(T a, T b) {
  if (a == -std::numeric_limits<T>::infinity()) return b;
  if (b == -std::numeric_limits<T>::infinity()) return a;
  const T hi = std::max(a, b);
  return hi + std::log1p(std::exp(-std::abs(a - b)));
}

template <typename T>
T vec_logsumexp(const T* x, int64_t n) {
  T hi = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) hi = std::max(hi, x[i]);
  if (!std::isfinite(hi)) {
    // all -inf gives -inf; +inf or NaN must propagate instead of turning into a number
    T s = 0;
    for (int64_t i = 0; i < n; ++i) s += x[i];
    return std::isnan(s) ? s : hi;
  }
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += std::exp(static_cast<double>(x[i] - hi));
  return hi + static_cast<T>(std::log(acc));
}

// Row log-masses l_i of K = exp(Z / eps), rows in parallel.
template <typename T>
void row_log_mass(const T* z, int64_t m, int64_t k, T inv_eps, T* l) {
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* zi = z + i * k;
      T hi = -std::numeric_limits<T>::infinity();
      bool bad = false;
      for (int64_t j = 0; j < k; ++j) {
        const T v = zi[j] * inv_eps;
        if (std::isnan(v) || v == std::numeric_limits<T>::infinity()) bad = true;
        hi = std::max(hi, v);
      }
      if (bad) { l[i] = std::numeric_limits<T>::quiet_NaN(); continue; }
      double acc = 0.0;
      for (int64_t j = 0; j < k; ++j) acc += std::exp(static_cast<double>(zi[j] * inv_eps - hi));
      l[i] = hi + static_cast<T>(std::log(acc));
    }
  });
}

// Exact KL projection: saturate the k largest rows, kappa = (gamma - k) / sum of the rest.
// Returns k; fills rho and sat.
template <typename T>
int64_t solve_exact(const T* l, int64_t m, double gamma, T* rho, bool* sat) {
  std::vector<int64_t> order(m);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return l[a] > l[b]; });
  std::vector<T> suffix(m);
  suffix[m - 1] = l[order[m - 1]];
  for (int64_t i = m - 2; i >= 0; --i) suffix[i] = log_add_exp(suffix[i + 1], l[order[i]]);
  const int64_t n_feasible = gamma < static_cast<double>(m)
                                 ? static_cast<int64_t>(std::ceil(gamma)) : m;
  int64_t k = std::max<int64_t>(n_feasible - 1, 0);
  for (int64_t c = 0; c < n_feasible; ++c) {
    const T rem = static_cast<T>(gamma - static_cast<double>(c));
    if (!(rem > 0)) break;
    const T log_kappa = std::log(rem) - suffix[c];
    if (log_kappa + l[order[c]] <= 0) { k = c; break; }
  }
  for (int64_t i = 0; i < m; ++i) sat[i] = false;
  for (int64_t i = 0; i < k; ++i) sat[order[i]] = true;
  const T log_kappa = static_cast<T>(std::log(gamma - static_cast<double>(k))) - suffix[k];
  for (int64_t i = 0; i < m; ++i) rho[i] = sat[i] ? T(0) : l[i] + log_kappa;
  return k;
}

// Paper 2's Alg. 1 as written: n_iters rounds of row clip then total rescale.
template <typename T>
void bregman_rounds(const T* l, int64_t m, double gamma, int64_t rounds, T* rho) {
  const T log_gamma = static_cast<T>(std::log(gamma));
  std::copy(l, l + m, rho);
  for (int64_t t = 0; t < rounds; ++t) {
    for (int64_t i = 0; i < m; ++i) rho[i] = std::min(rho[i], T(0));
    const T shift = log_gamma - vec_logsumexp(rho, m);
    for (int64_t i = 0; i < m; ++i) rho[i] += shift;
  }
}

template <typename T>
bool any_nan(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) if (std::isnan(x[i])) return true;
  return false;
}

// rho from l for either method; sat only meaningful for exact. NaN in l poisons every row.
template <typename T>
void solve_rho(const T* l, int64_t m, double gamma, int64_t method, int64_t n_iters, T* rho,
               bool* sat) {
  if (any_nan(l, m)) {
    for (int64_t i = 0; i < m; ++i) {
      rho[i] = std::numeric_limits<T>::quiet_NaN();
      sat[i] = false;
    }
    return;
  }
  if (method == kExact) {
    solve_exact(l, m, gamma, rho, sat);
  } else {
    for (int64_t i = 0; i < m; ++i) sat[i] = false;
    bregman_rounds(l, m, gamma, n_iters, rho);
  }
}

// (d rho / d l)^T g, written into g in place.
template <typename T>
void rho_vjp(const T* l, const T* rho, const bool* sat, int64_t m, double gamma, int64_t method,
             int64_t n_iters, T* g) {
  if (method == kExact) {
    double g_u = 0.0;
    for (int64_t i = 0; i < m; ++i)
      if (!sat[i]) g_u += g[i];
    int64_t k = 0;
    for (int64_t i = 0; i < m; ++i) k += sat[i] ? 1 : 0;
    const double denom = gamma - static_cast<double>(k);
    for (int64_t i = 0; i < m; ++i)
      g[i] = sat[i] ? T(0)
                    : static_cast<T>(g[i] - g_u * std::exp(static_cast<double>(rho[i])) / denom);
    return;
  }
  // Alg. 1 backward: recompute each round's input from l (rounds are cheap 1-D sweeps).
  const T log_gamma = static_cast<T>(std::log(gamma));
  std::vector<T> r(m), a(m);
  for (int64_t t = n_iters - 1; t >= 0; --t) {
    std::copy(l, l + m, r.begin());
    for (int64_t s = 0; s < t; ++s) {
      for (int64_t i = 0; i < m; ++i) r[i] = std::min(r[i], T(0));
      const T shift = log_gamma - vec_logsumexp(r.data(), m);
      for (int64_t i = 0; i < m; ++i) r[i] += shift;
    }
    for (int64_t i = 0; i < m; ++i) a[i] = std::min(r[i], T(0));
    const T lse = vec_logsumexp(a.data(), m);
    double gs = 0.0;
    for (int64_t i = 0; i < m; ++i) gs += g[i];
    for (int64_t i = 0; i < m; ++i) {
      const T q = std::exp(a[i] - lse);
      const T gi = static_cast<T>(g[i] - q * gs);
      g[i] = r[i] <= 0 ? gi : T(0);
    }
  }
}

void check_scores(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(z.dim() == 2, name, " must be 2-D (m, k)");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              name, " must be float32 or float64");
  TORCH_CHECK(z.size(0) > 0 && z.size(1) > 0, name, " must not be empty");
}

void check_args(const at::Tensor& z, double gamma, double eps, int64_t method, int64_t n_iters) {
  TORCH_CHECK(gamma > 0 && gamma <= static_cast<double>(z.size(0)), "gamma must be in (0, m]");
  TORCH_CHECK(eps > 0, "eps must be > 0");
  TORCH_CHECK(method == kExact || method == kBregman, "method must be 0 (exact) or 1 (bregman)");
  TORCH_CHECK(n_iters >= 1, "n_iters must be >= 1");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> partial_ot_coupling_cpu(
    const at::Tensor& scores_in, double gamma, double eps, int64_t method, int64_t n_iters) {
  check_scores(scores_in, "scores");
  check_args(scores_in, gamma, eps, method, n_iters);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t m = scores.size(0), k = scores.size(1);
  at::Tensor log_p = at::empty_like(scores);
  at::Tensor l = at::empty({m}, scores.options());
  at::Tensor rho = at::empty({m}, scores.options());
  at::Tensor sat = at::empty({m}, scores.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "partial_ot_coupling_cpu", [&] {
    using T = scalar_t;
    const T inv_eps = static_cast<T>(1.0 / eps);
    const T* z = scores.data_ptr<T>();
    T* lp = log_p.data_ptr<T>();
    T* lv = l.data_ptr<T>();
    T* rv = rho.data_ptr<T>();
    row_log_mass(z, m, k, inv_eps, lv);
    solve_rho(lv, m, gamma, method, n_iters, rv, sat.data_ptr<bool>());
    at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        for (int64_t j = 0; j < k; ++j) lp[i * k + j] = (z[i * k + j] * inv_eps - lv[i]) + rv[i];
    });
  });
  return {log_p, l, rho, sat};
}

// Fused open-set loss L = -(1/m) sum_ij (Y_ij + lam P_T,ij) log P_S,ij and dL/dZ_S in one call.
std::tuple<at::Tensor, at::Tensor> partial_ot_loss_cpu(
    const at::Tensor& zs_in, const at::Tensor& zt_in, const at::Tensor& target_in, double gamma,
    double eps, double lam, int64_t method, int64_t n_iters) {
  check_scores(zs_in, "student_scores");
  check_scores(zt_in, "teacher_scores");
  TORCH_CHECK(zs_in.sizes() == zt_in.sizes(), "teacher_scores must match student_scores' shape");
  TORCH_CHECK(zs_in.scalar_type() == zt_in.scalar_type(), "scores must share a dtype");
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == zs_in.size(0),
              "target must be 1-D with one entry per row");
  check_args(zs_in, gamma, eps, method, n_iters);
  const at::Tensor zs = zs_in.contiguous();
  const at::Tensor zt = zt_in.contiguous();
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const int64_t m = zs.size(0), k = zs.size(1);
  at::Tensor grad = at::empty_like(zs);
  at::Tensor loss = at::empty({}, zs.options());
  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "partial_ot_loss_cpu", [&] {
    using T = scalar_t;
    const T inv_eps = static_cast<T>(1.0 / eps);
    const T* s = zs.data_ptr<T>();
    const T* t = zt.data_ptr<T>();
    const int64_t* y = target.data_ptr<int64_t>();
    for (int64_t i = 0; i < m; ++i)
      TORCH_CHECK(y[i] >= 0 && y[i] < k, "target entries must be in [0, k)");
    std::vector<T> ls(m), lt(m), rs(m), rt(m), g(m);
    std::unique_ptr<bool[]> sat_s(new bool[m]), sat_t(new bool[m]);
    row_log_mass(s, m, k, inv_eps, ls.data());
    row_log_mass(t, m, k, inv_eps, lt.data());
    solve_rho(ls.data(), m, gamma, method, n_iters, rs.data(), sat_s.get());
    solve_rho(lt.data(), m, gamma, method, n_iters, rt.data(), sat_t.get());
    const T inv_m = static_cast<T>(1.0 / static_cast<double>(m));
    const T lam_t = static_cast<T>(lam);
    std::vector<double> row_loss(m);
    T* gr = grad.data_ptr<T>();
    // first pass: G_ij = -(Y_ij + lam P_T,ij)/m into grad, its row sums g_i, and the loss rows
    at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        double acc = 0.0, gi = 0.0;
        for (int64_t j = 0; j < k; ++j) {
          const T log_ps = (s[i * k + j] * inv_eps - ls[i]) + rs[i];
          const T p_t = std::exp((t[i * k + j] * inv_eps - lt[i]) + rt[i]);
          const T w = (j == y[i] ? T(1) : T(0)) + lam_t * p_t;
          // 0 * log(0) from an underflowed teacher entry contributes nothing
          if (w != T(0)) acc += static_cast<double>(w) * static_cast<double>(log_ps);
          const T gij = -w * inv_m;
          gr[i * k + j] = gij;
          gi += gij;
        }
        row_loss[i] = -acc;
        g[i] = static_cast<T>(gi);
      }
    });
    double total = 0.0;
    for (int64_t i = 0; i < m; ++i) total += row_loss[i];
    loss.fill_(static_cast<T>(total / static_cast<double>(m)));
    std::vector<T> h(g);
    rho_vjp(ls.data(), rs.data(), sat_s.get(), m, gamma, method, n_iters, h.data());
    const T eps_t = static_cast<T>(eps);
    at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T hi = h[i] - g[i];
        for (int64_t j = 0; j < k; ++j) {
          const T soft = std::exp(s[i * k + j] * inv_eps - ls[i]);
          gr[i * k + j] = (gr[i * k + j] + soft * hi) / eps_t;
        }
      }
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(selkd, m) {
  m.def("partial_ot_coupling(Tensor scores, float gamma, float eps, int method, int n_iters)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("partial_ot_loss(Tensor student_scores, Tensor teacher_scores, Tensor target, float gamma,"
        " float eps, float lam, int method, int n_iters) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(selkd, CPU, m) {
  m.impl("partial_ot_coupling", &partial_ot_coupling_cpu);
  m.impl("partial_ot_loss", &partial_ot_loss_cpu);
}
