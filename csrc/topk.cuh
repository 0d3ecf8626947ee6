// Block-wide top-k by magnitude over a[0..L) in shared memory, ties to the lower index.
//
// Keys are |a| as IEEE bit patterns (monotone for non-negative floats).
// Fast path (topk_cand): the keys above the highest of four rungs of the block's largest
// key that holds at least k of them are listed in index order, and one histogram spanning
// [rung, largest key] over that list, then a ranking of one bin's members, finds the k-th
// largest. General path (no rung fits, or blocks over 8192): one
// radix pass over the top 11 bits of every key finds the bin of the k-th largest; its
// members are ranked directly, or, if the bin is crowded (many exact ties), two more
// radix passes resolve the key.
#pragma once

#include "common.cuh"

namespace microadam {

constexpr int HIST_BINS = 2048;       // first radix digit: bits 20..30
constexpr int CAND_CAP = HIST_BINS / 2;  // general path: bin members ranked directly (more: two radix passes)

__device__ __forceinline__ unsigned mag_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// The bin of a counted histogram that holds the need-th largest key: (bin, count of keys in
// higher bins, the bin's own count). Thread t owns `per` bins, thread 0 the highest, so an
// exclusive scan in thread order counts the keys above. All threads call it; need must not
// exceed the histogram's total.
__device__ inline uint3 hist_select(const unsigned* hist, int nbins, unsigned need, unsigned* sw,
                                    unsigned* bcast) {
  const int per = nbins / THREADS;
  const int top = nbins - 1 - threadIdx.x * per;
  unsigned local = 0;
  for (int j = 0; j < per; ++j) local += hist[top - j];
  const unsigned above = block_excl_scan(local, sw);
  if (above < need && above + local >= need) {
    unsigned acc = above;
    for (int j = 0; j < per; ++j) {
      const unsigned h = hist[top - j];
      if (acc + h >= need) { bcast[0] = (unsigned)(top - j); bcast[1] = acc; bcast[2] = h; break; }
      acc += h;
    }
  }
  __syncthreads();
  const uint3 r = make_uint3(bcast[0], bcast[1], bcast[2]);
  __syncthreads();
  return r;
}

// One radix pass over the keys of a[0..L) matching (prefix, pmask): the bin holding the
// need-th largest and the count of keys in higher bins. All threads call it.
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
  const uint3 r = hist_select(hist, nbins, need, sw, bcast);
  return make_uint2(r.x, r.y);
}

// Among keys[0..n) (shared), the need-th largest key T and how many keys equal to T are
// kept (need minus those above T), written to bcast[0..1]; read them after the barrier at
// the end. All threads call it; O(n^2 / THREADS) compares, for the few members of one bin.
__device__ inline void kth_among(const unsigned* keys, unsigned n, unsigned need, unsigned* bcast) {
  for (unsigned t = threadIdx.x; t < n; t += THREADS) {
    const unsigned kt = keys[t];
    unsigned g = 0, eq = 0;
    for (unsigned j = 0; j < n; ++j) { g += keys[j] > kt; eq += keys[j] == kt; }
    if (g < need && g + eq >= need) { bcast[0] = kt; bcast[1] = need - g; }  // equal values from every tie
  }
  __syncthreads();
}

// A kept entry: its index and bf16 value to window slot pos (global, and the shared copy
// when sidx is set), then zeroed in a.
__device__ __forceinline__ void keep_entry(float* a, int i, float v, unsigned pos, int16_t* widx,
                                           __nv_bfloat16* wval, int16_t* sidx, __nv_bfloat16* sval) {
  const __nv_bfloat16 bv = __float2bfloat16_rn(v);
  widx[pos] = (int16_t)i;
  wval[pos] = bv;
  if (sidx) { sidx[pos] = (int16_t)i; sval[pos] = bv; }
  a[i] = 0.0f;
}

// Returns (T, take_eq): the k-th largest key, and how many elements equal to T are kept
// (the lowest-indexed ones). `hist` holds HIST_BINS unsigned; with counted == true it was
// already counted with the top 11 bits of every key (hist_bin0). bcast holds 4 unsigned.
__device__ __forceinline__ unsigned hist_bin0(unsigned key) { return key >> 20; }

__device__ inline uint2 topk_threshold(const float* a, int L, int k, unsigned* hist, unsigned* sw,
                                       unsigned* bcast, bool counted) {
  const uint2 p0 = radix_pass(a, L, 0u, 0u, 20, HIST_BINS, (unsigned)k, hist, sw, bcast, counted);
  const unsigned bin = p0.x;
  const unsigned need = (unsigned)k - p0.y;  // >= 1 of the bin's members are kept
  // Gather the bin's member keys into the histogram's memory and rank them.
  unsigned* ckey = hist;
  if (threadIdx.x == 0) bcast[2] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < L; i += THREADS) {
    const unsigned key = mag_key(a[i]);
    if ((key >> 20) == bin) {
      const unsigned slot = atomicAdd(&bcast[2], 1u);
      if (slot < CAND_CAP) ckey[slot] = key;
    }
  }
  __syncthreads();
  const unsigned nc = bcast[2];
  if (nc <= CAND_CAP) {
    kth_among(ckey, nc, need, bcast);
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
    if (gt || (eq && my_eq < take_eq)) keep_entry(a, i, v, my_gt + min(my_eq, take_eq), widx, wval, sidx, sval);
    gt_before += __popc(mgt);
    eq_before += __popc(meq);
  }
  __syncthreads();
}

}  // namespace microadam

namespace microadam {

// Most blocks take this path. Candidates are the keys >= amax * r for the largest of four
// rungs r whose count reaches k (amax: the block's largest |a|, from the caller); they are
// listed in index order in ckey/cidx (cap entries), the k-th largest key among them is
// found from the list alone (step 4), and the k best are written ascending, then zeroed in
// a. Returns false, having written nothing, when no rung fits: fewer than k keys above the
// lowest rung (heavy tails), more than cap above the chosen one, or more than HIST_BINS
// candidates in one bin of step 4; the caller then runs the general path, which gives the
// same result.
// Units of 8 elements: unit u = h * THREADS + tid in round h; gcnt holds 32 unsigned
// (rounds * NWARPS <= 32, so L <= 8192), wcount 2 * NWARPS; hist HIST_BINS >= L / 8.
// RANGE: also fold the smallest and the largest value of the candidates not kept into
// *rmin and *rmax (shared, by atomics; the caller initializes them). Every element not
// listed is smaller in magnitude than every candidate, so when the candidates not kept hold
// both signs these are the block's minimum and maximum after the kept ones are zeroed.
template <bool RANGE = false>
__device__ inline bool topk_cand(float* a, int L, int k, float amax, unsigned* hist, unsigned* ckey,
                                 unsigned* cidx, int cap, int16_t* widx, __nv_bfloat16* wval,
                                 int16_t* sidx, __nv_bfloat16* sval, unsigned* sw, unsigned* gcnt,
                                 unsigned* wcount, unsigned* bcast, float* rmin = nullptr,
                                 float* rmax = nullptr) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nunits = (L + 7) / 8;
  const int rounds = (nunits + THREADS - 1) / THREADS;
  // 1. Per unit, 8 flags per rung (rung i in bits 8i..8i+7), kept in hist (free until
  // step 4); counts per rung, two 16-bit counts a word (L <= 8192).
  // Rungs of at least 1: a zero key (and the zeros padding a partial unit) is never a candidate;
  // when fewer than k keys are nonzero no rung fits and the general path decides.
  const unsigned kr0 = max(mag_key(amax * 0.75f), 1u), kr1 = max(mag_key(amax * 0.55f), 1u),
                 kr2 = max(mag_key(amax * 0.4f), 1u), kr3 = max(mag_key(amax * 0.28f), 1u);
  unsigned n01 = 0u, n23 = 0u;
  for (int h = 0; h < rounds; ++h) {
    const int u = h * THREADS + threadIdx.x;
    const int valid = min(8, L - 8 * u);
    unsigned f = 0u;
    if (valid > 0) {
      float v[8];
      load_unit_smem(a + 8 * u, v, valid);
#pragma unroll
      for (int j = 0; j < 8; ++j) {  // v[j] == 0 past valid
        const unsigned key = mag_key(v[j]);
        f |= ((key >= kr0) << j) | ((key >= kr1) << (8 + j)) | ((key >= kr2) << (16 + j)) | ((key >= kr3) << (24 + j));
      }
      hist[u] = f;
    }
    n01 += __popc(f & 0xffu) | (__popc(f & 0xff00u) << 16);
    n23 += __popc(f & 0xff0000u) | (__popc(f & 0xff000000u) << 16);
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    n01 += __shfl_xor_sync(FULL, n01, o);
    n23 += __shfl_xor_sync(FULL, n23, o);
  }
  if (lane == 0) { wcount[warp] = n01; wcount[NWARPS + warp] = n23; }
  __syncthreads();
  n01 = n23 = 0u;
  for (int w = 0; w < NWARPS; ++w) { n01 += wcount[w]; n23 += wcount[NWARPS + w]; }
  // The highest rung with k keys (counts grow down the rungs).
  const unsigned uk = (unsigned)k, n0 = n01 & 0xffffu, n1 = n01 >> 16, n2 = n23 & 0xffffu, n3 = n23 >> 16;
  const int rung = n0 >= uk ? 0 : n1 >= uk ? 1 : n2 >= uk ? 2 : n3 >= uk ? 3 : 4;
  const unsigned total = rung == 0 ? n0 : rung == 1 ? n1 : rung == 2 ? n2 : n3;
  if (rung == 4 || total > (unsigned)cap) return false;  // uniform: every thread sees the same
  // 2. The rung's flags of each unit and the count in earlier lanes of the warp (bits 8..).
  for (int h = 0; h < rounds; ++h) {
    const int u = h * THREADS + threadIdx.x;
    const unsigned f = u < nunits ? (hist[u] >> (8 * rung)) & 255u : 0u;
    const unsigned c = __popc(f);
    unsigned incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned y = __shfl_up_sync(FULL, incl, o);
      if (lane >= o) incl += y;
    }
    if (u < nunits) hist[u] = ((incl - c) << 8) | f;
    if (lane == 31) gcnt[h * NWARPS + warp] = incl;
  }
  __syncthreads();
  // 3. List the candidates in index order (group g = h * NWARPS + warp covers units in order);
  // lane g of every warp holds the candidates of the groups before g (a scan of gcnt).
  unsigned gbefore = lane < rounds * NWARPS ? gcnt[lane] : 0u;
  {
    const unsigned own = gbefore;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned y = __shfl_up_sync(FULL, gbefore, o);
      if (lane >= o) gbefore += y;
    }
    gbefore -= own;
  }
  for (int h = 0; h < rounds; ++h) {
    const int u = h * THREADS + threadIdx.x;
    const unsigned fb = u < nunits ? hist[u] : 0u;  // hist[u] past the units is stale
    const unsigned before = __shfl_sync(FULL, gbefore, h * NWARPS + warp);
    if (!(fb & 255u)) continue;
    unsigned pos = (fb >> 8) + before;
    const int i0 = 8 * u;
    for (unsigned f = fb & 255u; f; f &= f - 1) {
      const int i = i0 + __ffs(f) - 1;
      ckey[pos] = mag_key(a[i]);
      cidx[pos] = (unsigned)i;
      ++pos;
    }
  }
  __syncthreads();
  // 4. The k-th largest key T and how many keys equal to T are kept (take_eq). Every
  // candidate lies in [lo_key, the block's largest key]: one histogram of 2048 bins spanning
  // that range (bin = (key - lo_key) >> sh) gives the bin of the k-th largest, which holds a
  // few of the ~200 candidates; its members are then ranked directly. A bin kept whole ends
  // the search at once (T = its lowest key - 1, none equal). A bin of more than HIST_BINS
  // members (exact ties) returns false, nothing written yet: the general path takes over.
  unsigned T, take_eq;
  {
    const unsigned lo_key = rung == 0 ? kr0 : rung == 1 ? kr1 : rung == 2 ? kr2 : kr3;
    const unsigned range = mag_key(amax) - lo_key;
    const int sh = range < (unsigned)HIST_BINS ? 0 : 32 - __clz(range) - 11;  // (range >> sh) < 2048
    for (int b = threadIdx.x; b < HIST_BINS; b += THREADS) hist[b] = 0u;
    if (threadIdx.x == 0) bcast[3] = 0u;
    __syncthreads();
    for (unsigned e = threadIdx.x; e < total; e += THREADS) atomicAdd(&hist[(ckey[e] - lo_key) >> sh], 1u);
    __syncthreads();
    const uint3 r = hist_select(hist, HIST_BINS, (unsigned)k, sw, bcast);
    const unsigned blo = lo_key + (r.x << sh), left = (unsigned)k - r.y;
    if (sh == 0) {
      T = blo; take_eq = left;
    } else if (r.z == left && blo > 0u) {
      T = blo - 1u; take_eq = 0u;
    } else {
      unsigned* mk = hist;  // the bin's member keys (hist_select read hist before its last barrier)
      for (unsigned e = threadIdx.x; e < total; e += THREADS) {
        const unsigned key = ckey[e];
        if (((key - lo_key) >> sh) == r.x) {
          const unsigned slot = atomicAdd(&bcast[3], 1u);
          if (slot < (unsigned)HIST_BINS) mk[slot] = key;
        }
      }
      __syncthreads();
      const unsigned nm = bcast[3];
      if (nm > (unsigned)HIST_BINS) return false;  // uniform
      kth_among(mk, nm, left, bcast);
      T = bcast[0];
      take_eq = bcast[1];
    }
  }
  // 5. Write the kept candidates ascending: thread t walks a contiguous run of the list;
  // one scan of (greater, equal) counts, packed in 16 bits each (total <= cap <= 65535).
  const unsigned per = (total + THREADS - 1) / THREADS;
  const unsigned e0 = min(total, threadIdx.x * per), e1 = min(total, e0 + per);
  unsigned ngt = 0, neq = 0;
  for (unsigned e = e0; e < e1; ++e) {
    ngt += ckey[e] > T;
    neq += ckey[e] == T;
  }
  const unsigned packed = block_excl_scan(ngt | (neq << 16), sw);
  unsigned my_gt = packed & 0xffffu, my_eq = packed >> 16;
  float cmn = INFINITY, cmx = -INFINITY;
  for (unsigned e = e0; e < e1; ++e) {
    const unsigned key = ckey[e];
    const bool gt = key > T, eq = key == T;
    if (gt || (eq && my_eq < take_eq)) {
      const int i = (int)cidx[e];
      keep_entry(a, i, a[i], my_gt + min(my_eq, take_eq), widx, wval, sidx, sval);
    } else if (RANGE) {
      const float v = a[cidx[e]];
      cmn = fminf(cmn, v);
      cmx = fmaxf(cmx, v);
    }
    my_gt += gt;
    my_eq += eq;
  }
  if (RANGE) {
    cmn = warp_min(cmn);
    cmx = warp_max(cmx);
    if ((threadIdx.x & 31) == 0) {
      atomic_min_f(rmin, cmn);
      atomic_max_f(rmax, cmx);
    }
  }
  __syncthreads();
  return true;
}

}  // namespace microadam
