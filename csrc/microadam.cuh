// Launch-table interface between the torch binding and the MicroAdam kernels.
//
// The kernels know nothing of torch: the binding passes one StepArgs per
// (device, param dtype, grad dtype, block sizes) group. Each tensor of the group
// is one record of REC int64 fields in a device table; a launch covers every
// top-k block of every tensor in the table (multi-tensor), so a step costs a
// handful of launches however many tensors the model has.
#pragma once

#include <cstdint>

namespace microadam {

// Fields of one tensor's record in the launch table (int64 each).
enum Field : int {
  F_PARAM = 0,  // param data pointer (P*)
  F_GRAD,       // grad data pointer (G*)
  F_EF,         // uint8 EF codes, ceil(n/2)
  F_EF_MIN,     // float32 per quant block
  F_EF_MAX,     // float32 per quant block
  F_WIN_IDX,    // int16 (m, k_total)
  F_WIN_VAL,    // bf16 (m, k_total)
  F_N,          // elements
  F_K_TOTAL,    // window columns
  F_K_LAST,     // entries kept in the last top-k block
  F_START,      // first virtual block (pass 1: top-k blocks; pass 2: EF chunks) of this tensor
  F_STEP,       // 1-based step t after increment
  F_COEF,       // bit patterns of float32 c1 (low 32 bits) and c2 (high 32 bits)
  F_WS,         // offset (floats) of this tensor's quant-block stats in the workspace, -1: one pass
  F_GO,         // device pointer of the step's go flag (bool; 0: none): when it reads false the kernels
                //   write nothing (the step's gradient check failed, optim.py step())
  F_RESERVED1,
  REC = 16
};

enum DType : int { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

// Elements per virtual block of the second (EF requantization) pass (smaller chunks are
// slower: more blocks, each waiting on its record lookup); a multiple of 32, so that no EF
// byte straddles two chunks (and the bit flags of pass 2 fill whole words).
#ifndef MICROADAM_CHUNK2
#define MICROADAM_CHUNK2 32768
#endif
constexpr int CHUNK2 = MICROADAM_CHUNK2;
static_assert(CHUNK2 % 32 == 0, "CHUNK2: a multiple of 32");

struct StepArgs {
  const int64_t* table;   // device, ntensors * REC
  int ntensors;
  int64_t total_blocks;   // top-k blocks over all tensors of `table`
  const int64_t* table2;  // device: the tensors whose EF needs the second pass; F_START counts chunks
  int ntensors2;
  int64_t total_chunks2;
  const float* betapow;   // device, 2*m floats: beta1^age then beta2^age, age = 0..m-1
  float* ws;              // device, 2*ws_half floats: new minima, then new maxima (second pass only)
  int64_t ws_half;
  int topk_block, k_block, quant_block, m;
  float lr, decay, eps;   // decay = float32(1 - lr*wd), applied when has_decay
  int has_decay;
  int stochastic;         // EF rounding: 0 nearest, 1 stochastic
  int dense;              // 1: write every param (weight decay, or eps == 0); 0: only window positions
  int param_dtype, grad_dtype;
  int win_smem;           // set by launch_step: the block's window rows are staged in shared memory
  int feedback;           // alpha != 0: step 7 runs after the EF is final (docs/algorithm.md)
  float alpha, keep;      // keep = float32(1 - alpha): the EF ranges' scale after step 7
};

// Dynamic shared memory of the compress/update kernel, and whether the window rows of a
// top-k block (m * k_block entries) are staged in it.
int64_t pass1_smem_bytes(int topk_block, int m, int k_block);
bool window_in_smem(int m, int k_block);

// Whether a tensor of n elements can requantize its EF inside the top-k kernel (one pass):
// quant blocks nest in top-k blocks and no EF byte straddles two top-k blocks.
bool one_pass(int64_t n, int topk_block, int quant_block);

// Enqueues the step on `stream` (a cudaStream_t). Returns 0 or a cudaError_t code.
int launch_step(const StepArgs& args, void* stream);

// The gradient check (nonfinite.cu): a table of CHECK_REC int64 per tensor (data pointer,
// bytes, DType, first chunk of CHECK_CHUNK bytes); flags holds ntensors + 1 bytes, set to 1
// by the caller: a tensor's byte is cleared when it holds a NaN or an Inf, the last with any.
constexpr int CHECK_REC = 4;
constexpr int64_t CHECK_CHUNK = 1 << 17;
int launch_nonfinite(const int64_t* table, int ntensors, int64_t total_chunks, uint8_t* flags, void* stream);
const char* error_string(int code);

}  // namespace microadam
