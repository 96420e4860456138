// The CUDA kernels of rotary_2d (csrc/position/cuda/rotary_2d_kernel.cuh) and span_shuffle_batch
// (csrc/batching/cuda/span_shuffle_kernels.cuh), unchanged, run on the CPU through cuda_on_cpu.h,
// with the same argument checks, vector widths and grid geometry as their CUDA entry points. Each
// entry point takes the device shape it emulates (resident threads, grid cap), so that tests reach
// the head grouping and the grid-stride loops with small inputs. Built by test_flash_emulation.py.
#include "cuda_on_cpu.h"

#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "batching/batching.h"
#include "batching/cuda/span_shuffle_kernels.cuh"
#include "position/cuda/rotary_2d_kernel.cuh"

namespace glm_ext {
namespace {

// rotary_2d (backward: the inverse rotation, as rotary_2d_backward) on a device holding
// resident_threads threads, with at most max_blocks blocks.
at::Tensor rotary_2d(const at::Tensor& x, const at::Tensor& position_ids, const at::Tensor& block_position_ids,
                     double base, bool backward, int64_t resident_threads, int64_t max_blocks) {
  const Rotary2dArgs args =
      check_rotary_2d_inputs(x, position_ids, block_position_ids, base, backward ? "grad_output" : "x");
  // NaN first: an element the kernel should write and does not shows.
  at::Tensor out = at::full(x.sizes(), std::numeric_limits<float>::quiet_NaN(), x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_2d_emulated", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    cuda::rotary::with_vector_width<scalar_t>(cuda::rotary::vector_width<scalar_t>(args), [&]<int VEC>() {
      const auto g = cuda::rotary::geometry(args, VEC, resident_threads);
      const int64_t blocks =
          std::min(cuda::ceil_div(cuda::rotary::work_units(g, VEC), cuda::kThreadsPerBlock), max_blocks);
      ::emu::launch_grid(dim3(blocks), dim3(cuda::kThreadsPerBlock), cuda::rotary::rotary_2d_kernel<scalar_t, VEC>,
                         args.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                         args.position_ids.const_data_ptr<int64_t>(),
                         args.block_position_ids.const_data_ptr<int64_t>(), g, static_cast<acc_t>(base),
                         static_cast<acc_t>(backward ? -1.0 : 1.0));
    });
  });
  return out;
}

// The span-shuffle passes of span_shuffle.cu, on CPU tensors.
unsigned blocks_for(int64_t rows) {
  using cuda::span_shuffle_kernels::kRowsPerBlock;
  return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

void sample_rows_emulated(SpanShuffleBatch& batch) {
  const int64_t batch_size = batch.tokens.size(0);
  ::emu::launch_grid(dim3(blocks_for(batch_size)), dim3(cuda::span_shuffle_kernels::kRowsPerBlock),
                     cuda::span_shuffle_kernels::sample_rows_kernel, batch.tokens.const_data_ptr<int64_t>(),
                     batch.lengths.const_data_ptr<int32_t>(), batch_size, batch.tokens.size(1),
                     batch.workspace.size(1), batch.objective, batch.params, batch.workspace.data_ptr<int32_t>(),
                     batch.status.data_ptr<int32_t>(), batch.num_spans.data_ptr<int32_t>(),
                     batch.row_length.data_ptr<int32_t>());
}

void assemble_rows_emulated(const SpanShuffleBatch& batch, int64_t width, at::Tensor& tokens, at::Tensor& targets,
                            at::Tensor& loss_mask, at::Tensor& positions, at::Tensor& sep) {
  const int64_t batch_size = batch.tokens.size(0);
  ::emu::launch_grid(dim3(blocks_for(batch_size)), dim3(cuda::span_shuffle_kernels::kRowsPerBlock),
                     cuda::span_shuffle_kernels::assemble_rows_kernel, batch.tokens.const_data_ptr<int64_t>(),
                     batch.lengths.const_data_ptr<int32_t>(), batch_size, batch.tokens.size(1),
                     batch.workspace.size(1), batch.workspace.data_ptr<int32_t>(),
                     batch.num_spans.const_data_ptr<int32_t>(), batch.mask_token,
                     batch.objective == span_shuffle::kDocumentLevel, batch.params, width,
                     tokens.data_ptr<int64_t>(), targets.data_ptr<int64_t>(), loss_mask.data_ptr<int64_t>(),
                     positions.data_ptr<int64_t>(), sep.data_ptr<int32_t>());
}

SpanShuffleOutputs span_shuffle_batch(const at::Tensor& tokens, const std::optional<at::Tensor>& lengths,
                                      const at::Tensor& sentence_end_ids, int64_t seed,
                                      std::vector<double> objective_probs, double mask_ratio, double poisson_lambda,
                                      int64_t max_span_length, double min_document_ratio,
                                      std::vector<int64_t> special_ids, int64_t vocab_size, int64_t output_length,
                                      int64_t row_offset) {
  return run_span_shuffle_batch({&sample_rows_emulated, &assemble_rows_emulated}, tokens, lengths, sentence_end_ids,
                                seed, objective_probs, mask_ratio, poisson_lambda, max_span_length,
                                min_document_ratio, special_ids, vocab_size, output_length, row_offset);
}

}  // namespace
}  // namespace glm_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotary_2d", &glm_ext::rotary_2d, "rotary_2d (or its backward) through the emulated CUDA kernel");
  m.def("span_shuffle_batch", &glm_ext::span_shuffle_batch,
        "span_shuffle_batch through the emulated CUDA kernels (the op's arguments, on CPU tensors)");
}
