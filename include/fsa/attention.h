#pragma once
// Forward and backward of exact attention with an optional boolean mask and additive bias
// (SPEC.md sections 2-4). Layouts: query (B, Sq, H, D), key/value (B, Sk, Hk, D), out like
// query, lse (B, H, Sq) fp32, attn_mask / attn_bias ({B|1}, {H|Hk|1}, {Sq|1}, {Sk|1}).
// Arguments are validated before anything is written; a rejection throws fsa::Error.

#include <optional>
#include <string>
#include <vector>

#include "fsa/error.h"
#include "fsa/plan.h"
#include "fsa/tensor.h"

namespace fsa {

struct AttentionOptions {
  std::optional<float> softmax_scale;  // default 1/sqrt(D); must be finite and >= 0
  bool is_causal = false;              // bottom-right aligned: key j is visible to row i iff
                                       // j <= i + Sk - Sq
  float softcap = 0.0f;                // 0 = off; c > 0: s = c * tanh(scale * x / c) + bias
  bool deterministic = false;          // backward bitwise reproducible (always so on the CPU)
};

// A paged K / V cache (forward only; docs/numerics.md, "Paged KV cache"): key and value are pages
// (num_pages, page_size, Hk, D), and batch b's key j is row j % page_size of page
// page_table[b * max_pages + j / page_size], so the problem's Sk is max_pages * page_size: masks,
// biases and causality see that key axis, and ForwardArgs::cache_seqlens bounds each sequence's
// keys within it. page_table: (B, max_pages) int32, contiguous, in
// memory of the query's device. The CPU backend checks that every entry names a page (0 <= entry
// < num_pages); CUDA never reads the table on the host, and clamps an entry into that range on
// the device (it reads a page, never memory past the cache). On CUDA the rows must be 16-byte
// chunks (head_dim a multiple of 8, aligned pages and strides), else the call is refused.
struct PagedKV {
  const int32_t* page_table = nullptr;
  int64_t max_pages = 0;
};

struct ForwardArgs {
  TensorView query;                     // (B, Sq, H, D)   fp16 / bf16 / fp32 (CPU)
  TensorView key;                       // (B, Sk, Hk, D)  same dtype; pages with paged_kv
  TensorView value;                     // (B, Sk, Hk, D)  same dtype; pages with paged_kv
  std::optional<TensorView> attn_mask;  // bool, True = keep
  std::optional<TensorView> attn_bias;  // query dtype or fp32, added to the scaled scores
  AttentionOptions options;
  TensorView out;                       // (B, Sq, H, D) query dtype, written
  std::optional<TensorView> lse;        // (B, H, Sq) fp32 natural-log LSE, written when given
  const Plan* plan = nullptr;           // built from attn_mask and causality when null
  void* stream = nullptr;               // cudaStream_t for CUDA tensors; ignored on the CPU
  std::optional<PagedKV> paged_kv;      // key / value as pages of a cache (above)
  // Per-sequence key lengths of a cache (decode, chunked prefill): (B,) int32, contiguous, in
  // memory of the query's device, or null (every batch holds all Sk keys). Batch b holds keys
  // [0, cache_seqlens[b]): the rest are dropped for all its rows (whatever K / V hold there, NaN
  // included), and with is_causal row i sees keys j <= i + cache_seqlens[b] - Sq (bottom-right
  // within the sequence's own length). The lengths are read by the kernels, not by the plan: a
  // plan built for the full key axis (shapes, attn_mask, causality) serves every step of a decode
  // loop whose lengths change. The CPU backend checks 0 <= length <= Sk; CUDA never reads them on
  // the host and clamps each into that range on the device. Not with a plan that holds compacted
  // keys and no map of the full key axis (PlanOptions::compact_keys = kNever for such calls); a
  // compacted plan with a map runs its map.
  const int32_t* cache_seqlens = nullptr;
};

// The (B, max_pages * page_size, Hk, D) key axis a paged cache presents (shape and the row and head
// strides of the pages; the batch stride is 0: rows are found through the page table). What a
// plan for a paged call is built from (make_plan reads shapes only).
TensorView paged_key_axis(const TensorView& pages, const TensorView& query, const PagedKV& paged);

struct BackwardArgs {
  TensorView query, key, value;         // as in forward
  TensorView out;                       // forward output
  TensorView lse;                       // (B, H, Sq) fp32 from forward
  TensorView dout;                      // (B, Sq, H, D) query dtype
  std::optional<TensorView> attn_mask;
  std::optional<TensorView> attn_bias;
  AttentionOptions options;
  TensorView dquery;                    // like query, written
  TensorView dkey;                      // like key, written (summed over the G heads of a kv head)
  TensorView dvalue;                    // like value, written
  std::optional<TensorView> dbias;      // exactly attn_bias's shape and dtype, written when given
  const Plan* plan = nullptr;
  void* stream = nullptr;
};

void forward(const ForwardArgs& args);
void backward(const BackwardArgs& args);

// CPU backend worker threads; 0 = hardware concurrency (or FSA_NUM_THREADS when set).
void set_num_threads(int num_threads);
int num_threads();

// The CUDA backend takes its scratch (plans, gathered keys, split workspaces) from a memory pool of
// its own per device, which keeps what it reserved across calls and synchronizations (the device's
// default pool would hand it back to the driver at every synchronize and map it again on the next
// call). release_cuda_memory() gives back what the pools hold unused, after the work queued so
// far (synchronize first to give back everything); cuda_memory_reserved() is the bytes the
// current device's pool holds. Without CUDA: nothing to release, 0.
//
// Per-row top-k plans without a mask are replayed from a CUDA graph of the planning kernels per
// (shape, stream), each graph with its own memory, held while a plan uses it and kept for the
// next plan of that shape after; release_cuda_memory() also drops those not in use.
// cuda_plan_graphs() is how many graphs are held (every device) and their bytes.
void release_cuda_memory();
int64_t cuda_memory_reserved();
struct CudaPlanGraphs {
  int64_t graphs = 0;  // captured planning graphs held
  int64_t leased = 0;  // of those, the ones a live plan uses
  int64_t bytes = 0;   // their memory
};
CudaPlanGraphs cuda_plan_graphs();

// The kernel experiments the CUDA backend was compiled with (src/cuda/experiments.h: macros off
// by default that nvcc -DNAME=VALUE turns on for an A/B on a card), every one by name with its
// value, 0 where off; empty without CUDA. For the benchmarks and tests run over such a build: the
// names come and go with the experiments.
struct KernelExperiment {
  std::string name;
  int value = 0;
};
std::vector<KernelExperiment> cuda_kernel_experiments();

}  // namespace fsa
