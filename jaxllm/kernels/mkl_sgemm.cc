// float32 matrix product for XLA's CPU backend, computed by Intel MKL.
//
// An XLA FFI handler: C = op(A) @ op(B) for row-major 2-D float32 buffers,
// op = identity or transpose per operand (the attributes trans_a, trans_b),
// so a dense layer's forward and both backward products need no transposed
// copy. MKL is linked sequential: the handler cuts C into as many row (or
// column) panels as XLA's intra-op thread pool has threads and runs one
// cblas_sgemm per panel on that pool, so the product uses exactly the
// threads XLA uses, with no second thread pool competing for the cores.
// Built on first use by jaxllm/kernels/mkl.py.

#include <algorithm>
#include <cstdint>

#include "fast_math.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxllm {
namespace {

// Products smaller than this many multiply-adds per panel are not split:
// below it, handing a panel to another thread costs more than it saves.
constexpr int64_t kMinPanelWork = int64_t{1} << 22;

// C = op(A) @ op(B), cut into panels on the pool; epilogue(r0, r1, c0, c1)
// then runs on each finished panel of C, while it is in that core's cache.
template <typename Epilogue>
ffi::Error Product(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& a, ffi::Buffer<ffi::F32>& b,
                   float* C, bool trans_a, bool trans_b, Epilogue epilogue) {
  const auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2) {
    return ffi::Error::InvalidArgument("jaxllm_mkl_sgemm takes 2-D operands");
  }
  const int64_t m = trans_a ? da[1] : da[0], k = trans_a ? da[0] : da[1];
  const int64_t n = trans_b ? db[0] : db[1];
  if ((trans_b ? db[1] : db[0]) != k) {
    return ffi::Error::InvalidArgument("jaxllm_mkl_sgemm: contracting dimensions differ");
  }
  const int64_t lda = da[1], ldb = db[1];
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  const int op_a = trans_a ? kTrans : kNoTrans, op_b = trans_b ? kTrans : kNoTrans;

  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), m * n * k / kMinPanelWork));
  const bool by_rows = m >= n;
  auto panel = [=](int64_t p) {
    if (by_rows) {  // C[lo:hi, :] = op(A)[lo:hi, :] @ op(B)
      const int64_t lo = m * p / parts, hi = m * (p + 1) / parts;
      cblas_sgemm(kRowMajor, op_a, op_b, hi - lo, n, k, 1.0f, trans_a ? A + lo : A + lo * lda,
                  lda, B, ldb, 0.0f, C + lo * n, n);
      epilogue(lo, hi, 0, n);
    } else {  // C[:, lo:hi] = op(A) @ op(B)[:, lo:hi]
      const int64_t lo = n * p / parts, hi = n * (p + 1) / parts;
      cblas_sgemm(kRowMajor, op_a, op_b, m, hi - lo, k, 1.0f, A, lda,
                  trans_b ? B + lo * ldb : B + lo, ldb, 0.0f, C + lo, n);
      epilogue(0, m, lo, hi);
    }
  };
  ParallelFor(pool, parts, panel);
  return ffi::Error::Success();
}

ffi::Error Sgemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                 ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  return Product(pool, a, b, c->typed_data(), trans_a, trans_b,
                 [](int64_t, int64_t, int64_t, int64_t) {});
}

// The feed-forward's first layer: pre = x @ w + bias and y = GELU(pre) (tanh
// form), both returned: the backward needs pre.
ffi::Error DenseGelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                     ffi::ResultBuffer<ffi::F32> pre) {
  const int64_t n = w.dimensions().back();
  if (bias.element_count() != n) {
    return ffi::Error::InvalidArgument("jaxllm_mkl_dense_gelu: bias size differs from the columns");
  }
  float *P = pre->typed_data(), *Y = y->typed_data();
  const float* b = bias.typed_data();
  return Product(pool, x, w, P, false, false, [=](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t r = r0; r < r1; ++r) {
      float *pr = P + r * n, *yr = Y + r * n;
#pragma omp simd
      for (int64_t j = c0; j < c1; ++j) {
        pr[j] += b[j];
        yr[j] = Gelu(pr[j]);
      }
    }
  });
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMklSgemm, jaxllm::Sgemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMklDenseGelu, jaxllm::DenseGelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // GELU(pre)
                                  .Ret<ffi::Buffer<ffi::F32>>()); // pre = x @ kernel + bias
