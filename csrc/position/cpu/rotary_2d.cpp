// CPU kernel of rotary_2d (ChatGLM-style 2D rotary) and of its inverse, which is its gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "position/position_ops.h"

namespace glm_ext {
namespace {

// direction = +1 rotates (forward), -1 rotates back (backward).
at::Tensor rotate_2d_cpu(const at::Tensor& x, const at::Tensor& position_ids,
                         const at::Tensor& block_position_ids, double base, int direction,
                         const char* x_name) {
  const auto args = check_rotary_2d_inputs(x, position_ids, block_position_ids, base, x_name);
  auto out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;  // no tokens or no heads (the grain below divides by heads)
  const int64_t tokens = args.batch * args.seq;
  const int64_t heads = args.heads, head_dim = args.head_dim;
  const int64_t rot_dim = head_dim / 2, pairs = head_dim / 4;
  const int64_t* pos = args.position_ids.data_ptr<int64_t>();
  const int64_t* block = args.block_position_ids.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_2d_cpu", [&] {
    // Angles in float32 (float64 for float64 input), like the reference.
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> inv_freq(pairs);
    for (int64_t j = 0; j < pairs; ++j) inv_freq[j] = rotary_inv_freq<acc_t>(j, rot_dim, acc_t(base));
    const scalar_t* in = args.x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / (heads * head_dim));
    at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
      // cos/sin of both halves of one token: [half][pair], reused for every head.
      std::vector<acc_t> cos_table(2 * pairs), sin_table(2 * pairs);
      for (int64_t t = begin; t < end; ++t) {
        const acc_t ids[2] = {static_cast<acc_t>(pos[t]), static_cast<acc_t>(block[t])};
        for (int half = 0; half < 2; ++half) {
          for (int64_t j = 0; j < pairs; ++j) {
            const acc_t angle = ids[half] * inv_freq[j];
            cos_table[half * pairs + j] = std::cos(angle);
            sin_table[half * pairs + j] = direction * std::sin(angle);
          }
        }
        const int64_t b = t / args.seq, s = t % args.seq;
        const scalar_t* x_tok = in + args.x_strides.offset(b, s, 0);
        scalar_t* o_tok = o + t * heads * head_dim;
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* xh = x_tok + h * args.x_strides.head;
          scalar_t* oh = o_tok + h * head_dim;
          for (int half = 0; half < 2; ++half) {
            const int64_t off = half * rot_dim;
            const acc_t* c = cos_table.data() + half * pairs;
            const acc_t* sn = sin_table.data() + half * pairs;
            for (int64_t j = 0; j < pairs; ++j) {
              const acc_t a = static_cast<acc_t>(xh[off + j]);
              const acc_t bb = static_cast<acc_t>(xh[off + j + pairs]);
              oh[off + j] = static_cast<scalar_t>(a * c[j] - bb * sn[j]);
              oh[off + j + pairs] = static_cast<scalar_t>(bb * c[j] + a * sn[j]);
            }
          }
        }
      }
    });
  });
  return out;
}

at::Tensor rotary_2d_cpu(const at::Tensor& x, const at::Tensor& position_ids,
                         const at::Tensor& block_position_ids, double base) {
  return rotate_2d_cpu(x, position_ids, block_position_ids, base, +1, "x");
}

at::Tensor rotary_2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& position_ids,
                                  const at::Tensor& block_position_ids, double base) {
  return rotate_2d_cpu(grad_output, position_ids, block_position_ids, base, -1, "grad_output");
}

}  // namespace

TORCH_LIBRARY_IMPL(glm_ext, CPU, m) {
  m.impl("rotary_2d", &rotary_2d_cpu);
  m.impl("rotary_2d_backward", &rotary_2d_backward_cpu);
}

}  // namespace glm_ext
