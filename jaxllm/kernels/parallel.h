// Work splitting on XLA's intra-op thread pool, shared by the kernels here.

#ifndef JAXLLM_KERNELS_PARALLEL_H_
#define JAXLLM_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxllm {

// Runs part(p) for p in [0, parts) on the calling thread and up to
// pool.num_threads() - 1 pool threads, and returns when all parts are done.
// Every thread, this one included, claims parts until none is left, so the
// call finishes even when no pool thread is free to help (XLA may run several
// custom calls at once, each waiting on the same pool).
template <typename Part>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t parts, Part part) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<Progress>();
  auto drain = [state, part, parts] {
    for (int64_t p; (p = state->next.fetch_add(1)) < parts;) {
      part(p);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), parts) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([drain] { drain(); });
  drain();
  while (state->done.load(std::memory_order_acquire) < parts) __builtin_ia32_pause();
}

// Column sums over `rows` rows in `parts` chunks: chunk(lo, hi, partial) adds
// rows [lo, hi) into its own zeroed buffer of `width` floats, on the pool;
// then the buffers are added into out[0 .. width) in a fixed order.
template <typename Chunk>
void PartialSums(xla::ffi::ThreadPool& pool, int64_t rows, int64_t width, int64_t parts, float* out,
                 Chunk chunk) {
  std::vector<float> partial(parts * width, 0.0f);
  ParallelFor(pool, parts, [&](int64_t p) {
    chunk(rows * p / parts, rows * (p + 1) / parts, partial.data() + p * width);
  });
  std::fill(out, out + width, 0.0f);
  for (int64_t p = 0; p < parts; ++p) {
    const float* src = partial.data() + p * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) out[j] += src[j];
  }
}

// MKL's CBLAS interface (LP64), declared here so no MKL headers are needed.
extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k,
                            float alpha, const float* a, int lda, const float* b, int ldb,
                            float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

}  // namespace jaxllm

#endif  // JAXLLM_KERNELS_PARALLEL_H_
