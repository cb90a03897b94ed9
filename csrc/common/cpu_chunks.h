// Multi-tensor machinery shared by the one-pass CPU kernels (ema/ema_cpu.cpp,
// optim/adamw_cpu.cpp), the CPU side of common/multi_tensor.cuh:
//   * the tensors of a call are cut into chunks of at most kChunk elements, in list
//     order, which at::parallel_for spreads over the intra-op threads;
//   * on x86-64 the chunk loop of each kernel is also compiled for AVX2+FMA
//     (__attribute__((target("avx2,fma")))) and chosen at run time by has_avx2_fma();
//     MIRAI_CPU_X86 says whether that copy exists, MIRAI_CPU_ALWAYS_INLINE inlines the
//     shared loop body into both copies.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define MIRAI_CPU_X86 1
#define MIRAI_CPU_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define MIRAI_CPU_X86 0
#define MIRAI_CPU_ALWAYS_INLINE inline
#endif

namespace mirai {
namespace cpu_chunks {

constexpr int64_t kChunk = 1 << 15;  // elements per parallel work item

struct Chunk {
  int64_t tensor;  // index into the lists
  int64_t begin;   // first element
  int64_t end;     // one past the last element
};

// Chunks of n tensors whose sizes numel_of(i) gives, in list order.
template <typename NumelOf>
std::vector<Chunk> split(size_t n, NumelOf numel_of) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = numel_of(i);
    for (int64_t b = 0; b < numel; b += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), b, std::min(numel, b + kChunk)});
    }
  }
  return chunks;
}

#if MIRAI_CPU_X86
// True when this CPU runs the AVX2+FMA copies of the chunk loops.
inline bool has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

}  // namespace cpu_chunks
}  // namespace mirai
