#pragma once
// Mask utilities (SPEC.md section 5): turn a trainable bias into the boolean mask the kernels
// take, and the block-level selector that goes from a per-key bias straight to a block selection
// (PlanOptions::block_mask) without ever building an Sq x Sk mask.
//
// Every function writes into caller-allocated bool outputs and reads its inputs through their
// strides (a stride-0, expanded view is read without being materialized). No intermediate
// (B, H, Sq, Sk) float tensor is built: scratch is O(Sk) per CPU thread, and a CUDA row works in
// shared memory.
// Arguments are validated before anything is written; a rejection throws fsa::Error naming the
// argument.
//
// Devices: every tensor of one call must be on one device (else ErrorKind::kDevice naming the
// argument). CPU tensors run on the calling thread and the CPU pool. CUDA tensors run as kernels
// on that device, queued on `stream` (a cudaStream_t; nullptr = the legacy default stream) and not
// waited for, with results bitwise identical to the CPU's; a build without CUDA rejects them with
// ErrorKind::kUnsupported.

#include <array>
#include <cstdint>
#include <optional>

#include "fsa/error.h"
#include "fsa/tensor.h"

namespace fsa {

// How a dynamic mask is derived from the (mask-filled) bias, per row along the key dim.
enum class MaskKind {
  kTopK,  // keep the window_size largest entries whose value is not the fill value
  kReLU,  // keep entries > 0
};

struct DynamicMaskArgs {
  // (Bb, Hb, Sqb, Skb) float16 / bfloat16 / float32 / float64, read only (the reference's
  // attention_bias, detached). Any strides.
  TensorView attn_bias;
  // Optional bool (Bm, Hm, Sqm, Skm), True = keep, broadcastable with attn_bias (every dim equal or
  // one of the two is 1). False entries take the value `min_value` before selection.
  std::optional<TensorView> attn_mask;
  MaskKind kind = MaskKind::kTopK;
  // kTopK: entries kept per row, >= 0. Larger than the row keeps every valid entry.
  int64_t window_size = 0;
  // The fill for masked entries (the reference's min_dtype), rounded to attn_bias's dtype as a
  // masked_fill would. kTopK never keeps an entry whose (filled) value equals it, so masked keys
  // are never selected even when fewer than window_size are valid.
  double min_value = -3.4028234663852886e38;
  // >= 1; > 1 applies block_smooth() to every output row along the key dim.
  int64_t block_size = 1;
  // bool, exactly the broadcast shape of attn_bias and attn_mask (dynamic_mask_shape()), written.
  TensorView out;
  void* stream = nullptr;  // cudaStream_t for CUDA tensors
};

// The output shape dynamic_mask() requires: the broadcast of attn_bias's and attn_mask's shapes.
std::array<int64_t, 4> dynamic_mask_shape(const TensorView& attn_bias,
                                          const std::optional<TensorView>& attn_mask);

// create_mask / topk_mask / relu_mask of the reference, fused: fill, select and smooth in one
// pass per output row.
void dynamic_mask(const DynamicMaskArgs& args);

// In place on a bool tensor of rank 1..4 whose last dim is the key dim: every run of block_size
// keys becomes all True iff strictly more than half of it is True, else all False; a trailing
// partial run uses its own length. block_size == 1 is a no-op; block_size <= 0 is rejected.
void block_smooth(const TensorView& mask, int64_t block_size, void* stream = nullptr);

// A 2-D (B, L) bool padding mask -> out (B, 1, 1, key_len) bool: L == key_len copies it; L ==
// query_len < key_len left-pads it with True (the cached prefix); any other width is rejected.
void expand_mask_2d(const TensorView& mask_2d, int64_t query_len, int64_t key_len,
                    const TensorView& out, void* stream = nullptr);

// How the scores of the keys of a key block are reduced to one block score.
enum class BlockReduce { kMax, kMean };

struct BlockSelectArgs {
  // (Bb, Hb, Sqb, Sk) float16 / bfloat16 / float32 / float64 with Sqb in {1, seqlen_q}: the
  // per-key score (typically (B, Hk, 1, Sk)). Sk is the key length of the attention problem.
  TensorView attn_bias;
  int64_t seqlen_q = 0;  // Sq of the attention problem (>= 0)
  int block_m = 64;      // query rows per block, >= 1 (must match the plan's)
  int block_n = 64;      // keys per block, >= 1 (must match the plan's)
  // Key blocks kept per query block by score, besides the causally required ones (>= 0). Only
  // blocks with a score above -inf compete; ties go to the lower block index.
  int64_t top_k = 0;
  BlockReduce reduce = BlockReduce::kMax;
  // Bottom-right aligned causality (SPEC section 2): key blocks wholly in the future of a query
  // block are never kept, and the blocks holding each row's diagonal key j = i + Sk - Sq are
  // always kept, so no row with a visible key is left empty.
  bool is_causal = false;
  // bool (Bo, Ho, ceil(Sq / block_m), ceil(Sk / block_n)), written. Bo is Bb, or any batch when
  // Bb == 1 (likewise Ho): the layout PlanOptions::block_mask accepts.
  TensorView out;
  void* stream = nullptr;  // cudaStream_t for CUDA tensors
};

// The block-level selector: cost O(Bb * Hb * (Sqb * Sk + m_blocks * n_blocks)), memory
// O(n_blocks) per thread (CUDA: one 8-byte score per bias (batch, head, query block or 1, key
// block), stream-ordered).
void select_blocks(const BlockSelectArgs& args);

}  // namespace fsa
