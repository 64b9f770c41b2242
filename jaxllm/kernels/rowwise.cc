// Row-wise kernels for XLA's CPU backend, float32: LayerNorm, column sums, the
// GELU backward and the cross-entropy.
//
// XLA's CPU backend computes a LayerNorm as a dozen small ops, each one pass
// over the activations, and its row reductions are slow at a small model's
// widths. Here each is one pass over the rows:
//
//   jaxllm_layer_norm_fwd:  y = (x - mean) * rstd * scale + bias, and the
//                           rows' mean and rstd = 1 / sqrt(var + eps)
//   jaxllm_layer_norm_bwd:  dx, dscale, dbias from x, scale, mean, rstd, dy
//   jaxllm_column_sum:      s[j] = sum_i g[i, j] (a dense layer's bias gradient)
//   jaxllm_gelu_bwd:        dpre = dy * GELU'(pre) and its column sums (the
//                           gradients of the feed-forward's first layer before
//                           its products; its forward is in mkl_sgemm.cc)
//   jaxllm_cross_entropy_fwd: nll = logsumexp(logits) - logits[target] per
//                           row, and the row's logsumexp
//   jaxllm_cross_entropy_bwd: dlogits = (softmax(logits) - one_hot(target)) * g
//
// x is any float32 array whose last axis is normalised; the rows are split
// over XLA's intra-op thread pool. Column sums are accumulated per thread and
// added at the end, so their order of summation is fixed by the shape and the
// thread count. Built on first use by jaxllm/kernels/mkl.py.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fast_math.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxllm {
namespace {

// Rows x columns below which a call stays on one thread.
constexpr int64_t kMinPartWork = int64_t{1} << 15;

int64_t Parts(ffi::ThreadPool& pool, int64_t rows, int64_t cols) {
  return std::max<int64_t>(1, std::min({pool.num_threads(), rows, rows * cols / kMinPartWork}));
}

ffi::Error LayerNormFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                        ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                        float eps) {
  const auto dims = x.dimensions();
  if (dims.size() == 0 || scale.element_count() != dims.back() ||
      bias.element_count() != dims.back()) {
    return ffi::Error::InvalidArgument(
        "jaxllm_layer_norm_fwd: scale and bias must match x's last axis");
  }
  const int64_t d = dims.back(), rows = d ? x.element_count() / d : 0;
  const float *X = x.typed_data(), *S = scale.typed_data(), *B = bias.typed_data();
  float *Y = y->typed_data(), *M = mean->typed_data(), *R = rstd->typed_data();
  const int64_t parts = Parts(pool, rows, d);
  ParallelFor(pool, parts, [=](int64_t p) {
    for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
      const float* xr = X + r * d;
      float* yr = Y + r * d;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < d; ++j) sum += xr[j];
      const float mu = sum / d;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) sq += (xr[j] - mu) * (xr[j] - mu);
      const float rs = 1.0f / std::sqrt(sq / d + eps);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - mu) * rs * S[j] + B[j];
      M[r] = mu;
      R[r] = rs;
    }
  });
  return ffi::Error::Success();
}

// With xhat = (x - mean) * rstd and gs = dy * scale:
//   dx = rstd * (gs - mean_j(gs) - xhat * mean_j(gs * xhat))
//   dscale = sum_rows dy * xhat,  dbias = sum_rows dy
// Rows [lo, hi) write dx and add their part of dscale and dbias to ds, db.
void LayerNormBwdRows(const float* __restrict X, const float* __restrict S,
                      const float* __restrict M, const float* __restrict R,
                      const float* __restrict G, float* __restrict DX, float* __restrict ds,
                      float* __restrict db, int64_t d, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const float *xr = X + r * d, *gr = G + r * d;
    const float mu = M[r], rs = R[r];
    float sum_gs = 0.0f, sum_gsc = 0.0f;
#pragma omp simd reduction(+ : sum_gs, sum_gsc)
    for (int64_t j = 0; j < d; ++j) {
      const float gs = gr[j] * S[j];
      sum_gs += gs;
      sum_gsc += gs * (xr[j] - mu);
    }
    const float mean_gs = sum_gs / d, mean_gsx = sum_gsc * rs / d;
    float* dxr = DX + r * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const float xhat = (xr[j] - mu) * rs;
      dxr[j] = rs * (gr[j] * S[j] - mean_gs - xhat * mean_gsx);
      ds[j] += gr[j] * xhat;
      db[j] += gr[j];
    }
  }
}

ffi::Error LayerNormBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                        ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias) {
  const auto dims = x.dimensions();
  if (dims.size() == 0 || scale.element_count() != dims.back() ||
      dy.element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("jaxllm_layer_norm_bwd: operand shapes do not match");
  }
  const int64_t d = dims.back(), rows = d ? x.element_count() / d : 0;
  const float *X = x.typed_data(), *S = scale.typed_data(), *M = mean.typed_data(),
              *R = rstd.typed_data(), *G = dy.typed_data();
  float* DX = dx->typed_data();
  std::vector<float> sums(2 * d);  // dscale, then dbias
  PartialSums(pool, rows, 2 * d, Parts(pool, rows, d), sums.data(),
              [=](int64_t lo, int64_t hi, float* acc) {
                LayerNormBwdRows(X, S, M, R, G, DX, acc, acc + d, d, lo, hi);
              });
  std::copy(sums.begin(), sums.begin() + d, dscale->typed_data());
  std::copy(sums.begin() + d, sums.end(), dbias->typed_data());
  return ffi::Error::Success();
}

void ColumnSumRows(const float* __restrict G, float* __restrict acc, int64_t n, int64_t lo,
                   int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const float* gr = G + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += gr[j];
  }
}

ffi::Error ColumnSum(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> s) {
  const auto dims = g.dimensions();
  if (dims.size() != 2 || s->element_count() != dims[1]) {
    return ffi::Error::InvalidArgument("jaxllm_column_sum takes a 2-D operand");
  }
  const int64_t rows = dims[0], n = dims[1];
  const float* G = g.typed_data();
  PartialSums(pool, rows, n, Parts(pool, rows, n), s->typed_data(),
              [=](int64_t lo, int64_t hi, float* acc) { ColumnSumRows(G, acc, n, lo, hi); });
  return ffi::Error::Success();
}

void GeluBwdRows(const float* __restrict P, const float* __restrict G, float* __restrict D,
                 float* __restrict acc, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const float *pr = P + r * n, *gr = G + r * n;
    float* dr = D + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      dr[j] = gr[j] * GeluGrad(pr[j]);
      acc[j] += dr[j];
    }
  }
}

// The feed-forward's GELU backward: dpre = dy * GELU'(pre), and its column
// sums, the first layer's bias gradient.
ffi::Error GeluBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> pre, ffi::Buffer<ffi::F32> dy,
                   ffi::ResultBuffer<ffi::F32> dpre, ffi::ResultBuffer<ffi::F32> dbias) {
  const auto dims = pre.dimensions();
  if (dims.size() != 2 || dy.element_count() != pre.element_count() ||
      dbias->element_count() != dims[1]) {
    return ffi::Error::InvalidArgument("jaxllm_gelu_bwd takes 2-D pre and dy of one shape");
  }
  const int64_t rows = dims[0], n = dims[1];
  const float *P = pre.typed_data(), *G = dy.typed_data();
  float* D = dpre->typed_data();
  PartialSums(pool, rows, n, Parts(pool, rows, n), dbias->typed_data(),
              [=](int64_t lo, int64_t hi, float* acc) { GeluBwdRows(P, G, D, acc, n, lo, hi); });
  return ffi::Error::Success();
}
// Cross-entropy of integer targets under float32 logits (rows, vocab), with
// the values of the formula logsumexp - target logit: NaN for a row with a NaN
// logit or a target outside [0, vocab), +inf for a row with a +inf logit
// (NaN if that is the target's), and -inf logits taking no probability.
ffi::Error CrossEntropyFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                           ffi::Buffer<ffi::S32> targets, ffi::ResultBuffer<ffi::F32> nll,
                           ffi::ResultBuffer<ffi::F32> lse) {
  const auto dims = logits.dimensions();
  const int64_t v = dims.size() == 0 ? 0 : dims.back(), rows = v ? logits.element_count() / v : 0;
  if (dims.size() == 0 || targets.element_count() != rows || nll->element_count() != rows) {
    return ffi::Error::InvalidArgument(
        "jaxllm_cross_entropy_fwd: one target per row of the logits");
  }
  const float* X = logits.typed_data();
  const int32_t* T = targets.typed_data();
  float *L = nll->typed_data(), *Z = lse->typed_data();
  const int64_t parts = Parts(pool, rows, v);
  ParallelFor(pool, parts, [=](int64_t p) {
    for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
      const float* xr = X + r * v;
      float mx = -INFINITY;
      int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
      for (int64_t j = 0; j < v; ++j) {
        mx = xr[j] > mx ? xr[j] : mx;
        nan |= xr[j] != xr[j];
      }
      float z = mx;  // all -inf: lse = -inf; a +inf: lse = +inf
      if (std::isfinite(mx)) {
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < v; ++j) sum += xr[j] == -INFINITY ? 0.0f : Exp(xr[j] - mx);
        z = mx + std::log(sum);
      }
      const int32_t t = T[r];
      Z[r] = nan ? NAN : z;
      L[r] = nan || t < 0 || t >= v ? NAN : z - xr[t];
    }
  });
  return ffi::Error::Success();
}

// A row whose logsumexp is not finite (a NaN or +inf logit, or every logit
// -inf) gets a NaN gradient.
ffi::Error CrossEntropyBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                           ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::S32> targets,
                           ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dlogits) {
  const auto dims = logits.dimensions();
  const int64_t v = dims.size() == 0 ? 0 : dims.back(), rows = v ? logits.element_count() / v : 0;
  if (dims.size() == 0 || lse.element_count() != rows || targets.element_count() != rows ||
      g.element_count() != rows) {
    return ffi::Error::InvalidArgument(
        "jaxllm_cross_entropy_bwd: one lse, target and g per row of the logits");
  }
  const float *X = logits.typed_data(), *Z = lse.typed_data(), *G = g.typed_data();
  const int32_t* T = targets.typed_data();
  float* D = dlogits->typed_data();
  const int64_t parts = Parts(pool, rows, v);
  ParallelFor(pool, parts, [=](int64_t p) {
    for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
      const float *xr = X + r * v, z = Z[r], gr = G[r];
      float* dr = D + r * v;
      if (!std::isfinite(z)) {
        std::fill(dr, dr + v, NAN);
        continue;
      }
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) dr[j] = (xr[j] == -INFINITY ? 0.0f : Exp(xr[j] - z)) * gr;
      const int32_t t = T[r];
      if (t >= 0 && t < v) dr[t] -= gr;
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmLayerNormFwd, jaxllm::LayerNormFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean (rows)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd (rows)
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmLayerNormBwd, jaxllm::LayerNormBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dbias

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmColumnSum, jaxllm::ColumnSum,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmGeluBwd, jaxllm::GeluBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pre
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dpre
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dbias

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmCrossEntropyFwd, jaxllm::CrossEntropyFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits
                                  .Arg<ffi::Buffer<ffi::S32>>()  // targets (rows)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // nll (rows)
                                  .Ret<ffi::Buffer<ffi::F32>>()); // logsumexp (rows)

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmCrossEntropyBwd, jaxllm::CrossEntropyBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logsumexp (rows)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // targets (rows)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g = d loss / d nll (rows)
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dlogits
