// Vectorisable float32 math shared by the kernels: plain arithmetic the
// compiler turns into SIMD code inside `#pragma omp simd` loops, where libm's
// expf and tanhf are scalar calls.

#ifndef JAXLLM_KERNELS_FAST_MATH_H_
#define JAXLLM_KERNELS_FAST_MATH_H_

#include <cstdint>

namespace jaxllm {

// exp(x) for x <= 88 (the softmax's x <= 0; GELU's clamped 2u), as 2^n * 2^f
// with a degree-6 polynomial for 2^f, f in [-0.5, 0.5] (relative error ~2e-7).
inline float Exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const float f = t - n;
  float p = 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6180911e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022650e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const int32_t bits = __builtin_bit_cast(int32_t, p) + (static_cast<int32_t>(n) << 23);
  return __builtin_bit_cast(float, bits);
}

// GELU, tanh form: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), and
// its derivative. With e = exp(2u): 0.5 (1 + tanh u) = e / (e + 1) and
// 1 - tanh^2 u = 4 e / (e + 1)^2, which never subtract nearly equal numbers,
// so both stay accurate where tanh saturates (the derivative's polynomial
// factor grows like x^3 there).
constexpr float kGeluC = 0.7978845608028654f, kGeluA = 0.044715f;

inline float GeluExp(float x) {  // exp(2u), 2u clamped to [-87, 87]
  float two_u = 2.0f * kGeluC * (x + kGeluA * x * x * x);
  two_u = two_u > 87.0f ? 87.0f : two_u;
  return Exp(two_u);
}

inline float Gelu(float x) {
  const float e = GeluExp(x);
  return x * (e / (e + 1.0f));
}

inline float GeluGrad(float x) {
  const float e = GeluExp(x), s = 1.0f / (e + 1.0f), r = e * s;  // r = e / (e + 1)
  return r + 2.0f * x * r * s * kGeluC * (1.0f + 3.0f * kGeluA * x * x);
}

}  // namespace jaxllm

#endif  // JAXLLM_KERNELS_FAST_MATH_H_
