// Block-wide top-k by magnitude over a[0..L) in shared memory, ties to the lower index.
//
// Keys are |a| as IEEE bit patterns (monotone for non-negative floats). One radix pass
// over the top 11 bits finds the bin of the k-th largest key; its few members are then
// ranked directly (for Gaussian-like data about 1% of the block). If the bin is crowded
// (many exact ties), two more radix passes resolve the key instead.
#pragma once

#include "common.cuh"

namespace microadam {

constexpr int HIST_BINS = 2048;       // first radix digit: bits 20..30
constexpr int CAND_CAP = HIST_BINS / 2;  // candidates (key, index) that fit in the histogram

__device__ __forceinline__ unsigned mag_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// One radix pass over the keys matching (prefix, pmask): the bin holding the need-th
// largest and the count of candidates in higher bins. All threads call it.
// With counted == true the histogram was already filled (pass 0 during the load of a).
__device__ inline uint2 radix_pass(const float* a, int L, unsigned prefix, unsigned pmask, int shift,
                                   int nbins, unsigned need, unsigned* hist, unsigned* sw, unsigned* bcast,
                                   bool counted = false) {
  if (!counted) {
    for (int b = threadIdx.x; b < nbins; b += THREADS) hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < L; i += THREADS) {
      const unsigned key = mag_key(a[i]);
      if ((key & pmask) == prefix) atomicAdd(&hist[(key >> shift) & (nbins - 1)], 1u);
    }
    __syncthreads();
  }
  // Thread t owns `per` bins, thread 0 the highest, so an exclusive scan in thread order
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
  const uint2 r = make_uint2(bcast[0], bcast[1]);
  __syncthreads();
  return r;
}

// Returns (T, take_eq): the k-th largest key, and how many elements equal to T are kept
// (the lowest-indexed ones). `hist` holds HIST_BINS unsigned, already counted with the
// top 11 bits of every key (hist_bin0); bcast holds 4 unsigned.
__device__ __forceinline__ unsigned hist_bin0(unsigned key) { return key >> 20; }

__device__ inline uint2 topk_threshold(const float* a, int L, int k, unsigned* hist, unsigned* sw,
                                       unsigned* bcast) {
  const uint2 p0 = radix_pass(a, L, 0u, 0u, 20, HIST_BINS, (unsigned)k, hist, sw, bcast, true);
  const unsigned bin = p0.x;
  const unsigned need = (unsigned)k - p0.y;  // >= 1 of the bin's members are kept
  // Gather the bin's members into the histogram's memory as (key, index) pairs.
  unsigned* ckey = hist;
  unsigned* cidx = hist + CAND_CAP;
  if (threadIdx.x == 0) bcast[2] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < L; i += THREADS) {
    const unsigned key = mag_key(a[i]);
    if ((key >> 20) == bin) {
      const unsigned slot = atomicAdd(&bcast[2], 1u);
      if (slot < CAND_CAP) { ckey[slot] = key; cidx[slot] = (unsigned)i; }
    }
  }
  __syncthreads();
  const unsigned nc = bcast[2];
  if (nc <= CAND_CAP) {
    // Rank every member by (key descending, index ascending); the member ranked need-1 is T.
    for (unsigned t = threadIdx.x; t < nc; t += THREADS) {
      const unsigned kt = ckey[t], it = cidx[t];
      unsigned rank = 0, greater = 0;
      for (unsigned j = 0; j < nc; ++j) {
        const unsigned kj = ckey[j];
        greater += kj > kt;
        rank += kj > kt || (kj == kt && cidx[j] < it);
      }
      if (rank == need - 1) { bcast[0] = kt; bcast[1] = need - greater; }
    }
    __syncthreads();
    const uint2 r = make_uint2(bcast[0], bcast[1]);
    __syncthreads();
    return r;
  }
  // Crowded bin (exact ties): resolve the remaining 20 bits by two more radix passes.
  __syncthreads();
  unsigned prefix = bin << 20, pmask = 0x7ff00000u, left = need;
  const uint2 p1 = radix_pass(a, L, prefix, pmask, 10, 1024, left, hist, sw, bcast);
  prefix |= p1.x << 10; pmask |= 0x3ffu << 10; left -= p1.y;
  const uint2 p2 = radix_pass(a, L, prefix, pmask, 0, 1024, left, hist, sw, bcast);
  prefix |= p2.x; left -= p2.y;
  return make_uint2(prefix, left);
}

// Writes the selected entries of a[0..L) (key > T, or == T among the first take_eq) in
// index order to widx/wval (global) and to the shared copies sidx/sval (may be null),
// then zeroes them in a. Warp w scans a contiguous chunk: ballots rank within it.
__device__ inline void topk_write(float* a, int L, unsigned T, unsigned take_eq, int16_t* widx,
                                  __nv_bfloat16* wval, int16_t* sidx, __nv_bfloat16* sval,
                                  unsigned* wcount) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int CW = (((L + NWARPS - 1) / NWARPS) + 31) & ~31;
  const int w0 = warp * CW, w1 = min(L, w0 + CW);
  unsigned cgt = 0, ceq = 0;
  for (int s = w0; s < w1; s += 32) {
    const int i = s + lane;
    const unsigned key = i < w1 ? mag_key(a[i]) : 0u;
    cgt += __popc(__ballot_sync(FULL, i < w1 && key > T));
    ceq += __popc(__ballot_sync(FULL, i < w1 && key == T));
  }
  if (lane == 0) { wcount[warp] = cgt; wcount[NWARPS + warp] = ceq; }
  __syncthreads();
  unsigned gt_before = 0, eq_before = 0;
  for (int j = 0; j < warp; ++j) { gt_before += wcount[j]; eq_before += wcount[NWARPS + j]; }
  const unsigned lt = (1u << lane) - 1u;
  for (int s = w0; s < w1; s += 32) {
    const int i = s + lane;
    const float v = i < w1 ? a[i] : 0.0f;
    const unsigned key = mag_key(v);
    const bool gt = i < w1 && key > T, eq = i < w1 && key == T;
    const unsigned mgt = __ballot_sync(FULL, gt), meq = __ballot_sync(FULL, eq);
    const unsigned my_gt = gt_before + __popc(mgt & lt), my_eq = eq_before + __popc(meq & lt);
    if (gt || (eq && my_eq < take_eq)) {
      const unsigned pos = my_gt + min(my_eq, take_eq);
      const __nv_bfloat16 bv = __float2bfloat16_rn(v);
      widx[pos] = (int16_t)i;
      wval[pos] = bv;
      if (sidx) { sidx[pos] = (int16_t)i; sval[pos] = bv; }
      a[i] = 0.0f;
    }
    gt_before += __popc(mgt);
    eq_before += __popc(meq);
  }
  __syncthreads();
}

}  // namespace microadam

namespace microadam {

// Fast path of the whole top-k once the first radix pass has counted `hist`: gather every
// element whose top 11 bits reach the k-th largest's bin (a superset of the top k, about
// 2k elements for Gaussian-like data) into per-warp lists in index order, rank the bin's
// own members by (key descending, index ascending), and write the k best ascending. Returns false, having
// written nothing, when the lists overflow (many ties); the caller then runs the general path.
// `list` holds 2 * cap_w * NWARPS unsigned of scratch.
__device__ inline bool topk_fast(float* a, int L, int k, unsigned* hist, unsigned* list, int cap_w,
                                 int16_t* widx, __nv_bfloat16* wval, int16_t* sidx,
                                 __nv_bfloat16* sval, unsigned* sw, unsigned* wcount, unsigned* bcast) {
  const uint2 p0 = radix_pass(a, L, 0u, 0u, 20, HIST_BINS, (unsigned)k, hist, sw, bcast, true);
  const unsigned bin = p0.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned* lkey = list + warp * 2 * cap_w;
  unsigned* lidx = lkey + cap_w;
  const int CW = (((L + NWARPS - 1) / NWARPS) + 31) & ~31;
  const int w0 = warp * CW, w1 = min(L, w0 + CW);
  const unsigned lt = (1u << lane) - 1u;
  unsigned n = 0;
  for (int s = w0; s < w1; s += 32) {
    const int i = s + lane;
    const unsigned key = i < w1 ? mag_key(a[i]) : 0u;
    const bool match = i < w1 && hist_bin0(key) >= bin;
    const unsigned mb = __ballot_sync(FULL, match);
    if (match) {
      const unsigned slot = n + __popc(mb & lt);
      if (slot < (unsigned)cap_w) { lkey[slot] = key; lidx[slot] = (unsigned)i; }
    }
    n += __popc(mb);
  }
  if (lane == 0) wcount[warp] = n;
  __syncthreads();
  unsigned total = 0;
  bool overflow = false;
  for (int w = 0; w < NWARPS; ++w) {
    overflow |= wcount[w] > (unsigned)cap_w;
    total += wcount[w];
  }
  if (overflow || total > (unsigned)THREADS) {
    __syncthreads();
    return false;
  }
  // Thread t takes entry t of the concatenated lists (index order). Entries above the
  // k-th largest's bin are kept; the bin's own members (need of them are kept) are listed
  // apart, in the histogram's memory (free now), and ranked by (key desc, index asc).
  const unsigned need = (unsigned)k - p0.y;
  unsigned* ekey = hist;
  unsigned* eidx = hist + THREADS;
  unsigned* erank = hist + 2 * THREADS;
  if (threadIdx.x == 0) bcast[2] = 0u;
  __syncthreads();
  const unsigned t = threadIdx.x;
  unsigned kt = 0, it = 0, eslot = 0;
  bool in_bin = false;
  if (t < total) {
    unsigned off = t;
    int w = 0;
    while (off >= wcount[w]) { off -= wcount[w]; ++w; }
    kt = list[w * 2 * cap_w + off];
    it = list[w * 2 * cap_w + cap_w + off];
    in_bin = hist_bin0(kt) == bin;
    if (in_bin) {
      eslot = atomicAdd(&bcast[2], 1u);
      ekey[eslot] = kt;
      eidx[eslot] = it;
    }
  }
  __syncthreads();
  // One warp per bin member, its lanes over the other members: about neq^2 / THREADS
  // comparisons a thread, spread over every warp.
  const unsigned neq = bcast[2];
  for (unsigned e = warp; e < neq; e += NWARPS) {
    const unsigned ke = ekey[e], ie = eidx[e];
    unsigned c = 0;
    for (unsigned j = lane; j < neq; j += 32) c += ekey[j] > ke || (ekey[j] == ke && eidx[j] < ie);
#pragma unroll
    for (int o = 16; o; o >>= 1) c += __shfl_xor_sync(FULL, c, o);
    if (lane == 0) erank[e] = c;
  }
  __syncthreads();
  const bool sel = t < total && (!in_bin || erank[eslot] < need);
  const unsigned pos = block_excl_scan(sel ? 1u : 0u, sw);
  if (sel) {
    const __nv_bfloat16 bv = __float2bfloat16_rn(a[it]);
    widx[pos] = (int16_t)it;
    wval[pos] = bv;
    if (sidx) { sidx[pos] = (int16_t)it; sval[pos] = bv; }
    a[it] = 0.0f;
  }
  __syncthreads();
  return true;
}

}  // namespace microadam
