#pragma once
// The validated, lowered form of a forward or backward call that backends consume. Built once by
// validate_*(); every field is in elements (64-bit) and already checked against the contract.

#include <cstdint>
#include <optional>

#include "core/causal.h"
#include "core/row_end.h"
#include "core/row_topk.h"
#include "fsa/attention.h"

namespace fsa::detail {

// A (B, S, H, D) operand whose last dim is contiguous. Paged (ForwardArgs::paged_kv: key and value
// only): row s of batch b is row s % page_size of page pages[b * pages_stride_b + s / page_size],
// and stride_b is the distance between pages.
struct SeqOperand {
  void* data = nullptr;
  int64_t stride_b = 0;  // elements between batches (pages when paged)
  int64_t stride_s = 0;  // elements between sequence positions
  int64_t stride_h = 0;  // elements between heads
  const int32_t* pages = nullptr;
  int64_t pages_stride_b = 0, page_size = 0, num_pages = 0;
  int64_t offset(int64_t b, int64_t s, int64_t h) const {
    if (pages != nullptr) {
      return int64_t(pages[b * pages_stride_b + s / page_size]) * stride_b +
             (s % page_size) * stride_s + h * stride_h;
    }
    return b * stride_b + s * stride_s + h * stride_h;
  }
};

// A mask or bias of shape ({B|1}, {H|Hk|1}, {Sq|1}, {Sk|1}) as the caller passed it. Reads use
// `read_stride`, which is 0 on every dim of size 1 *and* on every stride-0 (expanded) dim, so a
// broadcast view is read without being materialized. `shape` is the caller's shape: gradients
// are reduced to it.
struct BroadcastOperand {
  void* data = nullptr;
  DType dtype = DType::kBool;
  int64_t shape[4] = {0, 0, 0, 0};        // (Bx, Hx, Sqx, Skx) as passed
  int64_t stride[4] = {0, 0, 0, 0};       // caller strides (elements)
  int64_t read_stride[4] = {0, 0, 0, 0};  // 0 where the dim is broadcast or expanded
  int64_t head_group = 1;                 // query heads per head of this operand: H / Hx

  // Effective extents for reading: 1 where read_stride is 0.
  int64_t read_extent(int d) const { return read_stride[d] == 0 ? 1 : shape[d]; }
  // Offset of element (b, query head h, i, j) of the problem.
  int64_t offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return b * read_stride[0] + (h / head_group) * read_stride[1] + i * read_stride[2] +
           j * read_stride[3];
  }
};

struct Problem {
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  DType dtype = DType::kFloat32;
  Device device{};
  float scale = 1.0f;    // softmax scale (natural units)
  float softcap = 0.0f;  // 0 = off
  bool is_causal = false;
  bool deterministic = false;
  SeqOperand q, k, v;
  std::optional<BroadcastOperand> mask, bias;
  RowEnd row_end;    // compacted keys only
  RowTopK row_topk;  // per-row top-k thresholds (PlanOptions::topk) only
  // CUDA calls over compacted keys: a device flag the V gather sets when it copies a non-finite
  // value. Null elsewhere: partial tiles then check their V tile themselves.
  const int32_t* v_nonfinite = nullptr;
  // Forward over a cache (ForwardArgs::cache_seqlens): batch b's keys end at cache_seqlens[b]
  // (device memory on CUDA, clamped there into [0, Sk]; checked on the CPU). Null: all Sk keys.
  const int32_t* cache_seqlens = nullptr;
  int64_t group() const { return num_heads / num_kv_heads; }  // G query heads per kv head
  // The keys batch b's rows may see: its length, and causality within it. Host memory only (the
  // CPU backend's; CUDA kernels have their own copy of the rule).
  CausalBand band(int64_t b) const {
    return {seqlen_q, cache_seqlens ? int64_t(cache_seqlens[b]) : seqlen_k, is_causal};
  }
};

struct ForwardProblem : Problem {
  SeqOperand out;
  float* lse = nullptr;  // (B, H, Sq) fp32, or null when not requested
  int64_t lse_stride_b = 0, lse_stride_h = 0, lse_stride_s = 0;
};

struct BackwardProblem : Problem {
  SeqOperand out, dout, dq, dk, dv;
  const float* lse = nullptr;
  int64_t lse_stride_b = 0, lse_stride_h = 0, lse_stride_s = 0;
  std::optional<BroadcastOperand> dbias;  // caller shape == bias shape; writes use `stride`
};

ForwardProblem validate_forward(const ForwardArgs& args);
BackwardProblem validate_backward(const BackwardArgs& args);

// Shared by planning: checks query/key ranks and head counts, returns (B, Sq, Sk, H, Hk).
struct Geometry {
  int64_t batch, seqlen_q, seqlen_k, num_heads, num_kv_heads;
};
Geometry validate_geometry(const TensorView& query, const TensorView& key);
// Checks a bool mask (or block selection) against the problem; `name` is the argument's name,
// `sq`/`sk` the full extents of its last two dims.
BroadcastOperand validate_broadcast(const TensorView& t, const char* name, const Geometry& g,
                                    int64_t sq, int64_t sk);

// Plan arguments must describe the same problem as the call.
void check_plan(const Plan& plan, const Problem& p);

}  // namespace fsa::detail
