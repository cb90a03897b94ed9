// Multi-tensor apply machinery shared by the one-launch CUDA kernels
// (ema/ema_cuda.cu, optim/adamw_cuda.cu).
//
//   * Table: one Row per tensor (kPtrs data pointers, numel, index of its first
//     tile, kernel-specific flags) plus a sentinel row whose tile_begin is the
//     total tile count. The host fills it in pinned memory (HostTable) and
//     copies it to the device asynchronously on the current stream: no host
//     sync, and the caching host allocator keeps the pinned block alive until
//     the copy is done.
//   * Tiles: each tensor is cut into tiles of a kernel-chosen size; tiles are
//     numbered globally in list order. for_each_tile walks them grid-stride:
//     a block finds the row of its first tile by binary search over
//     Row::tile_begin (skipping empty tensors), then only moves forward.
//   * ResidentGrid: #SMs x resident blocks per SM for a kernel, cached per
//     thread for the last device asked about.
//   * Vector helpers: 8 elements per 16-byte-aligned access (2 x float4 of fp32,
//     one uint4 of bf16) and single-element loads, all with the streaming
//     cache hint (.cs: every byte is touched once per call).
#pragma once

#include <array>
#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/float_math.h"

namespace mirai {
namespace multi_tensor {

// One table row per tensor; the sentinel row n has tile_begin = total tiles.
template <int kPtrs>
struct Row {
  int64_t ptr[kPtrs];  // data pointers, 0 where a tensor is absent
  int64_t numel;
  int64_t tile_begin;  // global index of the tensor's first tile
  int64_t flags;       // meaning chosen by the kernel
};

// Host side of the table: fill rows in list order with add(), then upload().
template <int kPtrs>
class HostTable {
 public:
  HostTable(int n, int64_t tile_elems) : n_(n), tile_(tile_elems) {
    host_ = at::empty({int64_t(n + 1) * kWords}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    rows_ = reinterpret_cast<Row<kPtrs>*>(host_.data_ptr<int64_t>());
  }

  // Appends the next row and numbers its tiles.
  void add(const std::array<const void*, kPtrs>& ptrs, int64_t numel, int64_t flags) {
    Row<kPtrs>& r = rows_[next_++];
    for (int k = 0; k < kPtrs; ++k) r.ptr[k] = reinterpret_cast<int64_t>(ptrs[k]);
    r.numel = numel;
    r.tile_begin = tiles_;
    r.flags = flags;
    tiles_ += (numel + tile_ - 1) / tile_;
  }

  int64_t tiles() const { return tiles_; }

  // Writes the sentinel and copies the table to `device` (non-blocking, current stream).
  at::Tensor upload(const at::Device& device) {
    TORCH_CHECK(next_ == n_, "multi_tensor: ", next_, " rows added, expected ", n_);
    std::memset(&rows_[n_], 0, sizeof(Row<kPtrs>));
    rows_[n_].tile_begin = tiles_;
    return host_.to(at::TensorOptions().device(device).dtype(at::kLong), /*non_blocking=*/true);
  }

  static const Row<kPtrs>* rows(const at::Tensor& device_table) {
    return reinterpret_cast<const Row<kPtrs>*>(device_table.data_ptr<int64_t>());
  }

 private:
  static constexpr int64_t kWords = sizeof(Row<kPtrs>) / sizeof(int64_t);
  static_assert(sizeof(Row<kPtrs>) % sizeof(int64_t) == 0, "Row is packed as int64 words");
  int n_;
  int64_t tile_;
  int next_ = 0;
  int64_t tiles_ = 0;
  at::Tensor host_;
  Row<kPtrs>* rows_ = nullptr;
};

// Calls f(row, begin, end) for every tile of this block, grid-stride over the n_tiles tiles;
// [begin, end) are element offsets within the row's tensor.
template <int kPtrs, typename F>
__device__ __forceinline__ void for_each_tile(const Row<kPtrs>* __restrict__ table, int n_tensors,
                                              int64_t n_tiles, int64_t tile_elems, F&& f) {
  int64_t t = blockIdx.x;
  if (t >= n_tiles) return;
  // Largest tensor index i with tile_begin[i] <= t (skips empty tensors).
  int lo = 0, hi = n_tensors;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (table[mid].tile_begin <= t) lo = mid; else hi = mid;
  }
  int i = lo;
  for (; t < n_tiles; t += gridDim.x) {
    while (table[i + 1].tile_begin <= t) ++i;
    const Row<kPtrs> row = table[i];
    const int64_t begin = (t - row.tile_begin) * tile_elems;
    const int64_t end = begin + tile_elems < row.numel ? begin + tile_elems : row.numel;
    f(row, begin, end);
  }
}

// Grid size that fills the device once: #SMs x resident blocks per SM of `kernel`.
// Keep one instance per kernel (static thread_local at the launch site).
class ResidentGrid {
 public:
  template <typename Kernel>
  int get(Kernel kernel, int threads, int device) {
    if (device_ != device) {
      int blocks_per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads, 0));
      const int sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
      grid_ = (blocks_per_sm > 1 ? blocks_per_sm : 1) * sms;
      device_ = device;
    }
    return grid_;
  }

 private:
  int device_ = -1;
  int grid_ = 0;
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr int kVec = 8;  // elements per vector access (16 bytes of bf16, 2 x 16 bytes of fp32)

__device__ __forceinline__ void load8(const float* p, float (&v)[kVec]) {
  const float4 x = __ldcs(reinterpret_cast<const float4*>(p));
  const float4 y = __ldcs(reinterpret_cast<const float4*>(p) + 1);
  v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
  v[4] = y.x; v[5] = y.y; v[6] = y.z; v[7] = y.w;
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[kVec]) {
  const uint4 w = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = __uint_as_float(words[k] << 16);              // low half = element 2k
    v[2 * k + 1] = __uint_as_float(words[k] & 0xFFFF0000u);  // high half = element 2k+1
  }
}

__device__ __forceinline__ void store8(float* p, const float (&v)[kVec]) {
  __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  __stcs(reinterpret_cast<float4*>(p) + 1, make_float4(v[4], v[5], v[6], v[7]));
}

// Stores bf16_rne(v[k]) (fp::float_to_bf16_bits).
__device__ __forceinline__ void store8_bf16(__nv_bfloat16* p, const float (&v)[kVec]) {
  uint32_t words[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    words[k] = uint32_t(fp::float_to_bf16_bits(v[2 * k])) | (uint32_t(fp::float_to_bf16_bits(v[2 * k + 1])) << 16);
  }
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(words[0], words[1], words[2], words[3]));
}

__device__ __forceinline__ float load1(const float* p, int64_t i) { return __ldcs(p + i); }
__device__ __forceinline__ float load1(const __nv_bfloat16* p, int64_t i) {
  return fp::bf16_bits_to_float(__ldcs(reinterpret_cast<const unsigned short*>(p) + i));
}
__device__ __forceinline__ void store1_bf16(__nv_bfloat16* p, int64_t i, float x) {
  __stcs(reinterpret_cast<unsigned short*>(p) + i, fp::float_to_bf16_bits(x));
}

}  // namespace multi_tensor
}  // namespace mirai
