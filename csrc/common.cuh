// Device helpers shared by the MicroAdam kernels: dtype conversion, 8-element vector
// access, the launch-table record, EF (de)quantization and warp/block reductions.
//
// Every float operation that the reference performs as a separate torch op is written
// with a round-to-nearest intrinsic so that the compiler cannot contract it into an FMA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "microadam.cuh"

namespace microadam {

#ifndef MICROADAM_THREADS
#define MICROADAM_THREADS 256  // threads per block of every kernel (benchmarks/kernel_variants.py may override it)
#endif

constexpr int THREADS = MICROADAM_THREADS;
constexpr int NWARPS = THREADS / 32;
constexpr unsigned FULL = 0xffffffffu;

struct Rec {
  void* param;
  const void* grad;
  uint8_t* ef;
  float* ef_min;
  float* ef_max;
  int16_t* win_idx;
  __nv_bfloat16* win_val;
  int64_t n, k_total, start, step, ws;
  int k_last;
  float c1, c2;
  const bool* go;  // F_GO
};

// The record at t (a launch-table row of REC fields), unpacked.
__device__ inline void fill_record(const int64_t* t, Rec& r) {
  r.param = reinterpret_cast<void*>(t[F_PARAM]);
  r.grad = reinterpret_cast<const void*>(t[F_GRAD]);
  r.ef = reinterpret_cast<uint8_t*>(t[F_EF]);
  r.ef_min = reinterpret_cast<float*>(t[F_EF_MIN]);
  r.ef_max = reinterpret_cast<float*>(t[F_EF_MAX]);
  r.win_idx = reinterpret_cast<int16_t*>(t[F_WIN_IDX]);
  r.win_val = reinterpret_cast<__nv_bfloat16*>(t[F_WIN_VAL]);
  r.n = t[F_N];
  r.k_total = t[F_K_TOTAL];
  r.k_last = (int)t[F_K_LAST];
  r.start = t[F_START];
  r.step = t[F_STEP];
  const uint64_t coef = (uint64_t)t[F_COEF];
  r.c1 = __uint_as_float((unsigned)(coef & 0xffffffffu));
  r.c2 = __uint_as_float((unsigned)(coef >> 32));
  r.ws = t[F_WS];
  r.go = reinterpret_cast<const bool*>(t[F_GO]);
}

// Thread 0: the record whose F_START range holds virtual block vb (binary search).
__device__ inline void find_record(const int64_t* table, int ntensors, int64_t vb, Rec& r) {
  int lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[(int64_t)mid * REC + F_START] <= vb) lo = mid; else hi = mid - 1;
  }
  fill_record(table + (int64_t)lo * REC, r);
}

// All lanes of one warp: the same record as find_record, from one round of loads per 128
// records (starts ascend; the last record whose start is <= vb holds it), then lane 0 fills r.
__device__ inline void find_record_warp(const int64_t* table, int ntensors, int64_t vb, Rec& r) {
  const int lane = threadIdx.x & 31;
  int lo = 0;
  for (int b = 0; b < ntensors; b += 128) {
    int64_t st[4];
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int i = b + 32 * h + lane;
      st[h] = i < ntensors ? table[(int64_t)i * REC + F_START] : INT64_MAX;
    }
    bool past = false;
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const unsigned bal = __ballot_sync(0xffffffffu, st[h] <= vb);
      if (bal) lo = b + 32 * h + 31 - __clz(bal);
      past = past || bal != 0xffffffffu;
    }
    if (past) break;
  }
  if (lane == 0) fill_record(table + (int64_t)lo * REC, r);
}

// -- dtypes ------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0; }

// 8 consecutive elements as float; p must be 16-byte aligned.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 r = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = __uint_as_float(w[j] << 16);
    v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 r = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
    v[2 * j] = f.x;
    v[2 * j + 1] = f.y;
  }
}

__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  unsigned w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const T lo = from_f<T>(v[2 * j]), hi = from_f<T>(v[2 * j + 1]);
    w[j] = (unsigned)*reinterpret_cast<const uint16_t*>(&lo) |
           ((unsigned)*reinterpret_cast<const uint16_t*>(&hi) << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// A unit of 8 floats to / from shared memory: two 16-byte accesses when whole (a lane's
// scalar accesses at stride 8 floats would conflict 8 ways); missing elements read as 0.
__device__ __forceinline__ void store_unit(float* s, const float (&v)[8], int valid) {
  if (valid == 8) {
    store8(s, v);
  } else {
    for (int j = 0; j < valid; ++j) s[j] = v[j];
  }
}
__device__ __forceinline__ void load_unit_smem(const float* s, float (&v)[8], int valid) {
  if (valid == 8) {
    load8(s, v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = j < valid ? s[j] : 0.0f;
  }
}

// -- error feedback ------------------------------------------------------------------
// RN((hi - lo) / 15) without a division: q0 = RN(d * RN(1/15)) is within one ulp of d / 15, the
// residual r = d - 15 q0 is exact in an FMA, and RN(q0 + r * RN(1/15)) is the correctly rounded
// quotient (Markstein's theorem); tests/test_cuda_float_ops.py checks it against the IEEE division
// for all 2^32 floats (d = +-inf: the residual is NaN and q0 the quotient; the residual is
// computed negated so that d = -0 gives -0, as the division does).
__device__ __forceinline__ float div15(float d) {
  constexpr float kInv15 = 1.0f / 15.0f;
  const float q0 = __fmul_rn(d, kInv15);
  const float t = __fmaf_rn(q0, 15.0f, -d);  // -(residual), exact; +0 for d = -0, so that q keeps the sign
  const float q = __fmaf_rn(t, -kInv15, q0);
  return t == t ? q : q0;
}
__device__ __forceinline__ float ef_scale(float lo, float hi) { return div15(__fsub_rn(hi, lo)); }

// min + code * scale, a product then a sum (no FMA), as reference.dequantize_ef.
__device__ __forceinline__ float dequant_code(unsigned c, float lo, float scale) {
  return __fadd_rn(lo, __fmul_rn((float)c, scale));
}

__device__ __forceinline__ unsigned nibble(const uint8_t* ef, int64_t gi) {
  const uint8_t byte = ef[gi >> 1];
  return (gi & 1) ? (byte >> 4) : (byte & 15u);
}

// xi(t, i) of docs/algorithm.md: lowbias32 of a counter, 24 bits, in [0, 1).
__device__ __forceinline__ float hash_uniform(int64_t step, int64_t i) {
  unsigned x = (unsigned)(uint64_t)i * 0x9E3779B1u + (unsigned)(uint64_t)step * 0x85EBCA77u;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return (float)(x >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

// Q of one element given its block's new range (code 0 where the range is empty).
__device__ __forceinline__ unsigned quant_code(float a, float lo, float scale, bool stochastic,
                                               int64_t step, int64_t gi) {
  if (!(scale > 0.0f)) return 0u;
  const float q = __fdiv_rn(__fsub_rn(a, lo), scale);
  float c = stochastic ? floorf(__fadd_rn(q, hash_uniform(step, gi))) : rintf(q);
  c = fminf(fmaxf(c, 0.0f), 15.0f);
  return (unsigned)c;
}

// The reciprocal of a scale for quant_code_fast / quant_unit, which need it only within one
// float step of the correctly rounded 1 / scale (below): the hardware approximation
// rcp.approx.f32 (subnormals kept; tests/test_cuda_float_ops.py checks the one step for every
// positive float), cheaper than the correctly rounded reciprocal.
__device__ __forceinline__ float scale_inv(float scale) {
  float r;
  asm("rcp.approx.f32 %0, %1;" : "=f"(r) : "f"(scale));
  return r;
}

// The same code as quant_code from a reciprocal instead of a division: with inv within one
// float step of RN(1 / scale) (1.5 ulp of 1 / scale), q = RN(d * inv) is within 5e-6 of
// RN(d / scale) for q in [0, 15] (15 * (1.5 * 2^-23 + 2^-24) + 2^-20), and q + xi rounds to
// within another 2^-20, so the code can only differ when q (or q + xi) lies within 1e-5 of a
// rounding boundary; then the exact division decides. An infinite inv (scale < 2^-128) always does.
__device__ __forceinline__ unsigned quant_code_fast(float a, float lo, float scale, float inv,
                                                    bool stochastic, int64_t step, int64_t gi) {
  if (!(scale > 0.0f)) return 0u;
  if (!(inv < INFINITY)) return quant_code(a, lo, scale, stochastic, step, gi);  // 1 / scale overflowed
  const float d = __fsub_rn(a, lo);
  const float q = __fmul_rn(d, inv);
  float c;
  if (!stochastic) {
    c = rintf(q);
    if (fabsf(fabsf(q - c) - 0.5f) < 1e-5f) c = rintf(__fdiv_rn(d, scale));
  } else {
    const float xi = hash_uniform(step, gi);
    float s = __fadd_rn(q, xi);
    if (fabsf(s - rintf(s)) < 1e-5f) s = __fadd_rn(__fdiv_rn(d, scale), xi);
    c = floorf(s);
  }
  return (unsigned)fminf(fmaxf(c, 0.0f), 15.0f);
}

// quant_code_fast of the 8 values of a unit in one quant block, code j at bits 4j (0 past
// valid). The fast path runs for all 8; the few within 1e-5 of a rounding boundary are
// redone by the exact division afterwards, one branch per unit instead of one per element.
__device__ __forceinline__ unsigned quant_unit(const float (&v)[8], int valid, float lo, float scale, float inv,
                                               bool stochastic, int64_t step, int64_t gi0) {
  if (!(scale > 0.0f)) return 0u;
  if (!stochastic) {
    // lo <= v <= hi (lo, hi: the block's min and max), so 0 <= q <= 15 (1 + 3 ulp): t = q + 1.5 * 2^23
    // rounds q to the nearest integer (ties to even, as rintf) in its low mantissa bits, which are
    // the code: no clamp, no conversion (elements past valid may give any nibble: masked below).
    // (A NaN in the block, possible only with nonfinite="off", gets code 15 where a clamp gives 0;
    // the reference casts its NaN code to uint8, which C leaves undefined.) The tie test is taken
    // out of the loop: the unit's largest |q - c| (one FMNMX an element) tells whether any element
    // lies within 1e-5 of a rounding boundary; only then are the elements tested one by one and
    // those redone by the exact division.
    unsigned w = 0u;
    float dmax = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float q = __fmul_rn(__fsub_rn(v[j], lo), inv);
      const float t = __fadd_rn(q, 12582912.0f);
      dmax = fmaxf(dmax, fabsf(__fsub_rn(q, __fsub_rn(t, 12582912.0f))));
      w |= (__float_as_uint(t) & 15u) << (4 * j);
    }
    if (dmax > 0.49999f || !(inv < INFINITY)) {
      unsigned redo = inv < INFINITY ? 0u : 0xffu;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float q = __fmul_rn(__fsub_rn(v[j], lo), inv);
        const float c = __fsub_rn(__fadd_rn(q, 12582912.0f), 12582912.0f);
        redo |= (unsigned)(fabsf(__fsub_rn(q, c)) > 0.49999f) << j;
      }
      redo &= (1u << valid) - 1u;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (redo & (1u << j))
          w = (w & ~(15u << (4 * j))) | (quant_code(v[j], lo, scale, false, step, gi0 + j) << (4 * j));
      }
    }
    return w & (valid >= 8 ? 0xffffffffu : (1u << (4 * valid)) - 1u);
  }
  unsigned w = 0u, redo = inv < INFINITY ? 0u : 0xffu;  // 1 / scale overflowed (scale < 2^-128): all exact
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float q = __fmul_rn(__fsub_rn(v[j], lo), inv);
    if (!stochastic) {
      // Never taken (the nearest codes returned above), yet kept: without this branch the
      // compiler allocates the lean instances' registers differently and the step is slower.
      const float t = __fadd_rn(q, 12582912.0f);
      const float c = __fsub_rn(t, 12582912.0f);
      redo |= (unsigned)(fabsf(fabsf(q - c) - 0.5f) < 1e-5f) << j;
      w |= (__float_as_uint(t) & 15u) << (4 * j);
    } else {
      const float s = __fadd_rn(q, hash_uniform(step, gi0 + j));
      redo |= (unsigned)(fabsf(s - rintf(s)) < 1e-5f) << j;
      w |= (unsigned)fminf(fmaxf(floorf(s), 0.0f), 15.0f) << (4 * j);
    }
  }
  const unsigned keep = valid >= 8 ? 0xffffffffu : (1u << (4 * valid)) - 1u;
  redo &= (1u << valid) - 1u;
  if (redo) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // unrolled: v stays in registers
      if (redo & (1u << j))
        w = (w & ~(15u << (4 * j))) | (quant_code(v[j], lo, scale, stochastic, step, gi0 + j) << (4 * j));
    }
  }
  return w & keep;
}

// -- reductions ------------------------------------------------------------------------
// Exclusive prefix sum over the block's threads (all threads must call it).
__device__ inline unsigned block_excl_scan(unsigned v, unsigned* sw) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  unsigned x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned y = __shfl_up_sync(FULL, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) sw[w] = x;
  __syncthreads();
  unsigned before = 0;
  for (int j = 0; j < w; ++j) before += sw[j];
  __syncthreads();
  return before + x - v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fminf(v, __shfl_xor_sync(FULL, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
  return v;
}

// Float min/max through integer atomics (ordering of IEEE bit patterns by sign).
__device__ __forceinline__ void atomic_min_f(float* addr, float v) {
  if (v >= 0.0f) atomicMin(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMax(reinterpret_cast<unsigned*>(addr), __float_as_uint(v));
}
__device__ __forceinline__ void atomic_max_f(float* addr, float v) {
  if (v >= 0.0f) atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned*>(addr), __float_as_uint(v));
}

// Hint: bring the 32-byte sector holding p into L2 (no fault, no result).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// First position in sorted row[0..k) whose value is >= x.
__device__ __forceinline__ int lower_bound16(const int16_t* row, int k, int x) {
  int lo = 0, hi = k;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (row[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

}  // namespace microadam
