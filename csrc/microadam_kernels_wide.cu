// Pass 1 for large top-k blocks (topk_block >= MICROADAM_WIDE_FROM, 8192 by default).
//
// The same source as microadam_kernels.cu, built with more threads a block. A top-k block of
// 8192 takes ~77 KB of shared memory and one of 32768 ~150 KB, so only two or one CUDA block
// fits a SM: at 256 threads that is 16 or 8 resident warps, too few to hide the kernel's
// latencies. 512 threads a block double them (pass 1 on the benchmark's 1.88 B bf16 params,
// quant block 64: 19.3 -> 14.3 ms at topk_block 8192, 41.5 -> 24.3 ms at 32768;
// docs/performance.md, session 18). The default top-k block (4096, five blocks a SM) keeps
// 256 threads: at 512 it ran 12.7 -> 20.0 ms.
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
#ifdef MICROADAM_WIDE_LEAN  // (a variant: which lean instances this unit builds)
#undef MICROADAM_LEAN
#define MICROADAM_LEAN MICROADAM_WIDE_LEAN
#endif
#undef MICROADAM_PASS1_WIDE
#define MICROADAM_PASS1_WIDE 1
#include "microadam_kernels.cu"
