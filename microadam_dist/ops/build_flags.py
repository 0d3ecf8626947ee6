"""Sources and compiler flags of the CUDA extension, shared by setup.py (ahead of time)
and ops/builder.py (just in time). Imports nothing: setup.py reads it without torch."""

SOURCES = ("microadam_binding.cpp", "microadam_kernels.cu", "microadam_kernels_wide.cu", "nonfinite.cu")
HEADERS = ("microadam.cuh", "common.cuh", "topk.cuh")
# IEEE division and square root (no --use_fast_math): the kernels reproduce the reference's
# float32 results, which fast-math approximations would change.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]
