// IEEE float32 helpers shared by the CPU and CUDA kernels of every family
// (ema_math.h, adamw_math.h): each one rounds once, to nearest even, the same
// way on the host and on the device.
//
// The extension is compiled with nvcc --use_fast_math, which turns a * b + c
// into an FMA, flushes denormals (-ftz=true) and makes '/' and sqrtf
// approximate. The device versions below are inline PTX with explicit .rn and
// without .ftz, so a kernel using them computes exactly what the host code
// computes (and what PyTorch's kernels, built without fast math, compute).
// On the host the plain operators are IEEE already: setup.py builds the C++
// files with -ffp-contract=off and without fast math, so GCC never fuses
// a * b + c into an FMA behind the code's back (in C++ mode it would by
// default, whatever the -std).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#define MIRAI_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define MIRAI_HD __attribute__((always_inline)) inline
#else
#define MIRAI_HD inline
#endif

namespace mirai {
namespace fp {

// round_f32(a * b), never fused with a following add, never flushed.
MIRAI_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a * b;
#endif
}

// round_f32(a + b), never fused with a preceding multiply, never flushed.
MIRAI_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a + b;
#endif
}

// round_f32(a * b + c) with a single rounding, never flushed.
MIRAI_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
#else
  return std::fma(a, b, c);
#endif
}

// round_f32(a / b), IEEE division (not the fast-math approximation), never flushed.
MIRAI_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a / b;
#endif
}

// round_f32(sqrt(a)), IEEE square root (not the fast-math approximation), never flushed.
MIRAI_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
#else
  return std::sqrt(a);
#endif
}

// float(x) for a double, round to nearest even, never flushed.
MIRAI_HD float double_to_float_rn(double x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x));
  return r;
#else
  return static_cast<float>(x);
#endif
}

// double(x) for a float (exact), denormals kept.
MIRAI_HD double float_to_double(float x) {
#if defined(__CUDA_ARCH__)
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
  return r;
#else
  return static_cast<double>(x);
#endif
}

// bf16 bits -> float (exact).
MIRAI_HD float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// float -> bf16 bits, round to nearest even. Same as c10::BFloat16(float) on the
// host (NaN -> 0x7FC0) and __float2bfloat16_rn on the device (which is what
// c10::BFloat16 uses on sm_80+; its NaN is 0x7FFF: NaN payloads are the only
// place host and device differ, as in PyTorch itself).
MIRAI_HD uint16_t float_to_bf16_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;  // branch-free so CPU loops vectorise
  return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
#endif
}

}  // namespace fp
}  // namespace mirai
