// Causal multi-head self-attention for XLA's CPU backend, products by Intel MKL.
//
// Two XLA FFI handlers, forward and backward, that read the queries, keys and
// values where the qkv projection wrote them: a float32 buffer (batch, seq,
// 3 * heads * head_dim), queries in the first third, keys in the second,
// values in the last, each head's head_dim columns side by side. For one
// (sequence, head) pair the queries are a seq x head_dim matrix with row
// stride 3 * heads * head_dim, which cblas_sgemm takes as its leading
// dimension, so no head is ever copied or transposed. The output (batch,
// seq, heads * head_dim) is what the attention's output projection reads, and
// the backward writes the gradient in the qkv buffer's layout.
//
// Queries go in blocks of kBlock rows; block i attends to keys 0 .. its last
// row, so the products skip most of the masked upper triangle and only the
// diagonal block is masked. Scores and softmax stay in a per-thread buffer of
// kBlock x seq floats. The forward saves the log-sum-exp of each score row;
// the backward recomputes the probabilities from it (as flash attention does)
// and never stores a seq x seq matrix per pair.
//
// Work is split over (sequence, head) pairs (and query blocks, forward) on
// XLA's intra-op thread pool. Built on first use by jaxllm/kernels/mkl.py.

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

constexpr int64_t kBlock = 128;

// Per-thread scratch, grown on demand and kept between calls.
float* Scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(floats)) buffer.resize(floats);
  return buffer.data();
}

struct Shape {
  int64_t batch, seq, heads, head_dim;
  int64_t width() const { return heads * head_dim; }  // one of q, k, v
  int64_t ld() const { return 3 * width(); }          // a qkv row
  int64_t blocks() const { return (seq + kBlock - 1) / kBlock; }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }
};

ffi::Error GetShape(ffi::Span<const int64_t> dims, int64_t heads, Shape* s) {
  if (dims.size() != 3 || heads <= 0 || dims[2] % (3 * heads) != 0) {
    return ffi::Error::InvalidArgument(
        "jaxllm_mkl_attention takes qkv of shape (batch, seq, 3 * heads * head_dim)");
  }
  *s = Shape{dims[0], dims[1], heads, dims[2] / (3 * heads)};
  return ffi::Error::Success();
}

// Rows lo .. lo + nq of one pair's scores, S[i, j] for keys j < nk = lo + nq
// (row stride nk), turned into probabilities exp(S - lse) on and below the
// diagonal and 0 above it.
void Probabilities(float* S, int64_t nq, int64_t nk, int64_t lo, const float* lse) {
  for (int64_t i = 0; i < nq; ++i) {
    float* s = S + i * nk;
    const int64_t visible = lo + i + 1;
    const float l = lse[i];
#pragma omp simd
    for (int64_t j = 0; j < visible; ++j) s[j] = Exp(s[j] - l);
    std::fill(s + visible, s + nk, 0.0f);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse_out,
                   int64_t heads) {
  Shape s;
  if (auto e = GetShape(qkv.dimensions(), heads, &s); e.failure()) return e;
  const float* X = qkv.typed_data();
  float *O = out->typed_data(), *LSE = lse_out->typed_data();
  const int64_t blocks = s.blocks();
  ParallelFor(pool, s.batch * heads * blocks, [=](int64_t task) {
    const int64_t pair = task / blocks, blk = blocks - 1 - task % blocks;  // long blocks first
    const int64_t b = pair / heads, h = pair % heads;
    const int64_t lo = blk * kBlock, nq = std::min(kBlock, s.seq - lo), nk = lo + nq;
    const float* Q = X + b * s.seq * s.ld() + h * s.head_dim;
    const float *K = Q + s.width(), *V = Q + 2 * s.width();
    float* S = Scratch(nq * nk);
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, nq, nk, s.head_dim, s.scale(), Q + lo * s.ld(),
                s.ld(), K, s.ld(), 0.0f, S, nk);
    float* lse = LSE + pair * s.seq + lo;
    for (int64_t i = 0; i < nq; ++i) {
      float* row = S + i * nk;
      const int64_t visible = lo + i + 1;
      float m = row[0];
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < visible; ++j) m = row[j] > m ? row[j] : m;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < visible; ++j) {
        const float e = Exp(row[j] - m);
        row[j] = e;
        sum += e;
      }
      lse[i] = m + std::log(sum);
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t j = 0; j < visible; ++j) row[j] *= inv;
      std::fill(row + visible, row + nk, 0.0f);
    }
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, nq, s.head_dim, nk, 1.0f, S, nk, V, s.ld(), 0.0f,
                O + (b * s.seq + lo) * s.width() + h * s.head_dim, s.width());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse_in, ffi::Buffer<ffi::F32> grad_out,
                    ffi::ResultBuffer<ffi::F32> grad_qkv, int64_t heads) {
  Shape s;
  if (auto e = GetShape(qkv.dimensions(), heads, &s); e.failure()) return e;
  const float *X = qkv.typed_data(), *O = out.typed_data(), *LSE = lse_in.typed_data(),
              *G = grad_out.typed_data();
  float* DX = grad_qkv->typed_data();
  const int64_t blocks = s.blocks();
  ParallelFor(pool, s.batch * heads, [=](int64_t pair) {
    const int64_t b = pair / heads, h = pair % heads;
    const int64_t row0 = b * s.seq;
    const float* Q = X + row0 * s.ld() + h * s.head_dim;
    const float *K = Q + s.width(), *V = Q + 2 * s.width();
    const float* Oh = O + row0 * s.width() + h * s.head_dim;
    const float* Gh = G + row0 * s.width() + h * s.head_dim;
    float* dQ = DX + row0 * s.ld() + h * s.head_dim;
    float *dK = dQ + s.width(), *dV = dQ + 2 * s.width();
    const int64_t span = std::min(kBlock, s.seq) * s.seq;
    float* P = Scratch(2 * span + kBlock);
    float *dP = P + span, *delta = dP + span;
    // The last query block sees every key, so it writes all of dK and dV
    // (beta 0); the earlier, shorter blocks add to their leading rows.
    for (int64_t blk = blocks - 1; blk >= 0; --blk) {
      const int64_t lo = blk * kBlock, nq = std::min(kBlock, s.seq - lo), nk = lo + nq;
      const float beta = blk == blocks - 1 ? 0.0f : 1.0f;
      const float* Gq = Gh + lo * s.width();
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, nq, nk, s.head_dim, s.scale(), Q + lo * s.ld(),
                  s.ld(), K, s.ld(), 0.0f, P, nk);
      Probabilities(P, nq, nk, lo, LSE + pair * s.seq + lo);
      // dV (+)= P^T dO
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, nk, s.head_dim, nq, 1.0f, P, nk, Gq, s.width(),
                  beta, dV, s.ld());
      // dP = dO V^T
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, nq, nk, s.head_dim, 1.0f, Gq, s.width(), V,
                  s.ld(), 0.0f, dP, nk);
      // dS = P * (dP - rowsum(dO * O)), written over P
      for (int64_t i = 0; i < nq; ++i) {
        const float *g = Gq + i * s.width(), *o = Oh + (lo + i) * s.width();
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < s.head_dim; ++c) dot += g[c] * o[c];
        delta[i] = dot;
      }
      for (int64_t i = 0; i < nq; ++i) {
        float* p = P + i * nk;
        const float* dp = dP + i * nk;
        const float di = delta[i];
        const int64_t visible = lo + i + 1;
#pragma omp simd
        for (int64_t j = 0; j < visible; ++j) p[j] = p[j] * (dp[j] - di);
      }
      // dQ = scale * dS K;  dK (+)= scale * dS^T Q
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, nq, s.head_dim, nk, s.scale(), P, nk, K, s.ld(),
                  0.0f, dQ + lo * s.ld(), s.ld());
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, nk, s.head_dim, nq, s.scale(), P, nk,
                  Q + lo * s.ld(), s.ld(), beta, dK, s.ld());
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMklAttentionFwd, jaxllm::Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse (batch, heads, seq)
                                  .Attr<int64_t>("heads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMklAttentionBwd, jaxllm::Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad of out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // grad of qkv
                                  .Attr<int64_t>("heads"));
