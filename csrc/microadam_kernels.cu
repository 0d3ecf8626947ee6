// Fused MicroAdam step kernels (docs/algorithm.md; spec: microadam_dist/ops/reference.py).
//
// Pass 1, one CUDA block per top-k block of any tensor in the launch table:
//   prefetch the block's params into L2 (the update at the end reads them); stage the
//   block's m window rows in shared memory; a = g + Q^-1(EF) into shared memory (16-byte
//   loads); find the k-th largest |a| (topk.cuh); write the window row
//   ascending; zero the selected entries; per quant block min/max; requantize the EF
//   (when quant blocks nest in the top-k block) or fold the block's min/max into a
//   workspace for pass 2; then every distinct window position of the block rebuilds its
//   m_hat, v_hat from the m rows (row order, as the reference) and updates its param.
//   Without weight decay only those positions are read and written; with it, a dense
//   sweep decays the others.
// Top-k blocks of MICROADAM_WIDE_FROM (8192) elements and more take the instances of pass 1
// that microadam_kernels_wide.cu builds from this file with 512 threads a block.
// Pass 2 (tensors whose quant blocks straddle top-k blocks, e.g. quant_block 100000):
//   recompute a with the old EF ranges, zero this step's window positions, quantize
//   with the new ranges. Then the new ranges are committed.
// Step 7 (alpha > 0), once every tensor's EF is final: feedback_kernel subtracts
//   lr * alpha * Q^-1(EF) from every param, then keep_ranges_kernel scales the ranges.
#include <climits>
#include <type_traits>

// Launch shape of the build; benchmarks/kernel_variants.py overrides these with -D to
// compare others (the values here are the build). THREADS is in common.cuh, CHUNK2 in
// microadam.cuh.
#ifndef MICROADAM_MIN_BLOCKS
#define MICROADAM_MIN_BLOCKS 5  // __launch_bounds__ of pass 1: resident blocks per SM (caps registers)
#endif
#ifndef MICROADAM_P2_MIN_BLOCKS
#define MICROADAM_P2_MIN_BLOCKS 6  // __launch_bounds__ of pass 2: resident blocks per SM
#endif
#ifndef MICROADAM_LEAN
#define MICROADAM_LEAN 15  // lean instances of pass 1 built for common launches (lean_kind): bit 0 the one with
                           // quant blocks fused by shuffles, bit 1 the one for other one-pass quant blocks,
                           // bit 2: a twin of each with the dense sweep, for launches with weight decay,
                           // bit 3: the one for one quant block per top-k block (quant_block == topk_block)
#endif
#ifndef MICROADAM_WIDE_FROM
#define MICROADAM_WIDE_FROM 8192  // top-k blocks of this size and more take pass 1 of microadam_kernels_wide.cu
                                  // (more threads a block: these fit only 1-2 blocks a SM by shared memory)
#endif
#ifndef MICROADAM_PASS1_WIDE
#define MICROADAM_PASS1_WIDE 0  // set by microadam_kernels_wide.cu: this translation unit holds only its pass 1
#endif

#include "common.cuh"
#include "topk.cuh"

namespace microadam {
namespace {

constexpr int MAXQ_SHARED = 512;      // quant blocks per top-k block whose ranges sit in shared memory
constexpr int OWN_CAP = 2 * HIST_BINS;  // window positions listed (int16) in the histogram's memory
constexpr int ACC_DOUBLE_MAX = 8192;  // up to this topk_block, both moment sums fit next to a
constexpr int WIN_SMEM_CAP = 24 * 1024;  // bytes of window rows staged per block
constexpr int MASK_MAX_M = 32;        // up to this m, window moments through a row bitmask per position
constexpr int BIGQ_MAX = 64;          // quant blocks of over 512 in a top-k block (<= 32768 elements)

// 8 gradient elements and their 8 EF codes, from global memory (vector loads when allowed).
template <typename G>
__device__ __forceinline__ void load_unit(const G* grad, const uint8_t* ef, int64_t g0, int valid,
                                          bool vec, float (&g)[8], unsigned& codes) {
  if (vec && valid == 8) {
    load8(grad + g0, g);
    codes = *reinterpret_cast<const unsigned*>(ef + (g0 >> 1));
  } else {
    codes = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      g[j] = j < valid ? to_f(grad[g0 + j]) : 0.0f;
      if (j < valid) codes |= nibble(ef, g0 + j) << (4 * j);
    }
  }
}

// a_j = g_j + Q^-1(code_j) with the ranges of the quant blocks holding elements off..off+7
// (off counted from the start of quant block q0).
// POW2: Q is a power of two (shifts and masks instead of divisions).
template <bool POW2>
__device__ __forceinline__ void dequant_unit(const float (&g)[8], unsigned codes, const float* mins,
                                             const float* maxs, int64_t q0, unsigned off, int Q,
                                             int valid, float (&out)[8]) {
  const int64_t q = q0 + (POW2 ? off >> (__ffs(Q) - 1) : off / (unsigned)Q);
  if ((POW2 ? off & (unsigned)(Q - 1) : off % (unsigned)Q) + 8u <= (unsigned)Q) {
    const float lo = mins[q], scale = ef_scale(lo, maxs[q]);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = __fadd_rn(g[j], dequant_code((codes >> (4 * j)) & 15u, lo, scale));
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j >= valid) { out[j] = 0.0f; continue; }
      const int64_t qj = q0 + (off + j) / (unsigned)Q;
      const float lo = mins[qj];
      out[j] = __fadd_rn(g[j], dequant_code((codes >> (4 * j)) & 15u, lo, ef_scale(lo, maxs[qj])));
    }
  }
}

// Stores the 8 codes of a unit: one 32-bit word when aligned and whole, else byte by byte.
__device__ __forceinline__ void store_codes(uint8_t* ef, int64_t g0, unsigned w, int valid, bool vec) {
  if (vec && valid == 8) {
    *reinterpret_cast<unsigned*>(ef + (g0 >> 1)) = w;
  } else {
    for (int b = 0; 2 * b < valid; ++b) ef[(g0 >> 1) + b] = (uint8_t)(w >> (8 * b));
  }
}

// Scalars of one top-k block, computed once by thread 0 (64-bit divisions) and read from
// shared memory by the others.
struct BlockInfo {
  int64_t base, q0, col0;
  int L, kj, row;
  unsigned r0, kdiv;  // kdiv: e / kj == __umulhi(e, kdiv) for 0 <= e < m * kj (0: divide)
};

__device__ __forceinline__ void block_info(const Rec& R, int64_t vb, int B, int KB, int Q, int m, BlockInfo& I) {
  const int64_t jb = vb - R.start;
  I.base = jb * B;
  I.L = (int)min((int64_t)B, R.n - I.base);
  // 32-bit divisions where the operands fit (a 64-bit one is a long software sequence, run by
  // thread 0 while the block waits), and the last block told by its length.
  I.kj = R.n - I.base <= (int64_t)B ? R.k_last : KB;
  I.col0 = jb * KB;
  const uint64_t s1 = (uint64_t)(R.step - 1), ub = (uint64_t)I.base;
  I.row = (int)(s1 <= 0xFFFFFFFFull ? (unsigned)s1 % (unsigned)m : s1 % (uint64_t)m);
  I.q0 = ub <= 0xFFFFFFFFull ? (int64_t)((unsigned)ub / (unsigned)Q) : I.base / Q;
  I.r0 = (unsigned)(I.base - I.q0 * Q);
  // ceil(2^32 / kj): exact while e * kj <= 2^32 (e * (kdiv * kj - 2^32) < 2^32).
  I.kdiv = I.kj > 1 && (uint64_t)m * I.kj * I.kj <= 0xFFFFFFFFull ? 0xFFFFFFFFu / (unsigned)I.kj + 1u : 0u;
}

// LEAN > 0: instances for launches where every tensor takes the fast top-k, the window rows
// staged in shared memory, the bitmask moments, one pass, and no dense sweep (lean_kind;
// LEAN & 4: the twins that keep the sweep, for weight decay);
// LEAN & 3 == 1 also fuses quant blocks by shuffles; LEAN & 3 == 3: one quant block per top-k
// block (its range read once). The other paths are compiled out of them.
template <typename P, typename G, int LEAN>
__global__ void __launch_bounds__(THREADS, MICROADAM_MIN_BLOCKS) compress_update_kernel(StepArgs A) {
  extern __shared__ float4 smem_raw[];
  const int B = A.topk_block, Q = A.quant_block, m = A.m, KB = A.k_block;
  const int S = (B + 15) & ~15;
  // Floats of a; the upper part lists the top-k candidates, the row-by-row moments use SA/2 each.
  const int SA = LEAN || B <= ACC_DOUBLE_MAX ? 2 * S : S;
  float* a = reinterpret_cast<float*>(smem_raw);
  unsigned* hist = reinterpret_cast<unsigned*>(a + SA);
  float* smin = reinterpret_cast<float*>(hist);  // after the top-k: new minima, scales, 1/scales
  float* sscale = smin + MAXQ_SHARED;
  float* sinv = sscale + MAXQ_SHARED;
  int16_t* owners = reinterpret_cast<int16_t*>(hist);  // during the update: distinct window positions
  // (LEAN || A.win_smem) and (!LEAN && A.dense) are written out where used: held in locals
  // they changed the general instance's register allocation (more spill loads).
  int16_t* sidx = (LEAN || A.win_smem) ? reinterpret_cast<int16_t*>(hist + HIST_BINS) : nullptr;
  __nv_bfloat16* sval = (LEAN || A.win_smem) ? reinterpret_cast<__nv_bfloat16*>(sidx + m * KB) : nullptr;
  __shared__ Rec R;
  __shared__ BlockInfo BI;
  __shared__ unsigned sw[NWARPS];
  __shared__ unsigned wcount[2 * NWARPS];
  __shared__ unsigned gcnt[32];
  __shared__ unsigned bcast[4];
  __shared__ float red[2 * NWARPS];
  __shared__ float qmn[BIGQ_MAX], qmx[BIGQ_MAX];  // big_q: the new range of each quant block
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // big_q is compiled into the general instance, lean instances 2 and 3 and the weight-decay twin
  // of 3, not into the twin of 2: there it takes registers from the rest (a larger stack frame,
  // a slower step).
  constexpr bool BIG_Q_IN = (LEAN & 3) != 1 && ((LEAN & 4) == 0 || (LEAN & 3) == 3);
  // The weight-decay twins' update in two phases (their a has 2 S floats).
  constexpr bool SPLIT = (LEAN & 4) != 0;
  constexpr bool ONEQ = (LEAN & 3) == 3;  // quant_block == topk_block: q0 = the block's index, r0 = 0
  // The one range of the block from the top-k's candidates (qmn[0], qmx[0]), needs big_q's arrays.
  constexpr bool CAND_RANGE = ONEQ && BIG_Q_IN;
  // Instance 2: the candidates' range goes to crange (qmn/qmx hold big_q's ranges of several quant blocks).
  constexpr bool CAND_RANGE2 = (LEAN & 3) == 2;
  __shared__ float crange[2];
  // Fast top-k (topk_cand) where the upper half of a can list its candidates.
  const bool fast = LEAN || SA > S;
  const bool use_mask = LEAN || m <= MASK_MAX_M;
  // The step's go flag (F_GO): read by thread 0 with the record, by all after the first barrier.
  // (Read by every thread from StepArgs at the start instead, it changes the register
  // allocation and slows the step.)
  __shared__ int go_s;

  for (int64_t vb = blockIdx.x; vb < A.total_blocks; vb += gridDim.x) {
    if (tid == 0) {
      find_record(A.table, A.ntensors, vb, R);
      go_s = R.go == nullptr || *R.go;
      block_info(R, vb, B, KB, Q, m, BI);
    }
    if (!fast) for (int b = tid; b < HIST_BINS; b += THREADS) hist[b] = 0u;
    if (BIG_Q_IN && tid < BIGQ_MAX) { qmn[tid] = INFINITY; qmx[tid] = -INFINITY; }
    if (CAND_RANGE2 && tid == 0) { crange[0] = INFINITY; crange[1] = -INFINITY; }
    __syncthreads();
    if (!go_s) return;  // the gradient check failed: every thread leaves, nothing written
    P* param = reinterpret_cast<P*>(R.param);
    const G* grad = reinterpret_cast<const G*>(R.grad);
    const int64_t base = BI.base, col0 = BI.col0, q0 = BI.q0;
    const int L = BI.L, kj = BI.kj, row = BI.row;
    const unsigned r0 = BI.r0, kdiv = BI.kdiv;
    // Row of window entry e.
    auto row_of = [&](int e) { return kdiv ? (int)__umulhi((unsigned)e, kdiv) : e / kj; };
    const bool onepass = (LEAN & 3) == 1 || ONEQ || R.ws < 0;
    const int nunits = (L + 7) / 8;
    {  // the update at the end reads the block's params: bring every 32-byte sector into L2 now
      const int nbytes = L * (int)sizeof(P);
      for (int o = 32 * tid; o < nbytes; o += 32 * THREADS) prefetch_l2(reinterpret_cast<const char*>(param + base) + o);
    }

    // 1. Stage the window rows written in earlier steps (the current one is written below);
    // two entries per thread, both loaded before either is stored.
    if (LEAN || A.win_smem) {
      for (int e0 = tid; e0 < m * kj; e0 += 2 * THREADS) {
        int16_t li[2];
        __nv_bfloat16 lv[2];
        int dst[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int e = e0 + h * THREADS, r = row_of(e), c = e - r * kj;
          dst[h] = e < m * kj && r != row ? r * KB + c : -1;
          if (dst[h] >= 0) {
            li[h] = R.win_idx[(int64_t)r * R.k_total + col0 + c];
            lv[h] = R.win_val[(int64_t)r * R.k_total + col0 + c];
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (dst[h] >= 0) { sidx[dst[h]] = li[h]; sval[dst[h]] = lv[h]; }
        }
      }
    }

    // 2. a = g + Q^-1(EF) with the ranges of the previous step; two units in flight per thread.
    // Fast top-k: the largest |a| (its rungs of candidates); otherwise the first radix pass
    // of the general top-k.
    const bool vec_in = (base % 8 == 0) && aligned16(grad + base) &&
                        (((uintptr_t)(R.ef + (base >> 1)) & 3u) == 0);
    float amax = 0.0f;
    float lo1 = 0.0f, sc1 = 0.0f;  // ONEQ: the block's one range
    if (ONEQ) {
      lo1 = R.ef_min[q0];
      sc1 = ef_scale(lo1, R.ef_max[q0]);
    }
    for (int u0 = tid; u0 < nunits; u0 += 2 * THREADS) {
      float g[2][8];
      unsigned codes[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int u = u0 + h * THREADS;
        if (u < nunits) load_unit(grad, R.ef, base + 8 * u, min(8, L - 8 * u), vec_in, g[h], codes[h]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int u = u0 + h * THREADS;
        if (u >= nunits) continue;
        const int valid = min(8, L - 8 * u);
        float out[8];
        if (ONEQ) {
#pragma unroll
          for (int j = 0; j < 8; ++j) out[j] = __fadd_rn(g[h][j], dequant_code((codes[h] >> (4 * j)) & 15u, lo1, sc1));
        } else {
          dequant_unit<(LEAN & 3) == 1>(g[h], codes[h], R.ef_min, R.ef_max, q0, r0 + 8u * u, Q, valid, out);
        }
        store_unit(a + 8 * u, out, valid);
        if (fast && valid == 8) {
#pragma unroll
          for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(out[j]));
        } else if (fast) {
#pragma unroll
          for (int j = 0; j < 8; ++j) amax = j < valid ? fmaxf(amax, fabsf(out[j])) : amax;
        } else {
          for (int j = 0; j < valid; ++j) atomicAdd(&hist[hist_bin0(mag_key(out[j]))], 1u);
        }
      }
    }
    if (fast) {
#pragma unroll
      for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, o));
      if (lane == 0) red[warp] = amax;
    }
    __syncthreads();

    // 3. Top-k into window row (t-1) mod m, ascending; zero the kept entries.
    {
      int16_t* gi = R.win_idx + (int64_t)row * R.k_total + col0;
      __nv_bfloat16* gv = R.win_val + (int64_t)row * R.k_total + col0;
      int16_t* si = (LEAN || A.win_smem) ? sidx + row * KB : nullptr;
      __nv_bfloat16* sv = (LEAN || A.win_smem) ? sval + row * KB : nullptr;
      bool done = false;
      if (fast) {
        // The upper half of a (free until the moments) lists the candidates: S / 2 (key, index) pairs.
        float bmax = 0.0f;
        for (int w = 0; w < NWARPS; ++w) bmax = fmaxf(bmax, red[w]);
        unsigned* ckey = reinterpret_cast<unsigned*>(a + S);
        const int cap = S / 2;  // (key, index) pairs
        done = topk_cand<CAND_RANGE || CAND_RANGE2>(a, L, kj, bmax, hist, ckey, ckey + cap, cap, gi, gv, si, sv, sw,
                                                    gcnt, wcount, bcast, CAND_RANGE ? qmn : crange,
                                                    CAND_RANGE ? qmx : crange + 1);
      }
      if (!done) {
        const uint2 thr = topk_threshold(a, L, kj, hist, sw, bcast, !fast);
        topk_write(a, L, thr.x, thr.y, gi, gv, si, sv, wcount);
      }
    }

    // 4+5 fused, for small power-of-two quant blocks in one pass: Q/8 consecutive lanes
    // hold one quant block's units; they reduce min/max by shuffles and quantize at once.
    const bool fused_q = (LEAN & 3) == 1 || (onepass && Q >= 8 && Q <= 256 && (Q & (Q - 1)) == 0);
    if (fused_q) {
      const int seg = Q / 8, ssh = __ffs(seg) - 1;  // Q is a power of two here
      const bool vec_out = (base % 8 == 0) && (((uintptr_t)(R.ef + (base >> 1)) & 3u) == 0);
      for (int u0 = 0; u0 < nunits; u0 += THREADS) {
        const int u = u0 + tid;
        const int valid = u < nunits ? min(8, L - 8 * u) : 0;
        float v[8];
        float mn = INFINITY, mx = -INFINITY;
        load_unit_smem(a + 8 * u, v, valid);
        if (valid == 8) {
#pragma unroll
          for (int j = 0; j < 8; ++j) { mn = fminf(mn, v[j]); mx = fmaxf(mx, v[j]); }
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (j < valid) { mn = fminf(mn, v[j]); mx = fmaxf(mx, v[j]); }
          }
        }
        for (int o = 1; o < seg; o <<= 1) {
          mn = fminf(mn, __shfl_xor_sync(FULL, mn, o));
          mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, o));
        }
        if (valid > 0) {
          const int64_t q = q0 + (u >> ssh);
          const float sc = ef_scale(mn, mx), inv = scale_inv(sc);
          if ((u & (seg - 1)) == 0) { R.ef_min[q] = mn; R.ef_max[q] = mx; }
          const unsigned w = quant_unit(v, valid, mn, sc, inv, A.stochastic, R.step, base + 8 * u);
          store_codes(R.ef, base + 8 * u, w, valid, vec_out);
        }
      }
    }

    // 4+5 for one-pass quant blocks over 512 (Q a multiple of 256, or one quant block holding
    // the whole block; base % Q == 0 in one pass): the 256 elements of a warp's round lie in one
    // quant block, so warp reductions folded into shared atomics give the ranges after one
    // barrier, and a second pass quantizes. (The general path below: strided scalar reads, a
    // serial combine in thread 0 and three barriers.)
    const bool big_q = BIG_Q_IN && onepass && !fused_q && Q > 512 && ((Q & 255) == 0 || L <= Q);
    if (big_q) {
      const bool vec_out = (base % 8 == 0) && (((uintptr_t)(R.ef + (base >> 1)) & 3u) == 0);
      // CAND_RANGE: slot 0 holds the range of the top-k's candidates not kept; with both signs
      // it is the block's range and the pass below is skipped, else the pass fills slot 1 (not
      // slot 0, which the other threads may not have read yet: the test must be uniform).
      const bool cand = CAND_RANGE && qmn[0] < 0.0f && qmx[0] > 0.0f;
      const int q1 = CAND_RANGE ? 1 : 0;  // ONEQ: the slot of the pass
      if (!cand) {
        for (int u0 = 0; u0 < nunits; u0 += THREADS) {
          const int u = u0 + tid;
          const int valid = u < nunits ? min(8, L - 8 * u) : 0;
          float mn = INFINITY, mx = -INFINITY;
          if (valid > 0) {
            float v[8];
            load_unit_smem(a + 8 * u, v, valid);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              if (j < valid) { mn = fminf(mn, v[j]); mx = fmaxf(mx, v[j]); }
            }
          }
          mn = warp_min(mn);
          mx = warp_max(mx);
          if (lane == 0 && u < nunits) {
            const int ql = ONEQ ? q1 : (int)((8u * (unsigned)u) / (unsigned)Q);
            atomic_min_f(&qmn[ql], mn);
            atomic_max_f(&qmx[ql], mx);
          }
        }
        __syncthreads();
      }
      for (int u = tid; u < nunits; u += THREADS) {
        const int valid = min(8, L - 8 * u);
        const unsigned e0 = 8u * (unsigned)u;
        const int ql = ONEQ ? (cand ? 0 : q1) : (int)(e0 / (unsigned)Q);
        const float lo = qmn[ql], hi = qmx[ql], sc = ef_scale(lo, hi);
        const int64_t qg = q0 + (ONEQ ? 0 : ql);
        if (ONEQ ? u == 0 : e0 % (unsigned)Q == 0u) { R.ef_min[qg] = lo; R.ef_max[qg] = hi; }
        float v[8];
        load_unit_smem(a + 8 * u, v, valid);
        const unsigned w = quant_unit(v, valid, lo, sc, scale_inv(sc), A.stochastic, R.step, base + 8 * u);
        store_codes(R.ef, base + 8 * u, w, valid, vec_out);
      }
    }

    // 4. New min/max per quant block overlapping this top-k block (after zeroing).
    // Divided only on the paths that loop over the quant blocks (most launches never need it).
    auto nql_now = [&]() { return (int)((r0 + (unsigned)L - 1u) / (unsigned)Q) + 1; };
    auto sink = [&](int ql, float mn, float mx) {
      if (onepass) {
        const float sc = ef_scale(mn, mx);
        smin[ql] = mn;
        sscale[ql] = sc;
        sinv[ql] = scale_inv(sc);
        R.ef_min[q0 + ql] = mn;
        R.ef_max[q0 + ql] = mx;
      } else {
        atomic_min_f(A.ws + R.ws + q0 + ql, mn);
        atomic_max_f(A.ws + A.ws_half + R.ws + q0 + ql, mx);
      }
    };
    if (fused_q || big_q) {
    } else if (Q <= 512) {
      const int nql = nql_now();
      for (int ql = warp; ql < nql; ql += NWARPS) {
        const int64_t lo_i = (int64_t)ql * Q - r0;
        const int s = (int)max(lo_i, (int64_t)0), e = (int)min(lo_i + Q, (int64_t)L);
        float mn = INFINITY, mx = -INFINITY;
        for (int i = s + lane; i < e; i += 32) { mn = fminf(mn, a[i]); mx = fmaxf(mx, a[i]); }
        mn = warp_min(mn);
        mx = warp_max(mx);
        if (lane == 0) sink(ql, mn, mx);
      }
    } else if (CAND_RANGE2 && r0 + (unsigned)L <= (unsigned)Q && crange[0] < 0.0f && crange[1] > 0.0f) {
      // The block lies in one quant block and the top-k's candidates not kept hold both signs:
      // their range is the block's (topk_cand).
      if (tid == 0) sink(0, crange[0], crange[1]);
    } else {
      const int nql = nql_now();
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
          sink(ql, mn, mx);
        }
        __syncthreads();
      }
    }
    if (!big_q) __syncthreads();

    // 5. One pass: requantize here (base is even: no EF byte straddles two blocks).
    if (onepass && !fused_q && !big_q) {
      const bool vec_out = (base % 8 == 0) && (((uintptr_t)(R.ef + (base >> 1)) & 3u) == 0);
      for (int u = tid; u < nunits; u += THREADS) {
        const int valid = min(8, L - 8 * u);
        unsigned w = 0;
        const int ql0 = (int)((8u * u) / (unsigned)Q);
        if ((8u * u) % (unsigned)Q + 8u <= (unsigned)Q) {  // the unit lies in one quant block
          const float lo = smin[ql0], sc = sscale[ql0], inv = sinv[ql0];
          float v[8];
          load_unit_smem(a + 8 * u, v, valid);
          w = quant_unit(v, valid, lo, sc, inv, A.stochastic, R.step, base + 8 * u);
        } else {
          for (int j = 0; j < valid; ++j) {
            const int i = 8 * u + j;
            const int ql = (int)((unsigned)i / (unsigned)Q);
            w |= quant_code_fast(a[i], smin[ql], sscale[ql], sinv[ql], A.stochastic, R.step, base + i) << (4 * j);
          }
        }
        store_codes(R.ef, base + 8 * u, w, valid, vec_out);
      }
    }
    __syncthreads();

    // 6. Moments and update. Rows are added in order r = 0..m-1 from 0, as the reference's
    // index_add_ on the CPU does. Without weight decay only the window's positions are
    // read and written; with it (A.dense), a sweep decays the others.
    const int16_t* wi0 = (LEAN || A.win_smem) ? sidx : R.win_idx + col0;
    const __nv_bfloat16* wv0 = (LEAN || A.win_smem) ? sval : R.win_val + col0;
    const int64_t rs = (LEAN || A.win_smem) ? KB : R.k_total;
    const float z = __fmul_rn(A.lr, __fdiv_rn(0.0f, __fadd_rn(0.0f, A.eps)));  // lr*(0/(sqrt(0)+eps))
    const bool vec_p = (base % 8 == 0) && aligned16(param + base);
    // Param i of the block from its sums: m_hat = s1 * c1, v_hat = s2 * c2. (The param is loaded
    // before the division, whose latency then covers the load's.)
    auto update = [&](int i, float s1, float s2) {
      const float mh = __fmul_rn(s1, R.c1), vh = __fmul_rn(s2, R.c2);
      float pv = to_f(param[base + i]);
      if (A.has_decay) pv = __fmul_rn(pv, A.decay);
      const float u = __fdiv_rn(mh, __fadd_rn(__fsqrt_rn(vh), A.eps));
      param[base + i] = from_f<P>(__fsub_rn(pv, __fmul_rn(A.lr, u)));
    };
    // Param i of the block, one at a time: theta (* decay) - d (the sweeps' scalar paths).
    auto decay_sub = [&](int i, float d) {
      float pv = to_f(param[base + i]);
      if (A.has_decay) pv = __fmul_rn(pv, A.decay);
      param[base + i] = from_f<P>(__fsub_rn(pv, d));
    };
    // Positions c0..c1-1 in no window row (in_window(p) false, p counted from c0):
    // m_hat = v_hat = 0, so theta*decay - lr*(0/(0+eps)); 8 at a time where none is in it.
    auto sweep = [&](int c0, int c1, auto in_window) {
      for (int u = tid; u < (c1 - c0 + 7) / 8; u += THREADS) {
        const int i0 = 8 * u, valid = min(8, c1 - c0 - i0);
        bool none = valid == 8;
#pragma unroll
        for (int j = 0; j < 8; ++j) none = none && !in_window(i0 + j);
        if (vec_p && none) {
          float v[8];
          load8(param + base + c0 + i0, v);
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = __fsub_rn(A.has_decay ? __fmul_rn(v[j], A.decay) : v[j], z);
          store8(param + base + c0 + i0, v);
        } else {
          for (int j = 0; j < valid; ++j) {
            if (!in_window(i0 + j)) decay_sub(c0 + i0 + j, z);
          }
        }
      }
    };
    if (use_mask) {
      // Bit r of mask[i]: position i is in window row r. The entry of a position in its
      // lowest row owns it: it sums the position's rows in order (finding each by binary
      // search in its sorted row) and updates the param. Three barriers whatever m is.
      // SPLIT (weight-decay twins, always dense): the owner only writes its position's step to
      // dl, and one pass then decays and updates every param (four barriers).
      unsigned* mask = reinterpret_cast<unsigned*>(a);  // S >= L words, free now
      float* dl = a + S;  // SPLIT: what position i's param loses (the candidates' list is done with)
      for (int i = 4 * tid; i < S; i += 4 * THREADS) {
        *reinterpret_cast<uint4*>(mask + i) = make_uint4(0u, 0u, 0u, 0u);
        if (SPLIT) *reinterpret_cast<float4*>(dl + i) = make_float4(z, z, z, z);
      }
      __syncthreads();
      const int ne = m * kj;
      for (int e = tid; e < ne; e += THREADS) {
        const int r = row_of(e), c = e - r * kj;
        const int idx = wi0[r * rs + c];
        if ((unsigned)idx < (unsigned)L) atomicOr(&mask[idx], 1u << r);
      }
      __syncthreads();
      for (int e = tid; e < ne; e += THREADS) {
        const int r = row_of(e), c = e - r * kj;
        const int16_t* ri = wi0 + r * rs;
        const int idx = ri[c];
        // A repeated index in one row only occurs in a row never written (all zero).
        if ((unsigned)idx >= (unsigned)L || (c > 0 && ri[c - 1] == idx)) continue;
        unsigned bits = mask[idx];
        if (__ffs(bits) - 1 != r) continue;
        float s1 = 0.0f, s2 = 0.0f;
        for (; bits; bits &= bits - 1) {
          const int rr = __ffs(bits) - 1;
          const int cc = rr == r ? c : lower_bound16(wi0 + rr * rs, kj, idx);
          const float v = __bfloat162float(wv0[rr * rs + cc]);
          const int age = row >= rr ? row - rr : row - rr + m;
          s1 = __fadd_rn(s1, __fmul_rn(A.betapow[age], v));
          s2 = __fadd_rn(s2, __fmul_rn(A.betapow[m + age], __fmul_rn(v, v)));
        }
        if (SPLIT) {
          const float mh = __fmul_rn(s1, R.c1), vh = __fmul_rn(s2, R.c2);
          dl[idx] = __fmul_rn(A.lr, __fdiv_rn(mh, __fadd_rn(__fsqrt_rn(vh), A.eps)));
        } else {
          update(idx, s1, s2);
        }
      }
      if (SPLIT) {
        // The dense sweep and the window's updates in one pass: theta (* decay) - dl, 8 params at a
        // time (dl is z outside the window). One unit a thread at a time, as floats: two units in
        // flight, or raw 16-bit words kept in registers, take registers and are slower.
        __syncthreads();
        for (int u = tid; u < nunits; u += THREADS) {
          if (vec_p && 8 * u + 8 <= L) {
            float v[8], d[8];
            load8(param + base + 8 * u, v);
            load8(dl + 8 * u, d);
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = __fsub_rn(A.has_decay ? __fmul_rn(v[j], A.decay) : v[j], d[j]);
            store8(param + base + 8 * u, v);
          } else {
            for (int i = 8 * u; i < min(8 * u + 8, L); ++i) decay_sub(i, dl[i]);
          }
        }
      }
      if (!SPLIT && (!LEAN || (LEAN & 4)) && A.dense) sweep(0, L, [&](int p) { return mask[p] != 0u; });
      __syncthreads();
    } else {
      // Row by row (m > 32), over chunks of the block whose two sums fit in a; acc2 < 0
      // marks a position in no row. The first entry of a position lists it as an owner,
      // which then updates that param.
      const int CH = SA / 2;
      float* acc1 = a;
      float* acc2 = a + CH;
      for (int c0 = 0; c0 < L; c0 += CH) {
        const int c1 = min(L, c0 + CH);
        // CH is a multiple of 8 and a is 16-byte aligned: whole float4 stores.
        for (int i = 4 * tid; i < CH; i += 4 * THREADS) {
          *reinterpret_cast<float4*>(acc1 + i) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          *reinterpret_cast<float4*>(acc2 + i) = make_float4(-1.0f, -1.0f, -1.0f, -1.0f);
        }
        if (tid == 0) bcast[3] = 0u;
        __syncthreads();
        for (int r = 0; r < m; ++r) {
          const int age = row >= r ? row - r : row - r + m;
          const float b1 = A.betapow[age], b2 = A.betapow[m + age];
          const int16_t* ri = wi0 + r * rs;
          const __nv_bfloat16* rv = wv0 + r * rs;
          for (int c = tid; c < kj; c += THREADS) {
            const int idx = ri[c];
            if (idx < c0 || idx >= c1 || (c > 0 && ri[c - 1] == idx)) continue;
            const float v = __bfloat162float(rv[c]);
            const float t1 = __fmul_rn(b1, v), t2 = __fmul_rn(b2, __fmul_rn(v, v));
            const int p = idx - c0;
            const bool first = acc2[p] < 0.0f;
            acc1[p] = __fadd_rn(first ? 0.0f : acc1[p], t1);
            acc2[p] = __fadd_rn(first ? 0.0f : acc2[p], t2);
            if (first) {
              const unsigned slot = atomicAdd(&bcast[3], 1u);
              if (slot < OWN_CAP) owners[slot] = (int16_t)p;
            }
          }
          __syncthreads();
        }
        const unsigned nown = bcast[3];
        if (nown <= OWN_CAP) {
          for (int o = tid; o < (int)nown; o += THREADS) update(c0 + owners[o], acc1[owners[o]], acc2[owners[o]]);
        } else {
          for (int p = tid; p < c1 - c0; p += THREADS) if (acc2[p] >= 0.0f) update(c0 + p, acc1[p], acc2[p]);
        }
        if (!LEAN && A.dense) sweep(c0, c1, [&](int p) { return acc2[p] >= 0.0f; });
        __syncthreads();
      }
    }
    __syncthreads();  // R and shared memory are reused by the next virtual block
  }
}

#if !MICROADAM_PASS1_WIDE
// Pass 2: EF of tensors whose quant blocks straddle top-k blocks, CHUNK2 elements per block.
// Its blocks are short and wait on chains of loads, so the chain is kept short: warp 0 finds
// the record by ballots (one round of loads, not a binary search's chain), the chunk's window
// entries are marked in one round, and 6 resident blocks per SM keep more chunks in flight.
// This step's window positions are bits: unit u's 8 flags
// are byte u & 3 of word u / 4.
template <typename G>
__global__ void __launch_bounds__(THREADS, MICROADAM_P2_MIN_BLOCKS) requant_kernel(StepArgs A) {
  __shared__ unsigned flagw[CHUNK2 / 32];
  __shared__ Rec R;
  const int B = A.topk_block, Q = A.quant_block, m = A.m, KB = A.k_block, tid = threadIdx.x;
  __shared__ int go_s;  // the step's go flag, as in pass 1
  for (int64_t vc = blockIdx.x; vc < A.total_chunks2; vc += gridDim.x) {
    if (tid < 32) find_record_warp(A.table2, A.ntensors2, vc, R);
    if (tid == 0) go_s = R.go == nullptr || *R.go;
    for (int i = tid; i < CHUNK2 / 32; i += THREADS) flagw[i] = 0u;
    __syncthreads();
    if (!go_s) return;
    const G* grad = reinterpret_cast<const G*>(R.grad);
    const int64_t c0 = (vc - R.start) * CHUNK2;
    const int len = (int)min((int64_t)CHUNK2, R.n - c0);
    // Mark this step's window entries (row (t-1) mod m) that fall in the chunk: every
    // (top-k block, column) pair of the chunk at once.
    const int row = (int)((R.step - 1) % m);
    const int64_t nbt = (R.n + B - 1) / B;
    const int64_t jb0 = c0 / B, jb1 = (c0 + len - 1) / B;
    const int npairs = (int)(jb1 - jb0 + 1) * KB;
    for (int t = tid; t < npairs; t += THREADS) {
      const int64_t jb = jb0 + t / KB;
      const int c = t - (int)(jb - jb0) * KB;
      if (c >= ((jb == nbt - 1) ? R.k_last : KB)) continue;
      const int64_t pos = jb * B + R.win_idx[(int64_t)row * R.k_total + jb * KB + c] - c0;
      if (pos >= 0 && pos < len) atomicOr(&flagw[pos >> 5], 1u << (pos & 31));
    }
    __syncthreads();
    const int64_t q0 = c0 / Q;
    const unsigned r0 = (unsigned)(c0 - q0 * Q);
    const float* nmin = A.ws + R.ws;
    const float* nmax = A.ws + A.ws_half + R.ws;
    const bool vec = aligned16(grad + c0) && (((uintptr_t)(R.ef + (c0 >> 1)) & 3u) == 0);
    const int nunits = (len + 7) / 8;
    for (int u = tid; u < nunits; u += THREADS) {
      const int i0 = 8 * u, valid = min(8, len - i0);
      const unsigned off = r0 + (unsigned)i0;
      float g[8], v[8];
      unsigned codes;
      load_unit(grad, R.ef, c0 + i0, valid, vec, g, codes);
      dequant_unit<false>(g, codes, R.ef_min, R.ef_max, q0, off, Q, valid, v);
      const unsigned fl = (flagw[u >> 2] >> (8 * (u & 3))) & 255u;
      unsigned w = 0;
      if (off % (unsigned)Q + 8u <= (unsigned)Q) {  // the unit lies in one quant block
        const int64_t q = q0 + off / (unsigned)Q;
        const float lo = nmin[q], sc = ef_scale(lo, nmax[q]);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = (fl >> j) & 1u ? 0.0f : v[j];
        w = quant_unit(v, valid, lo, sc, scale_inv(sc), A.stochastic, R.step, c0 + i0);
      } else {
        for (int j = 0; j < valid; ++j) {
          const int64_t q = q0 + (off + (unsigned)j) / (unsigned)Q;
          const float x = (fl >> j) & 1u ? 0.0f : v[j];
          w |= quant_code(x, nmin[q], ef_scale(nmin[q], nmax[q]), A.stochastic, R.step, c0 + i0 + j) << (4 * j);
        }
      }
      // Each thread rewrites only the bytes it read: safe in place.
      store_codes(R.ef, c0 + i0, w, valid, vec);
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
  if (t[F_GO] != 0 && !*reinterpret_cast<const bool*>(t[F_GO])) return;
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

// Step 7 (alpha > 0), once the EF is final: every param of every tensor of the table loses
// lr * (alpha * Q^-1(EF)), one CUDA block per top-k block (pass 1's virtual blocks).
template <typename P>
__global__ void __launch_bounds__(THREADS) feedback_kernel(StepArgs A) {
  __shared__ Rec R;
  __shared__ int go_s;
  __shared__ int64_t q0_s;
  const int tid = threadIdx.x;
  for (int64_t vb = blockIdx.x; vb < A.total_blocks; vb += gridDim.x) {
    if (tid == 0) {
      find_record(A.table, A.ntensors, vb, R);
      go_s = R.go == nullptr || *R.go;
      q0_s = (vb - R.start) * A.topk_block / A.quant_block;
    }
    __syncthreads();
    if (go_s) {
      P* param = reinterpret_cast<P*>(R.param);
      const int64_t base = (vb - R.start) * A.topk_block, q0 = q0_s;
      const int L = (int)min((int64_t)A.topk_block, R.n - base);
      const unsigned r0 = (unsigned)(base - q0 * A.quant_block);  // < quant_block: 32-bit offsets below
      for (int j = tid; j < L; j += THREADS) {
        const int64_t q = q0 + (r0 + (unsigned)j) / (unsigned)A.quant_block;
        const float lo = R.ef_min[q];
        const float e = dequant_code(nibble(R.ef, base + j), lo, ef_scale(lo, R.ef_max[q]));
        param[base + j] = from_f<P>(__fsub_rn(to_f(param[base + j]), __fmul_rn(A.lr, __fmul_rn(A.alpha, e))));
      }
    }
    __syncthreads();  // R is reused by the next virtual block
  }
}

// After feedback_kernel: every tensor's EF ranges times keep (the EF keeps 1 - alpha of itself).
__global__ void keep_ranges_kernel(StepArgs A) {
  for (int64_t ti = blockIdx.y; ti < A.ntensors; ti += gridDim.y) {
    const int64_t* t = A.table + ti * REC;
    if (t[F_GO] != 0 && !*reinterpret_cast<const bool*>(t[F_GO])) continue;
    const int64_t nq = (t[F_N] + A.quant_block - 1) / A.quant_block;
    float* mn = reinterpret_cast<float*>(t[F_EF_MIN]);
    float* mx = reinterpret_cast<float*>(t[F_EF_MAX]);
    for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < nq; q += (int64_t)gridDim.x * blockDim.x) {
      mn[q] = __fmul_rn(mn[q], A.keep);
      mx[q] = __fmul_rn(mx[q], A.keep);
    }
  }
}
#endif  // !MICROADAM_PASS1_WIDE

// The lean instance of pass 1 a launch can take (0: none): the fast top-k, the staged window,
// the bitmask moments, every tensor one pass (except instance 2, which keeps the per-tensor
// test: it also takes launches with second-pass tensors); 1 when its quant blocks (8..256, a power of two) are fused with
// shuffles; 3 when the quant block is the top-k block (MICROADAM_LEAN & 8); plus 4 for the twin
// with the dense sweep (weight decay) when MICROADAM_LEAN & 4.
int lean_kind(const StepArgs& A) {
  const int Q = A.quant_block;
  const bool lean = A.win_smem && (!A.dense || (MICROADAM_LEAN & 4)) &&
                    A.topk_block <= ACC_DOUBLE_MAX && A.m <= MASK_MAX_M;
  if (!lean) return 0;
  const int sweep = A.dense ? 4 : 0;
  if (A.ntensors2 > 0) return (MICROADAM_LEAN & 2) ? 2 | sweep : 0;
  if ((MICROADAM_LEAN & 1) && Q >= 8 && Q <= 256 && (Q & (Q - 1)) == 0) return 1 | sweep;
  if ((MICROADAM_LEAN & 8) && Q == A.topk_block) return 3 | sweep;
  return (MICROADAM_LEAN & 2) ? 2 | sweep : 0;
}

template <typename P, typename G, int LEAN>
cudaError_t launch_pass1(const StepArgs& A, cudaStream_t s) {
  const int64_t smem = pass1_smem_bytes(A.topk_block, A.m, A.k_block);
  auto kernel = compress_update_kernel<P, G, LEAN>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  // All of L1 that can be shared memory: MICROADAM_MIN_BLOCKS blocks of ~43 KB (topk_block 4096) per SM.
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                       (int)cudaSharedmemCarveoutMaxShared);
  if (e != cudaSuccess) return e;
  const int64_t grid = A.total_blocks < INT_MAX ? A.total_blocks : INT_MAX;
  kernel<<<(unsigned)grid, THREADS, (size_t)smem, s>>>(A);
  return cudaGetLastError();
}

#if !MICROADAM_PASS1_WIDE
template <typename G>
cudaError_t launch_pass2(const StepArgs& A, cudaStream_t s) {
  const int64_t grid = A.total_chunks2 < INT_MAX ? A.total_chunks2 : INT_MAX;
  requant_kernel<G><<<(unsigned)grid, THREADS, 0, s>>>(A);
  return cudaGetLastError();
}
#endif

// Whether this build has lean instance K (MICROADAM_LEAN: bit 0 for instance 1, bit 1 for 2, bit 3
// for 3, and bit 2 for the weight-decay twin K + 4 of each).
template <int K>
constexpr bool lean_built() {
  const int own = (K & 3) == 3 ? 8 : (K & 3);
  return (MICROADAM_LEAN & own) != 0 && ((K & 4) == 0 || (MICROADAM_LEAN & 4) != 0);
}

// Launches lean instance K when `kind` names it and the build has it (e: its launch's error).
template <typename P, typename G, int K>
bool launch_lean(int kind, const StepArgs& A, cudaStream_t s, cudaError_t& e) {
  if constexpr (lean_built<K>()) {
    if (kind == K) {
      e = launch_pass1<P, G, K>(A, s);
      return true;
    }
  }
  return false;
}

// Lean instances only for the dtype pairs in use (params and grads alike, or fp32 master
// params): each instance adds to the build time.
template <typename P, typename G>
cudaError_t dispatch_lean(const StepArgs& A, cudaStream_t s) {
  if constexpr (std::is_same<P, G>::value || std::is_same<P, float>::value) {
    const int kind = lean_kind(A);
    cudaError_t e = cudaSuccess;
    if (launch_lean<P, G, 1>(kind, A, s, e) || launch_lean<P, G, 5>(kind, A, s, e) ||
        launch_lean<P, G, 2>(kind, A, s, e) || launch_lean<P, G, 6>(kind, A, s, e) ||
        launch_lean<P, G, 3>(kind, A, s, e) || launch_lean<P, G, 7>(kind, A, s, e))
      return e;
  }
  return launch_pass1<P, G, 0>(A, s);
}

template <typename P>
cudaError_t dispatch_grad(const StepArgs& A, cudaStream_t s) {
  switch (A.grad_dtype) {
    case DT_F32: return dispatch_lean<P, float>(A, s);
    case DT_BF16: return dispatch_lean<P, __nv_bfloat16>(A, s);
    case DT_F16: return dispatch_lean<P, __half>(A, s);
  }
  return cudaErrorInvalidValue;
}

// Pass 1 for every dtype pair, by this translation unit's instances.
cudaError_t launch_pass1_any(const StepArgs& A, cudaStream_t s) {
  switch (A.param_dtype) {
    case DT_F32: return dispatch_grad<float>(A, s);
    case DT_BF16: return dispatch_grad<__nv_bfloat16>(A, s);
    case DT_F16: return dispatch_grad<__half>(A, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// Pass 1 of top-k blocks from MICROADAM_WIDE_FROM elements up: these instances, built with
// MICROADAM_WIDE_THREADS threads a block by microadam_kernels_wide.cu.
cudaError_t launch_pass1_wide(const StepArgs& A, cudaStream_t s);

#if MICROADAM_PASS1_WIDE
cudaError_t launch_pass1_wide(const StepArgs& A, cudaStream_t s) { return launch_pass1_any(A, s); }
#else
bool window_in_smem(int m, int k_block) { return (int64_t)m * k_block * 4 <= WIN_SMEM_CAP; }

int64_t pass1_smem_bytes(int topk_block, int m, int k_block) {
  const int64_t win = window_in_smem(m, k_block) ? ((int64_t)m * k_block * 4 + 15) / 16 * 16 : 0;
  const int64_t S = (topk_block + 15) & ~15;
  return (topk_block <= ACC_DOUBLE_MAX ? 2 * S : S) * 4 + HIST_BINS * 4 + win;
}

bool one_pass(int64_t n, int topk_block, int quant_block) {
  const int64_t nb = (n + topk_block - 1) / topk_block;
  const int64_t span = n < topk_block ? n : topk_block;
  const int64_t nql = (span + quant_block - 1) / quant_block;
  if (nql > MAXQ_SHARED) return false;
  return nb <= 1 || (topk_block % 2 == 0 && topk_block % quant_block == 0);
}

int launch_step(const StepArgs& args, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  StepArgs A = args;
  A.win_smem = window_in_smem(A.m, A.k_block) ? 1 : 0;
  cudaError_t e = cudaSuccess;
  if (A.ntensors2 > 0) {
    const int64_t blocks = (A.ws_half + THREADS - 1) / THREADS;
    fill_ws_kernel<<<(unsigned)(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096), THREADS, 0, s>>>(A.ws, A.ws_half);
    if ((e = cudaGetLastError()) != cudaSuccess) return (int)e;
  }
  if (A.ntensors > 0 && A.total_blocks > 0) {
    e = A.topk_block >= MICROADAM_WIDE_FROM ? launch_pass1_wide(A, s) : launch_pass1_any(A, s);
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
  if (A.feedback && A.ntensors > 0 && A.total_blocks > 0) {
    const unsigned grid = (unsigned)(A.total_blocks < INT_MAX ? A.total_blocks : INT_MAX);
    switch (A.param_dtype) {
      case DT_F32: feedback_kernel<float><<<grid, THREADS, 0, s>>>(A); break;
      case DT_BF16: feedback_kernel<__nv_bfloat16><<<grid, THREADS, 0, s>>>(A); break;
      case DT_F16: feedback_kernel<__half><<<grid, THREADS, 0, s>>>(A); break;
      default: return (int)cudaErrorInvalidValue;
    }
    if ((e = cudaGetLastError()) != cudaSuccess) return (int)e;
    keep_ranges_kernel<<<dim3(64, (unsigned)(A.ntensors < 65535 ? A.ntensors : 65535)), THREADS, 0, s>>>(A);
    if ((e = cudaGetLastError()) != cudaSuccess) return (int)e;
  }
  return 0;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
#endif  // MICROADAM_PASS1_WIDE

}  // namespace microadam
