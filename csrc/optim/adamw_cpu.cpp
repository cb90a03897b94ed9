// CPU kernel of the fused multi-tensor AdamW + EMA step (same element math as the
// CUDA kernel, see adamw_math.h).
//
// Algorithm: the tensors are cut into chunks of kChunk elements; at::parallel_for
// spreads the chunk list over the intra-op threads. Each element is read once, runs
//   [g /= grad_scale]  AdamW (p, m, v)  [ema = ema_step(ema, p)  [teacher = bf16(ema)]]
// and is written once. The chunk loop is instantiated per (grad dtype, ema, teacher,
// grad_scale) combination; on x86-64 CPUs with AVX2+FMA it runs a copy compiled for
// that target (hardware FMA), elsewhere the same loop with std::fma (a libm call);
// chunking and that dispatch are common/cpu_chunks.h. GCC leaves this loop scalar
// (building with -fno-math-errno did not change that); the kernel is memory-bound on a
// GPU, and the CPU twin exists for exactness, tests and CPU runs.
// Shapes: any; each tensor is treated as its flat contiguous buffer.
// Dtypes: params, exp_avgs, exp_avg_sqs, ema float32; grads float32 or bfloat16;
// teacher bfloat16. grad_scale: read once on the host (a CPU tensor).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/Parallel.h>

#include "common/cpu_chunks.h"
#include "optim/adamw_kernels.h"
#include "optim/adamw_math.h"

namespace mirai {
namespace {

// Data pointers of one index (ema / teacher nullptr when absent).
struct Ptrs {
  float* p;
  const void* g;
  float* m;
  float* v;
  float* ema;
  uint16_t* teacher;
};

// Elements [begin, end) of one index. Inlined into both instantiations below.
template <bool kBF16Grad, bool kEma, bool kTeacher, bool kScale>
MIRAI_CPU_ALWAYS_INLINE void chunk_body(const Ptrs& x, int64_t begin, int64_t end,
                                          const adamw_math::AdamWCoeffs& c, float scale) {
  float* __restrict p = x.p;
  float* __restrict m = x.m;
  float* __restrict v = x.v;
  float* __restrict ema = x.ema;
  uint16_t* __restrict teacher = x.teacher;
  for (int64_t i = begin; i < end; ++i) {
    float g;
    if constexpr (kBF16Grad) {
      g = fp::bf16_bits_to_float(static_cast<const uint16_t*>(x.g)[i]);
    } else {
      g = static_cast<const float*>(x.g)[i];
    }
    if constexpr (kScale) g = adamw_math::unscale(g, scale);
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_math::adamw_step(pi, mi, vi, g, c);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (kEma) {
      const float e = adamw_math::ema_step(ema[i], pi, c);
      ema[i] = e;
      if constexpr (kTeacher) teacher[i] = fp::float_to_bf16_bits(e);
    }
  }
}

template <bool kBF16Grad, bool kEma, bool kTeacher, bool kScale>
void chunk_generic(const Ptrs& x, int64_t begin, int64_t end, const adamw_math::AdamWCoeffs& c, float scale) {
  chunk_body<kBF16Grad, kEma, kTeacher, kScale>(x, begin, end, c, scale);
}

#if MIRAI_CPU_X86
// Same code compiled for AVX2+FMA: std::fma becomes one vfmadd instruction (the
// baseline build targets plain x86-64, where std::fma is a libm call).
template <bool kBF16Grad, bool kEma, bool kTeacher, bool kScale>
__attribute__((target("avx2,fma"))) void chunk_fma(const Ptrs& x, int64_t begin, int64_t end,
                                                   const adamw_math::AdamWCoeffs& c, float scale) {
  chunk_body<kBF16Grad, kEma, kTeacher, kScale>(x, begin, end, c, scale);
}
#endif

template <bool kBF16Grad, bool kEma, bool kTeacher, bool kScale>
void run_chunk(const Ptrs& x, int64_t begin, int64_t end, const adamw_math::AdamWCoeffs& c, float scale) {
#if MIRAI_CPU_X86
  if (cpu_chunks::has_avx2_fma()) {
    chunk_fma<kBF16Grad, kEma, kTeacher, kScale>(x, begin, end, c, scale);
    return;
  }
#endif
  chunk_generic<kBF16Grad, kEma, kTeacher, kScale>(x, begin, end, c, scale);
}

// f(std::true_type{}) or f(std::false_type{}): turns a runtime flag into a template argument.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace

void adamw_ema_step_cpu(const AdamWLists& lists, const adamw_math::AdamWCoeffs& coeffs, const float* grad_scale) {
  const float scale = grad_scale != nullptr ? *grad_scale : 1.f;
  const auto chunks = cpu_chunks::split(lists.params.size(), [&](size_t i) { return lists.params[i].numel(); });
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const cpu_chunks::Chunk& ch = chunks[k];
      const size_t i = static_cast<size_t>(ch.tensor);
      const bool ema = lists.has_ema(i);
      const bool teacher = lists.has_teacher(i);
      const Ptrs x{lists.params[i].data_ptr<float>(), lists.grads[i].data_ptr(), lists.exp_avgs[i].data_ptr<float>(),
                   lists.exp_avg_sqs[i].data_ptr<float>(), ema ? lists.ema[i]->data_ptr<float>() : nullptr,
                   teacher ? reinterpret_cast<uint16_t*>(lists.teacher[i]->data_ptr()) : nullptr};
      const bool bf16 = lists.grads[i].scalar_type() == at::kBFloat16;
      with_flag(bf16, [&](auto kBF16) {
        with_flag(ema, [&](auto kEma) {
          with_flag(teacher && ema, [&](auto kTeacher) {
            with_flag(grad_scale != nullptr, [&](auto kScale) {
              constexpr bool b = decltype(kBF16)::value, e = decltype(kEma)::value,
                             t = decltype(kTeacher)::value, s = decltype(kScale)::value;
              if constexpr (e || !t) {  // a teacher is only written from an ema
                run_chunk<b, e, t, s>(x, ch.begin, ch.end, coeffs, scale);
              }
            });
          });
        });
      });
    }
  });
}

}  // namespace mirai
