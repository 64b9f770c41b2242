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
// Queries go in blocks of `block` rows; block i attends to keys 0 .. its last
// row, so the products skip most of the masked upper triangle and only the
// diagonal block is masked. The forward saves the log-sum-exp of each score
// row and, when asked (`save_probs`), the probabilities themselves, block
// after block: the backward then reads them instead of recomputing the scores
// (one of its five products). Otherwise it recomputes them from the
// log-sum-exp (as flash attention does) in a per-thread buffer of block x seq
// floats, and no seq x seq matrix is stored per pair.
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

// Per-thread scratch, grown on demand and kept between calls.
float* Scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(floats)) buffer.resize(floats);
  return buffer.data();
}

struct Shape {
  int64_t batch, seq, heads, head_dim, block;
  int64_t width() const { return heads * head_dim; }  // one of q, k, v
  int64_t ld() const { return 3 * width(); }          // a qkv row
  int64_t blocks() const { return (seq + block - 1) / block; }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }
  // Query block `blk`: its first row, rows and visible keys.
  int64_t lo(int64_t blk) const { return blk * block; }
  int64_t rows(int64_t blk) const { return std::min(block, seq - lo(blk)); }
  int64_t keys(int64_t blk) const { return lo(blk) + rows(blk); }
  // Saved probabilities: each block's rows x keys, one block after another.
  int64_t probs_offset(int64_t blk) const { return block * block * blk * (blk + 1) / 2; }
  int64_t probs_per_pair() const { return probs_offset(blocks() - 1) + rows(blocks() - 1) * seq; }
};

ffi::Error GetShape(ffi::Span<const int64_t> dims, int64_t heads, int64_t block, Shape* s) {
  if (dims.size() != 3 || heads <= 0 || dims[2] % (3 * heads) != 0) {
    return ffi::Error::InvalidArgument(
        "jaxllm_mkl_attention takes qkv of shape (batch, seq, 3 * heads * head_dim)");
  }
  if (block <= 0) return ffi::Error::InvalidArgument("jaxllm_mkl_attention: block must be > 0");
  *s = Shape{dims[0], dims[1], heads, dims[2] / (3 * heads), block};
  return ffi::Error::Success();
}

ffi::Error CheckProbs(const Shape& s, bool save_probs, size_t floats) {
  const size_t want = save_probs ? s.batch * s.heads * s.probs_per_pair() : 1;
  if (floats != want) {
    return ffi::Error::InvalidArgument(
        "jaxllm_mkl_attention: the probabilities buffer has the wrong size");
  }
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
                   ffi::ResultBuffer<ffi::F32> probs_out, int64_t heads, int64_t block,
                   bool save_probs) {
  Shape s;
  if (auto e = GetShape(qkv.dimensions(), heads, block, &s); e.failure()) return e;
  if (auto e = CheckProbs(s, save_probs, probs_out->element_count()); e.failure()) return e;
  const float* X = qkv.typed_data();
  float *O = out->typed_data(), *LSE = lse_out->typed_data(), *PROBS = probs_out->typed_data();
  const int64_t blocks = s.blocks();
  ParallelFor(pool, s.batch * heads * blocks, [=](int64_t task) {
    const int64_t pair = task / blocks, blk = blocks - 1 - task % blocks;  // long blocks first
    const int64_t b = pair / heads, h = pair % heads;
    const int64_t lo = s.lo(blk), nq = s.rows(blk), nk = s.keys(blk);
    const float* Q = X + b * s.seq * s.ld() + h * s.head_dim;
    const float *K = Q + s.width(), *V = Q + 2 * s.width();
    float* S = save_probs ? PROBS + pair * s.probs_per_pair() + s.probs_offset(blk)
                          : Scratch(nq * nk);
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
                    ffi::Buffer<ffi::F32> lse_in, ffi::Buffer<ffi::F32> probs_in,
                    ffi::Buffer<ffi::F32> grad_out, ffi::ResultBuffer<ffi::F32> grad_qkv,
                    int64_t heads, int64_t block, bool save_probs) {
  Shape s;
  if (auto e = GetShape(qkv.dimensions(), heads, block, &s); e.failure()) return e;
  if (auto e = CheckProbs(s, save_probs, probs_in.element_count()); e.failure()) return e;
  const float *X = qkv.typed_data(), *O = out.typed_data(), *LSE = lse_in.typed_data(),
              *PROBS = probs_in.typed_data(), *G = grad_out.typed_data();
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
    const int64_t span = std::min(block, s.seq) * s.seq;
    float* scratch = Scratch((save_probs ? 1 : 2) * span + block);
    float *dS = scratch, *delta = dS + span;
    float* recomputed = save_probs ? nullptr : delta + block;
    // The last query block sees every key, so it writes all of dK and dV
    // (beta 0); the earlier, shorter blocks add to their leading rows.
    for (int64_t blk = blocks - 1; blk >= 0; --blk) {
      const int64_t lo = s.lo(blk), nq = s.rows(blk), nk = s.keys(blk);
      const float beta = blk == blocks - 1 ? 0.0f : 1.0f;
      const float* Gq = Gh + lo * s.width();
      const float* P;
      if (save_probs) {
        P = PROBS + pair * s.probs_per_pair() + s.probs_offset(blk);
      } else {
        cblas_sgemm(kRowMajor, kNoTrans, kTrans, nq, nk, s.head_dim, s.scale(), Q + lo * s.ld(),
                    s.ld(), K, s.ld(), 0.0f, recomputed, nk);
        Probabilities(recomputed, nq, nk, lo, LSE + pair * s.seq + lo);
        P = recomputed;
      }
      // dV (+)= P^T dO
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, nk, s.head_dim, nq, 1.0f, P, nk, Gq, s.width(),
                  beta, dV, s.ld());
      // dP = dO V^T
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, nq, nk, s.head_dim, 1.0f, Gq, s.width(), V,
                  s.ld(), 0.0f, dS, nk);
      // dS = P * (dP - rowsum(dO * O)), written over dP; 0 above the diagonal
      for (int64_t i = 0; i < nq; ++i) {
        const float *g = Gq + i * s.width(), *o = Oh + (lo + i) * s.width();
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < s.head_dim; ++c) dot += g[c] * o[c];
        delta[i] = dot;
      }
      for (int64_t i = 0; i < nq; ++i) {
        float* ds = dS + i * nk;
        const float* p = P + i * nk;
        const float di = delta[i];
        const int64_t visible = lo + i + 1;
#pragma omp simd
        for (int64_t j = 0; j < visible; ++j) ds[j] = p[j] * (ds[j] - di);
        std::fill(ds + visible, ds + nk, 0.0f);
      }
      // dQ = scale * dS K;  dK (+)= scale * dS^T Q
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, nq, s.head_dim, nk, s.scale(), dS, nk, K, s.ld(),
                  0.0f, dQ + lo * s.ld(), s.ld());
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, nk, s.head_dim, nq, s.scale(), dS, nk,
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
                                  .Ret<ffi::Buffer<ffi::F32>>()  // probs, or 1 float
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("block")
                                  .Attr<bool>("save_probs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMklAttentionBwd, jaxllm::Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // probs, or 1 float
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad of out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // grad of qkv
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("block")
                                  .Attr<bool>("save_probs"));
