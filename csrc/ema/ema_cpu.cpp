// CPU kernel of the fused multi-tensor EMA update (same math as the CUDA kernel,
// see ema_math.h).
//
// Algorithm: the tensors are cut into chunks of kChunk elements; at::parallel_for
// spreads the chunk list over the intra-op threads. On x86-64 CPUs with AVX2+FMA the
// chunk loop runs a copy compiled for that target (vectorised, hardware FMA);
// elsewhere the same loop with std::fma. Each element does
//   ema = fmaf(param, 1-decay, ema*decay)   [+ teacher = bf16_rne(ema)]
// Shapes: any; each tensor is treated as its flat contiguous buffer.
// Dtypes: ema float32, params float32 or bfloat16, teacher bfloat16.
#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>

#include "common/cpu_chunks.h"
#include "ema/ema_kernels.h"
#include "ema/ema_math.h"

namespace mirai {
namespace {

// Elements [begin, end) of one tensor. Inlined into both instantiations below.
template <bool kBF16Param, bool kTeacher>
MIRAI_CPU_ALWAYS_INLINE void chunk_body(float* __restrict ema, const void* __restrict param,
                                        uint16_t* __restrict teacher, int64_t begin, int64_t end, float d,
                                        float a) {
  for (int64_t i = begin; i < end; ++i) {
    float p;
    if constexpr (kBF16Param) {
      p = ema_math::bf16_bits_to_float(static_cast<const uint16_t*>(param)[i]);
    } else {
      p = static_cast<const float*>(param)[i];
    }
    const float r = ema_math::ema_step(ema[i], p, d, a);
    ema[i] = r;
    if constexpr (kTeacher) teacher[i] = ema_math::float_to_bf16_bits(r);
  }
}

template <bool kBF16Param, bool kTeacher>
void chunk_generic(float* ema, const void* param, uint16_t* teacher, int64_t begin, int64_t end, float d,
                   float a) {
  chunk_body<kBF16Param, kTeacher>(ema, param, teacher, begin, end, d, a);
}

#if MIRAI_CPU_X86
// Same code compiled for AVX2+FMA: std::fma becomes one vfmadd instruction and the loop
// vectorises (the baseline build targets plain x86-64, where std::fma is a libm call).
template <bool kBF16Param, bool kTeacher>
__attribute__((target("avx2,fma"))) void chunk_fma(float* ema, const void* param, uint16_t* teacher,
                                                   int64_t begin, int64_t end, float d, float a) {
  chunk_body<kBF16Param, kTeacher>(ema, param, teacher, begin, end, d, a);
}
#endif

template <bool kBF16Param, bool kTeacher>
void run_chunk(float* ema, const void* param, uint16_t* teacher, int64_t begin, int64_t end, float d, float a) {
#if MIRAI_CPU_X86
  if (cpu_chunks::has_avx2_fma()) {
    chunk_fma<kBF16Param, kTeacher>(ema, param, teacher, begin, end, d, a);
    return;
  }
#endif
  chunk_generic<kBF16Param, kTeacher>(ema, param, teacher, begin, end, d, a);
}

}  // namespace

void ema_update_cpu(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                    const TeacherList& teacher, const EmaDecay& decay) {
  float d = decay.decay;
  float a = decay.one_minus;
  if (decay.ptr != nullptr) {
    const double v = decay.ptr_is_double ? *static_cast<const double*>(decay.ptr)
                                         : static_cast<double>(*static_cast<const float*>(decay.ptr));
    d = static_cast<float>(v);
    a = static_cast<float>(1.0 - v);
  }

  const auto chunks = cpu_chunks::split(ema.size(), [&](size_t i) { return ema[i].numel(); });
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const cpu_chunks::Chunk& ch = chunks[c];
      float* e = ema[ch.tensor].data_ptr<float>();
      const void* p = params[ch.tensor].data_ptr();
      uint16_t* t = nullptr;
      if (!teacher.empty() && teacher[ch.tensor].has_value()) {
        t = reinterpret_cast<uint16_t*>(teacher[ch.tensor]->data_ptr());
      }
      const bool bf16 = params[ch.tensor].scalar_type() == at::kBFloat16;
      if (t != nullptr) {
        if (bf16) run_chunk<true, true>(e, p, t, ch.begin, ch.end, d, a);
        else run_chunk<false, true>(e, p, t, ch.begin, ch.end, d, a);
      } else {
        if (bf16) run_chunk<true, false>(e, p, t, ch.begin, ch.end, d, a);
        else run_chunk<false, false>(e, p, t, ch.begin, ch.end, d, a);
      }
    }
  });
}

}  // namespace mirai
