// CPU kernels for the open-set coupling of Selective KD (paper 2, Eq. 12-14, Alg. 1;
// docs/ops/partial_ot.md, docs/selective_kd.md).
//
// Every coupling in this problem is P = diag(s) K with K = exp(Z / eps), so both methods reduce to
// a map from the row log-masses l_i = logsumexp_j(Z_ij / eps) to the coupling's row log-masses
// rho_i, and log P_ij = Z_ij / eps - l_i + rho_i. The semantics (sorting, tie handling, the
// fallback count, rows that cannot carry mass, both loss formulations) are those of
// selkd_kernels/ops/partial_ot/reference.py, which defines the right answer. The solve runs in
// double for every input dtype, and its sums are taken relative to a row of the batch, so huge
// |Z / eps| keeps the total mass at gamma.
//
// Registered with TORCH_LIBRARY_FRAGMENT because the library `selkd` itself is declared in
// sinkhorn_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kExact = 0;
constexpr int64_t kBregman = 1;
constexpr int64_t kPaper = 0;
constexpr int64_t kConsistent = 1;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Row log-masses of K = exp(Z / eps), l_i = hi_i + lrel_i with hi_i the row's largest Z / eps:
// NaN for a row with a NaN or +inf score, -inf for a row of -inf scores. The two parts are kept
// so that log-softmax entries are formed as (x - hi) - lrel, which does not round at the scale
// of |Z / eps| the way x - l does.
struct RowMass {
  std::vector<double> l, hi, lrel;
  explicit RowMass(int64_t m) : l(m), hi(m), lrel(m) {}
  double rel(int64_t i, double x) const {
    if (std::isnan(l[i])) return kNaN;
    return l[i] == -kInf ? -kInf : (x - hi[i]) - lrel[i];
  }
};

template <typename T>
RowMass row_log_mass(const T* z, int64_t m, int64_t k, double inv_eps) {
  RowMass r(m);
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* zi = z + i * k;
      double hi = -kInf;
      bool bad = false;
      for (int64_t j = 0; j < k; ++j) {
        const double v = static_cast<double>(zi[j]) * inv_eps;
        if (std::isnan(v) || v == kInf) bad = true;
        hi = std::max(hi, v);
      }
      r.hi[i] = hi;
      r.lrel[i] = 0.0;
      if (bad) { r.l[i] = kNaN; continue; }
      if (hi == -kInf) { r.l[i] = -kInf; continue; }
      double acc = 0.0;
      for (int64_t j = 0; j < k; ++j) acc += std::exp(static_cast<double>(zi[j]) * inv_eps - hi);
      r.lrel[i] = std::log(acc);
      r.l[i] = hi + r.lrel[i];
    }
  });
  return r;
}

// The coupling's row log-masses for one batch, with what its backward needs.
struct Solve {
  std::vector<double> rho;        // (m)
  std::vector<char> sat;          // (m) saturated rows (exact)
  std::vector<double> trajectory; // (n_iters + 1) x m round inputs and result (bregman)
  double gamma_eff = kNaN;        // min(gamma, #finite rows), NaN when unsolvable
};

// Finite rows take part; the others keep their l (NaN -> NaN, -inf -> zero mass).
double effective_gamma(const double* l, int64_t m, double gamma) {
  int64_t n_fin = 0;
  for (int64_t i = 0; i < m; ++i) n_fin += std::isfinite(l[i]) ? 1 : 0;
  if (!(gamma > 0) || n_fin == 0) return kNaN;
  return std::min(gamma, static_cast<double>(n_fin));
}

// Saturated count when no candidate passes: max(ceil(gamma) - 1, 0), reference.fallback_saturated.
double fallback_saturated(double gamma_eff) { return std::max(std::ceil(gamma_eff) - 1.0, 0.0); }

// Exact KL projection: saturate the k largest rows, kappa = (gamma - k) / sum of the rest.
void solve_exact(const double* l, int64_t m, Solve& s) {
  s.rho.assign(m, 0.0);
  s.sat.assign(m, 0);
  std::vector<int64_t> order;
  for (int64_t i = 0; i < m; ++i)
    if (std::isfinite(l[i])) order.push_back(i);
  const double g = s.gamma_eff;
  if (std::isnan(g)) {
    for (int64_t i = 0; i < m; ++i) s.rho[i] = kNaN;
    return;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return l[a] > l[b]; });
  const int64_t n = static_cast<int64_t>(order.size());
  // tail[c] = sum_{j >= c} exp(l_(j) - l_(c)), by a backward recurrence that only ever forms
  // differences of neighbouring rows (exact relative to row c, whatever the size of l).
  std::vector<double> tail(n);
  tail[n - 1] = 1.0;
  for (int64_t c = n - 2; c >= 0; --c)
    tail[c] = 1.0 + std::exp(l[order[c + 1]] - l[order[c]]) * tail[c + 1];
  double k = -1.0;
  for (int64_t c = 0; c < n; ++c) {
    const double rem = g - static_cast<double>(c);
    if (!(rem > 0)) break;
    if (std::log(rem) <= std::log(tail[c])) { k = static_cast<double>(c); break; }
  }
  if (k < 0) k = fallback_saturated(g);
  const int64_t kk = static_cast<int64_t>(k);
  for (int64_t c = 0; c < kk; ++c) s.sat[order[c]] = 1;
  // unsaturated rows: rho_i = (l_i - l_(k)) + log(gamma - k) - log tail[k]
  const double mu = l[order[kk]];
  const double rel = std::log(g - k) - std::log(tail[kk]);
  for (int64_t i = 0; i < m; ++i) {
    if (s.sat[i]) s.rho[i] = 0.0;
    else s.rho[i] = std::isfinite(l[i]) ? (l[i] - mu) + rel : l[i];
  }
}

// logsumexp over the finite rows of x (others skipped); -inf when there are none.
double lse_finite(const double* x, const double* l, int64_t m) {
  double hi = -kInf;
  for (int64_t i = 0; i < m; ++i)
    if (std::isfinite(l[i])) hi = std::max(hi, x[i]);
  if (hi == -kInf) return -kInf;
  double acc = 0.0;
  for (int64_t i = 0; i < m; ++i)
    if (std::isfinite(l[i])) acc += std::exp(x[i] - hi);
  return hi + std::log(acc);
}

// Paper 2's Alg. 1: n_iters rounds of row clip then total rescale. The one place the rounds are
// run; every round's input is kept for the backward.
void solve_bregman(const double* l, int64_t m, int64_t n_iters, Solve& s) {
  s.trajectory.assign((n_iters + 1) * m, 0.0);
  std::copy(l, l + m, s.trajectory.begin());
  const double log_g = std::log(s.gamma_eff);
  std::vector<double> a(m);
  for (int64_t t = 0; t < n_iters; ++t) {
    const double* r = s.trajectory.data() + t * m;
    double* next = s.trajectory.data() + (t + 1) * m;
    for (int64_t i = 0; i < m; ++i) a[i] = std::min(r[i], 0.0);
    const double shift = log_g - lse_finite(a.data(), l, m);
    for (int64_t i = 0; i < m; ++i) next[i] = std::isfinite(l[i]) ? a[i] + shift : l[i];
  }
  const double* last = s.trajectory.data() + n_iters * m;
  s.rho.assign(last, last + m);
  s.sat.assign(m, 0);
  if (std::isnan(s.gamma_eff))
    for (int64_t i = 0; i < m; ++i) s.rho[i] = kNaN;
}

Solve solve(const double* l, int64_t m, double gamma, int64_t method, int64_t n_iters) {
  Solve s;
  s.gamma_eff = effective_gamma(l, m, gamma);
  if (method == kExact) solve_exact(l, m, s);
  else solve_bregman(l, m, n_iters, s);
  return s;
}

// (d rho / d l)^T g, written into g in place.
void rho_vjp(const double* l, const Solve& s, int64_t m, int64_t method, int64_t n_iters,
             double* g) {
  if (method == kExact) {
    double g_u = 0.0, k = 0.0;
    for (int64_t i = 0; i < m; ++i) {
      if (s.sat[i]) k += 1.0;
      else if (std::isfinite(s.rho[i])) g_u += g[i];
    }
    const double denom = s.gamma_eff - k;
    for (int64_t i = 0; i < m; ++i)
      g[i] = (s.sat[i] || !std::isfinite(s.rho[i])) ? 0.0 : g[i] - g_u * std::exp(s.rho[i]) / denom;
    return;
  }
  std::vector<double> a(m);
  for (int64_t t = n_iters - 1; t >= 0; --t) {
    const double* r = s.trajectory.data() + t * m;
    for (int64_t i = 0; i < m; ++i) a[i] = std::min(r[i], 0.0);
    const double lse = lse_finite(a.data(), l, m);
    double gs = 0.0;
    for (int64_t i = 0; i < m; ++i)
      if (std::isfinite(l[i])) gs += g[i];
    for (int64_t i = 0; i < m; ++i) {
      const bool pass = std::isfinite(l[i]) && r[i] <= 0;
      g[i] = pass ? g[i] - std::exp(a[i] - lse) * gs : 0.0;
    }
  }
}

void check_scores(const at::Tensor& z, const char* name) {
  TORCH_CHECK_VALUE(z.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(z.dim() == 2, name, " must be 2-D (m, k), got ", z.dim(), " dimensions");
  TORCH_CHECK_VALUE(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
                    name, " must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.size(0) > 0 && z.size(1) > 0, name, " must not be empty");
}

// gamma is a 0-d tensor (a traced selected count never visits the host before the kernel runs).
// Values <= 0 or NaN give a NaN coupling and values above the row count are clamped, as in the
// reference; the public Python API rejects them before they get here.
double read_gamma(const at::Tensor& gamma) {
  TORCH_CHECK_VALUE(gamma.numel() == 1 && gamma.dim() == 0, "gamma must be a 0-d tensor");
  TORCH_CHECK_VALUE(gamma.device().is_cpu(), "gamma must be a CPU tensor");
  return gamma.to(at::kDouble).item<double>();
}

void check_args(double eps, int64_t method, int64_t n_iters) {
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), "eps must be a finite number > 0, got ", eps);
  TORCH_CHECK_VALUE(method == kExact || method == kBregman,
                    "method must be 0 (exact) or 1 (bregman), got ", method);
  TORCH_CHECK_VALUE(n_iters >= 1, "n_iters must be >= 1, got ", n_iters);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> partial_ot_coupling_cpu(
    const at::Tensor& scores_in, const at::Tensor& gamma_t, double eps, int64_t method,
    int64_t n_iters) {
  check_scores(scores_in, "scores");
  check_args(eps, method, n_iters);
  const double gamma = read_gamma(gamma_t);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t m = scores.size(0), k = scores.size(1);
  at::Tensor log_p = at::empty_like(scores);
  at::Tensor l_out = at::empty({m}, scores.options());
  at::Tensor rho_out = at::empty({m}, scores.options());
  at::Tensor sat_out = at::empty({m}, scores.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "partial_ot_coupling_cpu", [&] {
    using T = scalar_t;
    const double inv_eps = 1.0 / eps;
    const T* z = scores.data_ptr<T>();
    const RowMass rm = row_log_mass(z, m, k, inv_eps);
    const std::vector<double>& l = rm.l;
    const Solve s = solve(l.data(), m, gamma, method, n_iters);
    T* lp = log_p.data_ptr<T>();
    at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        for (int64_t j = 0; j < k; ++j)
          lp[i * k + j] = static_cast<T>(rm.rel(i, z[i * k + j] * inv_eps) + s.rho[i]);
    });
    T* lv = l_out.data_ptr<T>();  // l, rho and sat in the compute dtype
    T* rv = rho_out.data_ptr<T>();
    bool* sv = sat_out.data_ptr<bool>();
    for (int64_t i = 0; i < m; ++i) {
      lv[i] = static_cast<T>(l[i]);
      rv[i] = static_cast<T>(s.rho[i]);
      sv[i] = s.sat[i] != 0;
    }
  });
  return {log_p, l_out, rho_out, sat_out};
}

// Per-row terms of the fused loss (first pass): the row's loss, G_ij = dL/dlog P_S,ij into grad,
// g_i = sum_j G_ij and h_i = dL/drho_i through log(1 - row mass) (consistent formulation).
template <typename T>
void loss_rows(const T* s, const T* t, const int64_t* y, int64_t m, int64_t k, double inv_eps,
               const RowMass& ls, const RowMass& lt, const Solve& ss,
               const Solve& st, double lam, int64_t formulation, double floor,
               std::vector<double>& G, std::vector<double>& row_loss, std::vector<double>& g,
               std::vector<double>& h) {
  const double inv_m = 1.0 / static_cast<double>(m);
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double acc = 0.0, gi = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        const double log_ps = ls.rel(i, s[i * k + j] * inv_eps) + ss.rho[i];
        const double p_t = std::exp(lt.rel(i, t[i * k + j] * inv_eps) + st.rho[i]);
        const double w = (j == y[i] ? 1.0 : 0.0) + lam * p_t;
        // 0 * log(0) from an underflowed teacher entry contributes nothing
        if (w != 0.0) acc += w * log_ps;
        G[i * k + j] = -w * inv_m;
        gi += -w * inv_m;
      }
      double hi = 0.0;
      if (formulation == kConsistent) {
        const double w0 = (y[i] == k ? 1.0 : 0.0) + lam * std::max(-std::expm1(st.rho[i]), 0.0);
        // log(max(1 - row mass, floor)); a NaN row stays NaN
        const double q = -std::expm1(ss.rho[i]);
        const bool free = q > floor;
        acc += w0 * (std::isnan(q) ? q : std::log(free ? q : floor));
        hi = free ? -(w0 * inv_m) * (-1.0 / std::expm1(-ss.rho[i])) : (std::isnan(q) ? q : 0.0);
      }
      row_loss[i] = -acc;
      g[i] = gi;
      h[i] = hi;
    }
  });
}

// User errors of the fused loss's tensors and loss parameters (ValueError in Python).
void check_loss_args(const at::Tensor& zs_in, const at::Tensor& zt_in,
                     const at::Tensor& target_in, double lam, int64_t formulation,
                     double floor) {
  check_scores(zs_in, "student_scores");
  check_scores(zt_in, "teacher_scores");
  TORCH_CHECK_VALUE(zs_in.sizes() == zt_in.sizes(), "teacher_scores must have shape ",
                    zs_in.sizes(), " like student_scores, got ", zt_in.sizes());
  TORCH_CHECK_VALUE(zs_in.scalar_type() == zt_in.scalar_type(),
                    "teacher_scores must have the dtype of student_scores");
  TORCH_CHECK_VALUE(target_in.dim() == 1 && target_in.size(0) == zs_in.size(0),
                    "target must be 1-D with one entry per row of student_scores");
  TORCH_CHECK_VALUE(!at::isFloatingType(target_in.scalar_type()) &&
                        target_in.scalar_type() != at::kBool,
                    "target must hold integer labels");
  TORCH_CHECK_VALUE(formulation == kPaper || formulation == kConsistent,
                    "formulation must be 0 (paper) or 1 (consistent), got ", formulation);
  TORCH_CHECK_VALUE(lam >= 0 && std::isfinite(lam), "lam must be a finite number >= 0");
  TORCH_CHECK_VALUE(floor > 0 && floor < 1, "floor must be in (0, 1)");
}

// Fused open-set loss (both formulations, reference.open_set_loss) and dL/dZ_S in one call.
std::tuple<at::Tensor, at::Tensor> partial_ot_loss_cpu(
    const at::Tensor& zs_in, const at::Tensor& zt_in, const at::Tensor& target_in,
    const at::Tensor& gamma_t, double eps, double lam, int64_t method, int64_t n_iters,
    int64_t formulation, double floor) {
  check_loss_args(zs_in, zt_in, target_in, lam, formulation, floor);
  check_args(eps, method, n_iters);
  const double gamma = read_gamma(gamma_t);
  const at::Tensor zs = zs_in.contiguous();
  const at::Tensor zt = zt_in.contiguous();
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const int64_t m = zs.size(0), k = zs.size(1);
  const int64_t* y = target.data_ptr<int64_t>();
  const int64_t y_max = formulation == kConsistent ? k : k - 1;
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK_VALUE(y[i] >= -1 && y[i] <= y_max, "target entries must be in [-1, ", y_max,
                      "], got ", y[i]);
  at::Tensor grad = at::empty_like(zs);
  at::Tensor loss = at::empty({}, zs.options());
  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "partial_ot_loss_cpu", [&] {
    using T = scalar_t;
    const double inv_eps = 1.0 / eps;
    const T* s = zs.data_ptr<T>();
    const T* t = zt.data_ptr<T>();
    std::vector<double> row_loss(m), g(m), h(m), G(m * k);
    const RowMass ls = row_log_mass(s, m, k, inv_eps);
    const RowMass lt = row_log_mass(t, m, k, inv_eps);
    const Solve ss = solve(ls.l.data(), m, gamma, method, n_iters);
    const Solve st = solve(lt.l.data(), m, gamma, method, n_iters);
    T* gr = grad.data_ptr<T>();
    loss_rows(s, t, y, m, k, inv_eps, ls, lt, ss, st, lam, formulation, floor, G, row_loss, g, h);
    double total = 0.0;
    for (int64_t i = 0; i < m; ++i) total += row_loss[i];
    loss.fill_(static_cast<T>(total / static_cast<double>(m)));
    std::vector<double> jt(m);
    for (int64_t i = 0; i < m; ++i) jt[i] = g[i] + h[i];
    rho_vjp(ls.l.data(), ss, m, method, n_iters, jt.data());
    at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const double c = jt[i] - g[i];
        for (int64_t j = 0; j < k; ++j) {
          const double soft = std::exp(ls.rel(i, s[i * k + j] * inv_eps));
          gr[i * k + j] = static_cast<T>((G[i * k + j] + soft * c) / eps);
        }
      }
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(selkd, m) {
  m.def("partial_ot_coupling(Tensor scores, Tensor gamma, float eps, int method, int n_iters)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("partial_ot_loss(Tensor student_scores, Tensor teacher_scores, Tensor target,"
        " Tensor gamma, float eps, float lam, int method, int n_iters, int formulation,"
        " float floor) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(selkd, CPU, m) {
  m.impl("partial_ot_coupling", &partial_ot_coupling_cpu);
  m.impl("partial_ot_loss", &partial_ot_loss_cpu);
}
