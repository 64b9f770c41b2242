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

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxllm {
namespace {

// Products smaller than this many multiply-adds per panel are not split:
// below it, handing a panel to another thread costs more than it saves.
constexpr int64_t kMinPanelWork = int64_t{1} << 22;

ffi::Error Sgemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                 ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
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
  float* C = c->typed_data();
  const int op_a = trans_a ? kTrans : kNoTrans, op_b = trans_b ? kTrans : kNoTrans;

  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), m * n * k / kMinPanelWork));
  const bool by_rows = m >= n;
  auto panel = [=](int64_t p) {
    if (by_rows) {  // C[lo:hi, :] = op(A)[lo:hi, :] @ op(B)
      const int64_t lo = m * p / parts, hi = m * (p + 1) / parts;
      cblas_sgemm(kRowMajor, op_a, op_b, hi - lo, n, k, 1.0f, trans_a ? A + lo : A + lo * lda,
                  lda, B, ldb, 0.0f, C + lo * n, n);
    } else {  // C[:, lo:hi] = op(A) @ op(B)[:, lo:hi]
      const int64_t lo = n * p / parts, hi = n * (p + 1) / parts;
      cblas_sgemm(kRowMajor, op_a, op_b, m, hi - lo, k, 1.0f, A, lda,
                  trans_b ? B + lo * ldb : B + lo, ldb, 0.0f, C + lo, n);
    }
  };
  ParallelFor(pool, parts, panel);
  return ffi::Error::Success();
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
