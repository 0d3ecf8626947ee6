// Fused MicroAdam step kernels (docs/algorithm.md; spec: microadam_dist/ops/reference.py).
//
// Pass 1, one CUDA block per top-k block of any tensor in the launch table:
//   a = g + Q^-1(EF) into shared memory; radix-select the k-th largest |a| (ties to the
//   lower index); write the window row ascending; zero the selected entries; per quant
//   block min/max; requantize the EF (when quant blocks nest in the top-k block) or
//   fold the block's min/max into a workspace (second pass); rebuild m_hat, v_hat of the
//   block from its m window rows in shared memory and update the params (only the
//   window positions when there is no weight decay).
// Pass 2 (only tensors whose quant blocks straddle top-k blocks, e.g. quant_block
//   100000): recompute a with the old EF ranges, zero this step's window positions,
//   quantize with the new ranges. Then the new ranges are committed.
//
// Arithmetic is float32 in the reference's order with explicit round-to-nearest
// intrinsics, so that no fused multiply-add changes a result: EF codes and window
// values match the reference bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "microadam.cuh"

namespace microadam {
namespace {

constexpr int THREADS = 256;
constexpr int NWARPS = THREADS / 32;
constexpr unsigned FULL = 0xffffffffu;
constexpr int HIST_BINS = 2048;      // first radix pass: 11 bits
constexpr int MAXQ_SHARED = 1024;    // quant blocks per top-k block held in shared memory

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
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Thread 0: the record whose F_START range holds virtual block vb (binary search).
__device__ void find_record(const int64_t* table, int ntensors, int64_t vb, Rec& r) {
  int lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (table[(int64_t)mid * REC + F_START] <= vb) lo = mid; else hi = mid - 1;
  }
  const int64_t* t = table + (int64_t)lo * REC;
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
}

// Q^-1 of one element: min + code * ((max - min) / 15), no contraction.
__device__ __forceinline__ float dequant(const uint8_t* ef, int64_t gi, float lo, float hi) {
  const uint8_t byte = ef[gi >> 1];
  const unsigned c = (gi & 1) ? (byte >> 4) : (byte & 15u);
  const float scale = __fdiv_rn(__fsub_rn(hi, lo), 15.0f);
  return __fadd_rn(lo, __fmul_rn((float)c, scale));
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

// Q of one element given its block's new range.
__device__ __forceinline__ unsigned quant_code(float a, float lo, float hi, bool stochastic,
                                               int64_t step, int64_t gi) {
  const float scale = __fdiv_rn(__fsub_rn(hi, lo), 15.0f);
  if (!(scale > 0.0f)) return 0u;
  const float q = __fdiv_rn(__fsub_rn(a, lo), scale);
  float c = stochastic ? floorf(__fadd_rn(q, hash_uniform(step, gi))) : rintf(q);
  c = fminf(fmaxf(c, 0.0f), 15.0f);
  return (unsigned)c;
}

// Exclusive prefix sum over the block's threads (all threads must call it).
__device__ unsigned block_excl_scan(unsigned v, unsigned* sw) {
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

__device__ __forceinline__ void atomic_min_f(float* addr, float v) {
  if (v >= 0.0f) atomicMin(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMax(reinterpret_cast<unsigned*>(addr), __float_as_uint(v));
}
__device__ __forceinline__ void atomic_max_f(float* addr, float v) {
  if (v >= 0.0f) atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned*>(addr), __float_as_uint(v));
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

// Radix select over |a[0..L)|: returns the k-th largest key T (.x) and (.y) the
// number of elements equal to T that belong to the top k (the lowest-indexed ones).
__device__ __forceinline__ uint2 radix_threshold(const float* a, int L, int k, unsigned* hist,
                                                 unsigned* sw, unsigned* bcast) {
  unsigned prefix = 0, pmask = 0;
  unsigned need = (unsigned)k;
#pragma unroll 1
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 20 : (pass == 1 ? 10 : 0);
    const int nbins = pass == 0 ? 2048 : 1024;
    for (int b = threadIdx.x; b < nbins; b += THREADS) hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < L; i += THREADS) {
      const unsigned key = __float_as_uint(a[i]) & 0x7fffffffu;
      if ((key & pmask) == prefix) atomicAdd(&hist[(key >> shift) & (nbins - 1)], 1u);
    }
    __syncthreads();
    // Thread t owns `per` bins, thread 0 the highest: an exclusive scan in thread order
    // counts the candidates in higher bins.
    const int per = nbins / THREADS;
    const int top = nbins - 1 - threadIdx.x * per;
    unsigned local = 0;
    for (int j = 0; j < per; ++j) local += hist[top - j];
    const unsigned above = block_excl_scan(local, sw);
    if (above < need && above + local >= need) {
      unsigned acc = above;
      for (int j = 0; j < per; ++j) {
        const unsigned h = hist[top - j];
        if (acc + h >= need) { bcast[0] = (unsigned)(top - j); bcast[1] = acc; break; }
        acc += h;
      }
    }
    __syncthreads();
    const unsigned bin = bcast[0];
    need -= bcast[1];
    prefix |= bin << shift;
    pmask |= (unsigned)(nbins - 1) << shift;
    __syncthreads();
  }
  return make_uint2(prefix, need);
}

template <typename P, typename G>
__global__ void __launch_bounds__(THREADS, 4) compress_update_kernel(StepArgs A) {
  extern __shared__ float4 smem_raw[];
  const int B = A.topk_block, Q = A.quant_block, m = A.m;
  const int S = 2 * ((B + 1) / 2);  // floats of `a`; reused as two halves for the moments
  float* a = reinterpret_cast<float*>(smem_raw);
  unsigned* hist = reinterpret_cast<unsigned*>(a + S);
  float* smin = reinterpret_cast<float*>(hist);  // after the top-k, hist holds the new ranges
  float* smax = smin + MAXQ_SHARED;
  __shared__ Rec R;
  __shared__ unsigned sw[NWARPS];
  __shared__ unsigned wcount[2 * NWARPS];
  __shared__ unsigned bcast[2];
  __shared__ float red[2 * NWARPS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int64_t vb = blockIdx.x; vb < A.total_blocks; vb += gridDim.x) {
    if (tid == 0) find_record(A.table, A.ntensors, vb, R);
    __syncthreads();
    P* param = reinterpret_cast<P*>(R.param);
    const G* grad = reinterpret_cast<const G*>(R.grad);
    const int64_t jb = vb - R.start;
    const int64_t base = jb * B;
    const int L = (int)min((int64_t)B, R.n - base);
    const int64_t nbt = (R.n + B - 1) / B;
    const int kj = (jb == nbt - 1) ? R.k_last : A.k_block;
    const int64_t col0 = jb * A.k_block;
    const int row = (int)((R.step - 1) % m);
    const bool onepass = R.ws < 0;
    const int64_t q0 = base / Q;
    const unsigned r0 = (unsigned)(base - q0 * Q);

    // 1. a = g + Q^-1(EF) with the ranges of the previous step.
    for (int i = tid; i < L; i += THREADS) {
      const int64_t gi = base + i;
      const int64_t q = q0 + (r0 + (unsigned)i) / (unsigned)Q;
      a[i] = __fadd_rn(to_f(grad[gi]), dequant(R.ef, gi, R.ef_min[q], R.ef_max[q]));
    }
    __syncthreads();

    // 2. k-th largest |a| and how many of its equals are kept.
    const uint2 thr = radix_threshold(a, L, kj, hist, sw, bcast);
    const unsigned T = thr.x, take_eq = thr.y;

    // 3. Selected entries in index order -> window row (ascending), then zero them.
    // Warp w scans a contiguous chunk; ballots give in-chunk ranks, warp totals the offsets.
    const int CW = (((L + NWARPS - 1) / NWARPS) + 31) & ~31;
    const int w0 = warp * CW, w1 = min(L, w0 + CW);
    unsigned cgt = 0, ceq = 0;
    for (int s = w0; s < w1; s += 32) {
      const int i = s + lane;
      const unsigned key = i < w1 ? (__float_as_uint(a[i]) & 0x7fffffffu) : 0u;
      cgt += __popc(__ballot_sync(FULL, i < w1 && key > T));
      ceq += __popc(__ballot_sync(FULL, i < w1 && key == T));
    }
    if (lane == 0) { wcount[warp] = cgt; wcount[NWARPS + warp] = ceq; }
    __syncthreads();
    unsigned gt_before = 0, eq_before = 0;
    for (int j = 0; j < warp; ++j) { gt_before += wcount[j]; eq_before += wcount[NWARPS + j]; }
    int16_t* widx = R.win_idx + (int64_t)row * R.k_total + col0;
    __nv_bfloat16* wval = R.win_val + (int64_t)row * R.k_total + col0;
    const unsigned lt = (1u << lane) - 1u;
    for (int s = w0; s < w1; s += 32) {
      const int i = s + lane;
      const float v = i < w1 ? a[i] : 0.0f;
      const unsigned key = __float_as_uint(v) & 0x7fffffffu;
      const bool gt = i < w1 && key > T, eq = i < w1 && key == T;
      const unsigned mgt = __ballot_sync(FULL, gt), meq = __ballot_sync(FULL, eq);
      const unsigned my_gt = gt_before + __popc(mgt & lt), my_eq = eq_before + __popc(meq & lt);
      if (gt || (eq && my_eq < take_eq)) {
        const unsigned pos = my_gt + min(my_eq, take_eq);
        widx[pos] = (int16_t)i;
        wval[pos] = __float2bfloat16_rn(v);
        a[i] = 0.0f;
      }
      gt_before += __popc(mgt);
      eq_before += __popc(meq);
    }
    __syncthreads();

    // 4. New min/max per quant block overlapping this top-k block (after zeroing).
    const int nql = (int)((r0 + (unsigned)L - 1u) / (unsigned)Q) + 1;
    if (Q <= 512) {
      for (int ql = warp; ql < nql; ql += NWARPS) {
        const int64_t lo_i = (int64_t)ql * Q - r0;
        const int s = (int)max(lo_i, (int64_t)0), e = (int)min(lo_i + Q, (int64_t)L);
        float mn = INFINITY, mx = -INFINITY;
        for (int i = s + lane; i < e; i += 32) { mn = fminf(mn, a[i]); mx = fmaxf(mx, a[i]); }
        mn = warp_min(mn);
        mx = warp_max(mx);
        if (lane == 0) {
          if (onepass) {
            smin[ql] = mn; smax[ql] = mx;
            R.ef_min[q0 + ql] = mn; R.ef_max[q0 + ql] = mx;
          } else {
            atomic_min_f(A.ws + R.ws + q0 + ql, mn);
            atomic_max_f(A.ws + A.ws_half + R.ws + q0 + ql, mx);
          }
        }
      }
    } else {
      for (int ql = 0; ql < nql; ++ql) {
        const int64_t lo_i = (int64_t)ql * Q - r0;
        const int s = (int)max(lo_i, (int64_t)0), e = (int)min(lo_i + Q, (int64_t)L);
        float mn = INFINITY, mx = -INFINITY;
        for (int i = s + tid; i < e; i += THREADS) { mn = fminf(mn, a[i]); mx = fmaxf(mx, a[i]); }
        mn = warp_min(mn);
        mx = warp_max(mx);
        if (lane == 0) { red[warp] = mn; red[NWARPS + warp] = mx; }
        __syncthreads();
        if (tid == 0) {
          for (int j = 1; j < NWARPS; ++j) { mn = fminf(mn, red[j]); mx = fmaxf(mx, red[NWARPS + j]); }
          if (onepass) {
            smin[ql] = mn; smax[ql] = mx;
            R.ef_min[q0 + ql] = mn; R.ef_max[q0 + ql] = mx;
          } else {
            atomic_min_f(A.ws + R.ws + q0 + ql, mn);
            atomic_max_f(A.ws + A.ws_half + R.ws + q0 + ql, mx);
          }
        }
        __syncthreads();
      }
    }
    __syncthreads();

    // 5. One pass: requantize here (base is even, so bytes do not straddle blocks).
    if (onepass) {
      uint8_t* ef = R.ef + (base >> 1);
      const int nbytes = (L + 1) / 2;
      for (int b = tid; b < nbytes; b += THREADS) {
        const int i0 = 2 * b, i1 = 2 * b + 1;
        const int qa = (int)((unsigned)i0 / (unsigned)Q);
        unsigned c = quant_code(a[i0], smin[qa], smax[qa], A.stochastic, R.step, base + i0);
        if (i1 < L) {
          const int qb = (int)((unsigned)i1 / (unsigned)Q);
          c |= quant_code(a[i1], smin[qb], smax[qb], A.stochastic, R.step, base + i1) << 4;
        }
        ef[b] = (uint8_t)c;
      }
    }

    // 6. Moments from the window rows of this block, then the param update, in halves
    // of the block so that both sums fit in `a`. Rows are added in order r = 0..m-1
    // (as the reference's index_add_ on the CPU does); acc2 < 0 marks untouched slots.
    const int CH = S / 2 > 0 ? S / 2 : 1;
    float* acc1 = a;
    float* acc2 = a + CH;
    for (int c0 = 0; c0 < L; c0 += CH) {
      const int c1 = min(L, c0 + CH);
      __syncthreads();
      for (int i = c0 + tid; i < c1; i += THREADS) { acc1[i - c0] = 0.0f; acc2[i - c0] = -1.0f; }
      __syncthreads();
      for (int r = 0; r < m; ++r) {
        const int age = (int)(((R.step - 1 - r) % m + m) % m);
        const float b1 = A.betapow[age], b2 = A.betapow[m + age];
        const int16_t* ri = R.win_idx + (int64_t)r * R.k_total + col0;
        const __nv_bfloat16* rv = R.win_val + (int64_t)r * R.k_total + col0;
        for (int c = tid; c < kj; c += THREADS) {
          const int idx = ri[c];
          if (idx >= c0 && idx < c1) {
            const float v = __bfloat162float(rv[c]);
            const float t1 = __fmul_rn(b1, v), t2 = __fmul_rn(b2, __fmul_rn(v, v));
            const int p = idx - c0;
            const bool first = acc2[p] < 0.0f;
            acc1[p] = __fadd_rn(first ? 0.0f : acc1[p], t1);
            acc2[p] = __fadd_rn(first ? 0.0f : acc2[p], t2);
          }
        }
        __syncthreads();
      }
      for (int i = c0 + tid; i < c1; i += THREADS) {
        float s2 = acc2[i - c0];
        const bool touched = s2 >= 0.0f;
        if (!touched && !A.dense) continue;
        const float s1 = touched ? acc1[i - c0] : 0.0f;
        if (!touched) s2 = 0.0f;
        const float mh = __fmul_rn(s1, R.c1), vh = __fmul_rn(s2, R.c2);
        float p = to_f(param[base + i]);
        if (A.has_decay) p = __fmul_rn(p, A.decay);
        const float u = __fdiv_rn(mh, __fadd_rn(__fsqrt_rn(vh), A.eps));
        param[base + i] = from_f<P>(__fsub_rn(p, __fmul_rn(A.lr, u)));
      }
    }
    __syncthreads();  // R and shared memory are reused by the next virtual block
  }
}

// Pass 2: EF of tensors whose quant blocks straddle top-k blocks, CHUNK2 elements per block.
template <typename G>
__global__ void __launch_bounds__(THREADS) requant_kernel(StepArgs A) {
  __shared__ uint8_t flag[CHUNK2];
  __shared__ Rec R;
  const int B = A.topk_block, Q = A.quant_block, m = A.m, tid = threadIdx.x;
  for (int64_t vc = blockIdx.x; vc < A.total_chunks2; vc += gridDim.x) {
    if (tid == 0) find_record(A.table2, A.ntensors2, vc, R);
    __syncthreads();
    const G* grad = reinterpret_cast<const G*>(R.grad);
    const int64_t c0 = (vc - R.start) * CHUNK2;
    const int len = (int)min((int64_t)CHUNK2, R.n - c0);
    for (int i = tid; i < len; i += THREADS) flag[i] = 0;
    __syncthreads();
    // Mark this step's window entries (row (t-1) mod m) that fall in the chunk.
    const int row = (int)((R.step - 1) % m);
    const int64_t nbt = (R.n + B - 1) / B;
    const int64_t jb0 = c0 / B, jb1 = (c0 + len - 1) / B;
    for (int64_t jb = jb0; jb <= jb1; ++jb) {
      const int kj = (jb == nbt - 1) ? R.k_last : A.k_block;
      const int16_t* ri = R.win_idx + (int64_t)row * R.k_total + jb * A.k_block;
      for (int c = tid; c < kj; c += THREADS) {
        const int64_t pos = jb * B + ri[c] - c0;
        if (pos >= 0 && pos < len) flag[pos] = 1;
      }
    }
    __syncthreads();
    const int64_t q0 = c0 / Q;
    const unsigned r0 = (unsigned)(c0 - q0 * Q);
    const float* nmin = A.ws + R.ws;
    const float* nmax = A.ws + A.ws_half + R.ws;
    for (int b = tid; b < (len + 1) / 2; b += THREADS) {
      unsigned c = 0;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = 2 * b + h;
        if (i >= len) break;
        const int64_t gi = c0 + i;
        const int64_t q = q0 + (r0 + (unsigned)i) / (unsigned)Q;
        float v = __fadd_rn(to_f(grad[gi]), dequant(R.ef, gi, R.ef_min[q], R.ef_max[q]));
        if (flag[i]) v = 0.0f;
        c |= quant_code(v, nmin[q], nmax[q], A.stochastic, R.step, gi) << (4 * h);
      }
      // Every thread of the grid reads the old codes of its own bytes only: safe in place.
      R.ef[(c0 >> 1) + b] = (uint8_t)c;
    }
    __syncthreads();
  }
}

__global__ void fill_ws_kernel(float* ws, int64_t half) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < half;
       i += (int64_t)gridDim.x * blockDim.x) {
    ws[i] = INFINITY;
    ws[half + i] = -INFINITY;
  }
}

// The new ranges of the second-pass tensors replace the old ones once pass 2 is done.
__global__ void commit_ranges_kernel(StepArgs A) {
  const int64_t* t = A.table2 + (int64_t)blockIdx.y * REC;
  const int64_t n = t[F_N], off = t[F_WS];
  const int64_t nq = (n + A.quant_block - 1) / A.quant_block;
  float* mn = reinterpret_cast<float*>(t[F_EF_MIN]);
  float* mx = reinterpret_cast<float*>(t[F_EF_MAX]);
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < nq;
       q += (int64_t)gridDim.x * blockDim.x) {
    mn[q] = A.ws[off + q];
    mx[q] = A.ws[A.ws_half + off + q];
  }
}

template <typename P, typename G>
cudaError_t launch_pass1(const StepArgs& A, cudaStream_t s) {
  const int64_t smem = pass1_smem_bytes(A.topk_block);
  auto kernel = compress_update_kernel<P, G>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  const int64_t grid = A.total_blocks < INT_MAX ? A.total_blocks : INT_MAX;
  kernel<<<(unsigned)grid, THREADS, (size_t)smem, s>>>(A);
  return cudaGetLastError();
}

template <typename G>
cudaError_t launch_pass2(const StepArgs& A, cudaStream_t s) {
  const int64_t grid = A.total_chunks2 < INT_MAX ? A.total_chunks2 : INT_MAX;
  requant_kernel<G><<<(unsigned)grid, THREADS, 0, s>>>(A);
  return cudaGetLastError();
}

template <typename P>
cudaError_t dispatch_grad(const StepArgs& A, cudaStream_t s) {
  switch (A.grad_dtype) {
    case DT_F32: return launch_pass1<P, float>(A, s);
    case DT_BF16: return launch_pass1<P, __nv_bfloat16>(A, s);
    case DT_F16: return launch_pass1<P, __half>(A, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t pass1_smem_bytes(int topk_block) {
  return (int64_t)(2 * ((topk_block + 1) / 2)) * 4 + HIST_BINS * 4;
}

bool one_pass(int64_t n, int topk_block, int quant_block) {
  const int64_t nb = (n + topk_block - 1) / topk_block;
  const int64_t span = n < topk_block ? n : topk_block;
  const int64_t nql = (span + quant_block - 1) / quant_block;
  if (nql > MAXQ_SHARED) return false;
  return nb <= 1 || (topk_block % 2 == 0 && topk_block % quant_block == 0);
}

int launch_step(const StepArgs& A, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaSuccess;
  if (A.ntensors2 > 0) {
    const int64_t blocks = (A.ws_half + THREADS - 1) / THREADS;
    fill_ws_kernel<<<(unsigned)(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096), THREADS, 0, s>>>(A.ws, A.ws_half);
    if ((e = cudaGetLastError()) != cudaSuccess) return (int)e;
  }
  if (A.ntensors > 0 && A.total_blocks > 0) {
    switch (A.param_dtype) {
      case DT_F32: e = dispatch_grad<float>(A, s); break;
      case DT_BF16: e = dispatch_grad<__nv_bfloat16>(A, s); break;
      case DT_F16: e = dispatch_grad<__half>(A, s); break;
      default: e = cudaErrorInvalidValue;
    }
    if (e != cudaSuccess) return (int)e;
  }
  if (A.ntensors2 > 0 && A.total_chunks2 > 0) {
    switch (A.grad_dtype) {
      case DT_F32: e = launch_pass2<float>(A, s); break;
      case DT_BF16: e = launch_pass2<__nv_bfloat16>(A, s); break;
      case DT_F16: e = launch_pass2<__half>(A, s); break;
      default: e = cudaErrorInvalidValue;
    }
    if (e != cudaSuccess) return (int)e;
    commit_ranges_kernel<<<dim3(64, (unsigned)A.ntensors2), THREADS, 0, s>>>(A);
    if ((e = cudaGetLastError()) != cudaSuccess) return (int)e;
  }
  return 0;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace microadam
