// What the host passes to the mixed-mask flash-attention kernels, and the per-sample view the
// kernels derive from it on the device (never reading sep or cu_seqlens on the host, so that a
// call needs no synchronisation and can be captured in a CUDA graph).
#pragma once

#include <cstdint>

#include "common/strides.h"

namespace glm_ext::cuda::flash {

struct ForwardParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // at lse_strides.offset(sample, token, head)
  TokenStrides q_strides, k_strides, v_strides, out_strides;
  TokenStrides lse_strides;  // also of delta and grad_lse
  const int32_t* sep = nullptr;           // [num_samples]
  const int32_t* cu_seqlens_q = nullptr;  // [num_samples + 1]; nullptr in the padded layout
  const int32_t* cu_seqlens_k = nullptr;
  int num_samples = 0;
  int64_t seq_q = 0, seq_k = 0;  // padded: the lengths; packed: the token totals
  int heads_q = 0, heads_kv = 0;
  float softmax_scale = 1.f;
  float scale_log2 = 1.f;  // softmax_scale * log2(e): the kernels use exp2
};

struct BackwardParams : ForwardParams {
  const void* grad_out = nullptr;
  TokenStrides grad_out_strides;
  const float* grad_lse = nullptr;  // laid out like lse, or nullptr
  float* delta = nullptr;           // rowsum(grad_out * out) - grad_lse, laid out like lse
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  TokenStrides grad_q_strides, grad_k_strides, grad_v_strides;
};

// One GLM sample as a kernel sees it: its batch index (padded) or token offsets (packed), its
// lengths and sep.
struct Sample {
  int64_t batch, q_start, k_start;
  int len_q, len_k, sep;

  // Query i sits at position len_k - len_q + i and sees the keys [0, visible_keys(i)).
  __host__ __device__ int visible_keys(int i) const {
    const int position = len_k - len_q + i;
    const int seen = sep > position + 1 ? sep : position + 1;
    return seen < len_k ? seen : len_k;
  }
};

// Reads sample `s`; false when its values break the op's contract (sep outside [0, len_k],
// more queries than keys, cu_seqlens decreasing or beyond the token totals). A kernel skips such
// a sample and the host fills every output with NaN (see mixed_mask_attention.cu).
__host__ __device__ inline bool resolve_sample(const ForwardParams& p, int s, Sample& sample) {
  if (p.cu_seqlens_q == nullptr) {
    sample = {s, 0, 0, static_cast<int>(p.seq_q), static_cast<int>(p.seq_k), p.sep[s]};
  } else {
    const int64_t q0 = p.cu_seqlens_q[s], q1 = p.cu_seqlens_q[s + 1];
    const int64_t k0 = p.cu_seqlens_k[s], k1 = p.cu_seqlens_k[s + 1];
    if (q0 < 0 || q1 < q0 || q1 > p.seq_q || k0 < 0 || k1 < k0 || k1 > p.seq_k) return false;
    sample = {0, q0, k0, static_cast<int>(q1 - q0), static_cast<int>(k1 - k0), p.sep[s]};
  }
  return sample.len_q <= sample.len_k && sample.sep >= 0 && sample.sep <= sample.len_k;
}

// A block of kBlockM query rows of one head of one sample and the key tiles of kBlockN keys it
// walks (the forward and dQ kernels; blockIdx = (query block, query head, sample), the longest
// key walks first). resolve() is false when the block has nothing to do.
struct QueryBlock {
  Sample sample;
  int m0, rows, head, kv_head;
  int unmasked_end;  // keys every row of the block sees: tiles below it need no mask
  int num_tiles;     // key tiles up to the last key any row sees

  template <int kBlockM, int kBlockN>
  __device__ bool resolve(const ForwardParams& p) {
    if (!resolve_sample(p, blockIdx.z, sample)) return false;
    m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
    if (m0 >= sample.len_q) return false;
    rows = min(kBlockM, sample.len_q - m0);
    head = blockIdx.y;
    kv_head = head / (p.heads_q / p.heads_kv);
    unmasked_end = sample.visible_keys(m0);
    num_tiles = (sample.visible_keys(m0 + rows - 1) + kBlockN - 1) / kBlockN;
    return true;
  }
};

}  // namespace glm_ext::cuda::flash
