// Thin torch binding of the MicroAdam kernels: checks the launch table's tensors and
// enqueues the step on the current CUDA stream. No policy lives here (see
// microadam_dist/ops/cuda.py for how the table is built).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "microadam.cuh"

namespace {

void check_device_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                         const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "microadam: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, "microadam: ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "microadam: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "microadam: ", name, " must be contiguous");
}

void step(const at::Tensor& table, int64_t ntensors, int64_t total_blocks, const at::Tensor& table2,
          int64_t ntensors2, int64_t total_chunks2, const at::Tensor& betapow, const at::Tensor& ws,
          int64_t topk_block, int64_t k_block, int64_t quant_block, int64_t m, double lr,
          double decay, bool has_decay, double eps, bool stochastic, bool dense,
          int64_t param_dtype, int64_t grad_dtype, double alpha) {
  const at::Device device = table.device();
  check_device_tensor(table, "table", at::kLong, device);
  check_device_tensor(table2, "table2", at::kLong, device);
  check_device_tensor(betapow, "betapow", at::kFloat, device);
  check_device_tensor(ws, "workspace", at::kFloat, device);
  TORCH_CHECK(table.numel() >= ntensors * microadam::REC, "microadam: table holds ", table.numel(),
              " fields, fewer than ", ntensors, " records");
  TORCH_CHECK(table2.numel() >= ntensors2 * microadam::REC, "microadam: table2 too small");
  TORCH_CHECK(betapow.numel() >= 2 * m, "microadam: betapow needs 2*m floats");
  TORCH_CHECK(ws.numel() % 2 == 0, "microadam: workspace must hold an even number of floats");
  TORCH_CHECK(topk_block >= 1 && topk_block <= 32768, "microadam: topk_block out of range: ", topk_block);
  TORCH_CHECK(quant_block >= 1 && quant_block < (int64_t(1) << 31), "microadam: quant_block out of range");

  microadam::StepArgs a{};
  a.table = table.data_ptr<int64_t>();
  a.ntensors = static_cast<int>(ntensors);
  a.total_blocks = total_blocks;
  a.table2 = table2.data_ptr<int64_t>();
  a.ntensors2 = static_cast<int>(ntensors2);
  a.total_chunks2 = total_chunks2;
  a.betapow = betapow.data_ptr<float>();
  a.ws = ws.data_ptr<float>();
  a.ws_half = ws.numel() / 2;
  a.topk_block = static_cast<int>(topk_block);
  a.k_block = static_cast<int>(k_block);
  a.quant_block = static_cast<int>(quant_block);
  a.m = static_cast<int>(m);
  // Python floats are rounded to float32 here, as torch rounds a scalar operand of a
  // float32 tensor op in the reference.
  a.lr = static_cast<float>(lr);
  a.decay = static_cast<float>(decay);
  a.has_decay = has_decay ? 1 : 0;
  a.eps = static_cast<float>(eps);
  a.stochastic = stochastic ? 1 : 0;
  a.dense = dense ? 1 : 0;
  a.param_dtype = static_cast<int>(param_dtype);
  a.grad_dtype = static_cast<int>(grad_dtype);
  // Step 7 runs where the reference runs it (alpha != 0 as a Python float); 1 - alpha is
  // computed in double and rounded once, as the reference's scalar is.
  a.feedback = alpha != 0.0 ? 1 : 0;
  a.alpha = static_cast<float>(alpha);
  a.keep = static_cast<float>(1.0 - alpha);

  const c10::cuda::CUDAGuard guard(device);
  const int err = microadam::launch_step(a, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "microadam: kernel launch failed: ", microadam::error_string(err));
}

void nonfinite(const at::Tensor& table, int64_t ntensors, int64_t total_chunks, const at::Tensor& flags) {
  const at::Device device = flags.device();
  check_device_tensor(table, "table", at::kLong, device);
  check_device_tensor(flags, "flags", at::kBool, device);
  TORCH_CHECK(table.numel() >= ntensors * microadam::CHECK_REC, "microadam: check table holds ", table.numel(),
              " fields, fewer than ", ntensors, " records");
  TORCH_CHECK(flags.numel() == ntensors + 1, "microadam: flags must hold ntensors + 1 bytes");
  const c10::cuda::CUDAGuard guard(device);
  const int err = microadam::launch_nonfinite(table.data_ptr<int64_t>(), static_cast<int>(ntensors), total_chunks,
                                              reinterpret_cast<uint8_t*>(flags.data_ptr<bool>()),
                                              at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "microadam: check launch failed: ", microadam::error_string(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "Fused MicroAdam CUDA kernels (multi-tensor launch table)";
  mod.def("step", &step, "Enqueue one MicroAdam step for every tensor of a launch table");
  mod.def("nonfinite", &nonfinite, "Clear the flag of every gradient holding a NaN or an Inf, and the last flag");
  mod.def("one_pass", &microadam::one_pass, "Whether a tensor's EF is requantized in the top-k kernel");
  mod.def("pass1_smem_bytes", &microadam::pass1_smem_bytes, "Dynamic shared memory of the top-k kernel");
  mod.attr("REC") = static_cast<int>(microadam::REC);
  mod.attr("CHUNK2") = microadam::CHUNK2;
  mod.attr("CHECK_CHUNK") = microadam::CHECK_CHUNK;
}
