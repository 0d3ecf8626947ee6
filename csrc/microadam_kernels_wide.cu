// Pass 1 for large top-k blocks (topk_block >= MICROADAM_WIDE_FROM, 8192 by default).
//
// The same source as microadam_kernels.cu, built with more threads a block. A top-k block of
// 8192 takes ~77 KB of shared memory and one of 32768 ~150 KB, so only two or one CUDA block
// fits a SM: at 256 threads that is 16 or 8 resident warps, too few to hide the kernel's
// latencies; 512 threads a block double them. The default top-k block (4096, five blocks a
// SM) keeps 256 threads, where 512 would be slower.
#ifndef MICROADAM_WIDE_THREADS
#define MICROADAM_WIDE_THREADS 512
#endif
#ifndef MICROADAM_WIDE_MIN_BLOCKS
#define MICROADAM_WIDE_MIN_BLOCKS 2  // __launch_bounds__: 64 registers at 512 threads
#endif
#undef MICROADAM_THREADS
#define MICROADAM_THREADS MICROADAM_WIDE_THREADS
#undef MICROADAM_MIN_BLOCKS
#define MICROADAM_MIN_BLOCKS MICROADAM_WIDE_MIN_BLOCKS
#undef MICROADAM_PASS1_WIDE
#define MICROADAM_PASS1_WIDE 1
#include "microadam_kernels.cu"
