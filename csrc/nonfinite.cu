// The gradient check of optim.py step() (nonfinite="skip" / "raise") on CUDA tensors: one
// read of every gradient of a device, as a multi-tensor launch. A NaN or an Inf is an
// element whose exponent bits are all set, tested on the raw bits (16-byte loads where the
// tensor allows). Per tensor a flag byte is cleared when it holds one, and the last flag
// (the step's `go`, which the step's kernels read through the records' F_GO) with any of them.
// The caller fills the flags with 1 first.
#include <climits>
#include <cstdint>

#include <cuda_runtime.h>

#include "microadam.cuh"

namespace microadam {
namespace {

constexpr int CT = 256;  // threads per block

// Whether a 32-bit word holds a non-finite element: two 16-bit ones (mask of the exponent
// bits, 0x7F80 bf16 or 0x7C00 fp16) or one float32 (0x7F800000).
__device__ __forceinline__ bool bad_word(unsigned w, unsigned m16, bool wide) {
  if (wide) return (w & 0x7F800000u) == 0x7F800000u;
  return (w & m16) == m16 || ((w >> 16) & m16) == m16;
}

__device__ __forceinline__ bool bad_element(const uint8_t* p, int64_t i, unsigned m16, bool wide) {
  if (wide) return bad_word(reinterpret_cast<const unsigned*>(p)[i], 0u, true);
  return (reinterpret_cast<const uint16_t*>(p)[i] & m16) == m16;
}

// Block b takes bytes [c * CHECK_CHUNK, ...) of the tensor whose chunk range holds b.
__global__ void __launch_bounds__(CT) nonfinite_kernel(const int64_t* table, int ntensors, uint8_t* flags) {
  __shared__ int t_s;
  if (threadIdx.x == 0) {
    int lo = 0, hi = ntensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (table[(int64_t)mid * CHECK_REC + 3] <= (int64_t)blockIdx.x) lo = mid; else hi = mid - 1;
    }
    t_s = lo;
  }
  __syncthreads();
  const int t = t_s;
  const int64_t* rec = table + (int64_t)t * CHECK_REC;
  const uint8_t* base = reinterpret_cast<const uint8_t*>(rec[0]);
  const int64_t nbytes = rec[1];
  const int dt = (int)rec[2];
  const bool wide = dt == DT_F32;
  const unsigned m16 = dt == DT_BF16 ? 0x7F80u : 0x7C00u;
  const int esize = wide ? 4 : 2;
  const int64_t b0 = ((int64_t)blockIdx.x - rec[3]) * CHECK_CHUNK;
  const int64_t b1 = b0 + CHECK_CHUNK < nbytes ? b0 + CHECK_CHUNK : nbytes;
  bool bad = false;
  if ((reinterpret_cast<uintptr_t>(base) & 15u) == 0) {
    // Whole 16-byte units of the chunk (CHECK_CHUNK is a multiple of 16), four in flight.
    const uint4* v = reinterpret_cast<const uint4*>(base + b0);
    const int nv = (int)((b1 - b0) / 16);
    int i = threadIdx.x;
    for (; i + 3 * CT < nv; i += 4 * CT) {
      uint4 x[4];
#pragma unroll
      for (int h = 0; h < 4; ++h) x[h] = __ldcs(v + i + h * CT);
#pragma unroll
      for (int h = 0; h < 4; ++h)
        bad |= bad_word(x[h].x, m16, wide) | bad_word(x[h].y, m16, wide) | bad_word(x[h].z, m16, wide) |
               bad_word(x[h].w, m16, wide);
    }
    for (; i < nv; i += CT) {
      const uint4 x = __ldcs(v + i);
      bad |= bad_word(x.x, m16, wide) | bad_word(x.y, m16, wide) | bad_word(x.z, m16, wide) | bad_word(x.w, m16, wide);
    }
    // The tail of the tensor past its last whole unit (in its last chunk only).
    for (int64_t e = (b0 + 16 * (int64_t)nv) / esize + threadIdx.x; e < b1 / esize; e += CT)
      bad |= bad_element(base, e, m16, wide);
  } else {
    for (int64_t e = b0 / esize + threadIdx.x; e < b1 / esize; e += CT) bad |= bad_element(base, e, m16, wide);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) {
    flags[t] = 0;
    flags[ntensors] = 0;
  }
}

}  // namespace

int launch_nonfinite(const int64_t* table, int ntensors, int64_t total_chunks, uint8_t* flags, void* stream) {
  if (ntensors <= 0 || total_chunks <= 0) return 0;
  if (total_chunks > INT_MAX) return (int)cudaErrorInvalidValue;
  nonfinite_kernel<<<(unsigned)total_chunks, CT, 0, static_cast<cudaStream_t>(stream)>>>(table, ntensors, flags);
  return (int)cudaGetLastError();
}

}  // namespace microadam
