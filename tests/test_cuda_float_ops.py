"""The float operations of csrc/common.cuh that replace IEEE ones, over every float32 bit
pattern (GPU only; skipped without CUDA).

- `div15`, the EF scale's division by 15 without a division: equal to
  the IEEE quotient `__fdiv_rn(d, 15)` for all 2^32 inputs, and, for a fresh random sample,
  to float64 division rounded to float32 on the CPU (d / 15 is never a float32 midpoint:
  15 * (an odd multiple of half a float32 ulp) has more than 24 bits).
- `scale_inv` (rcp.approx.f32): the bound quant_unit and quant_code_fast rely on,
  at most one float32 step from the correctly rounded reciprocal `__frcp_rn` for every
  positive float whose reciprocal is finite, and +inf where that overflows.
"""

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CSRC = Path(__file__).resolve().parent.parent / "csrc"

SOURCE = r"""
#include <torch/extension.h>
#include <cmath>
#include "common.cuh"

// Grid-stride over bit patterns [lo, lo + count): those failing Check are counted in *bad,
// the lowest in *first (0xffffffff when none).
template <typename Check>
__global__ void check_kernel(unsigned long long lo, unsigned long long count, unsigned long long* bad,
                             unsigned* first) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < count;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    const unsigned bits = (unsigned)(lo + i);
    if (!Check()(bits)) { atomicAdd(bad, 1ull); atomicMin(first, bits); }
  }
}

// div15 equals the IEEE quotient (NaN == NaN).
struct Div15IsQuotient {
  __device__ bool operator()(unsigned bits) const {
    const float d = __uint_as_float(bits);
    const float want = __fdiv_rn(d, 15.0f), got = microadam::div15(d);
    return (want != want && got != got) || __float_as_uint(want) == __float_as_uint(got);
  }
};

// For a positive finite x: scale_inv(x) at most one float step from __frcp_rn(x), and +inf
// where that overflows.
struct RcpWithinOneStep {
  __device__ bool operator()(unsigned bits) const {
    const float x = __uint_as_float(bits);
    if (!(x > 0.0f) || x == INFINITY || x != x) return true;
    const unsigned want = __float_as_uint(__frcp_rn(x)), got = __float_as_uint(microadam::scale_inv(x));
    return want == 0x7f800000u ? got == want : (got + 1u >= want && got <= want + 1u);
  }
};

__global__ void apply_kernel(const float* d, float* out, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    out[i] = microadam::div15(d[i]);
}

// Runs a check kernel over bit patterns [0, total): {mismatches, lowest mismatching pattern}.
using CheckKernel = void (*)(unsigned long long, unsigned long long, unsigned long long*, unsigned*);
std::vector<int64_t> run_check(CheckKernel kernel, unsigned long long total) {
  auto bad = torch::zeros({1}, torch::dtype(torch::kInt64).device(torch::kCUDA));
  auto first = torch::full({1}, -1, torch::dtype(torch::kInt32).device(torch::kCUDA));
  const unsigned long long chunk = 1ull << 30;
  for (unsigned long long lo = 0; lo < total; lo += chunk)
    kernel<<<4096, 256>>>(lo, chunk, reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()),
                          reinterpret_cast<unsigned*>(first.data_ptr<int32_t>()));
  return {bad.item<int64_t>(), (int64_t)(uint32_t)first.item<int32_t>()};
}

std::vector<int64_t> check_div15() { return run_check(check_kernel<Div15IsQuotient>, 1ull << 32); }
std::vector<int64_t> check_rcp() { return run_check(check_kernel<RcpWithinOneStep>, 1ull << 31); }

torch::Tensor apply(torch::Tensor d) {
  auto out = torch::full_like(d, NAN);  // poisoned
  apply_kernel<<<1024, 256>>>(d.data_ptr<float>(), out.data_ptr<float>(), d.numel());
  return out;
}
"""


@pytest.fixture(scope="module")
def ext():
    from torch.utils.cpp_extension import load_inline
    decls = ("std::vector<int64_t> check_div15();\nstd::vector<int64_t> check_rcp();\n"
             "torch::Tensor apply(torch::Tensor d);")
    return load_inline(name="microadam_float_ops_check", cpp_sources=decls, cuda_sources=SOURCE,
                       functions=["check_div15", "check_rcp", "apply"], extra_include_paths=[str(CSRC)],
                       extra_cuda_cflags=["-O3", "-std=c++17"],
                       verbose=False)


def test_div15_is_the_ieee_quotient_for_every_float(ext):
    bad, first = ext.check_div15()
    assert bad == 0, f"{bad} bit patterns differ, the lowest 0x{first:08x}"


def test_div15_matches_float64_division_on_random_floats(ext, seed):
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2 ** 31 - 1, (1 << 20,), generator=gen, dtype=torch.int64)
    bits = bits[(bits & 0x7F800000) != 0x7F800000]  # finite, nonnegative (as max - min is)
    d = bits.to(torch.int32).view(torch.float32)
    want = (d.double() / 15.0).float()
    got = ext.apply(d.cuda()).cpu()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_scale_inv_is_within_one_step_of_the_reciprocal(ext):
    bad, first = ext.check_rcp()
    assert bad == 0, f"{bad} positive floats off by more than one step, the lowest 0x{first:08x}"
