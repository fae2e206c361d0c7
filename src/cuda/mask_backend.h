#pragma once
// The mask utilities' CUDA backend as seen from their shared validation (src/cpu/mask_utils.cc):
// plain C++ declarations, no CUDA headers. Every entry point takes arguments that were validated
// already, on tensors that are all on one CUDA device, with at least one element to write; it
// queues its kernels on the given stream (a cudaStream_t) and returns without waiting. Without a
// CUDA build these are defined by src/core/mask_cuda_unavailable.cc and throw
// ErrorKind::kUnsupported.

#include <array>
#include <cstdint>

#include "fsa/mask.h"

namespace fsa::detail {

// What the validation of a dynamic_mask() call derives, for every backend.
struct DynamicMaskLayout {
  std::array<int64_t, 4> shape{};        // (B, H, Sq, Sk) of out
  std::array<int64_t, 4> bias_stride{};  // attn_bias read with `shape`: 0 on broadcast dims
  std::array<int64_t, 4> mask_stride{};  // likewise attn_mask (unused without one)
  int64_t window = 0;                    // kTopK: min(window_size, Sk); 0 for kReLU
  // min_value rounded to attn_bias's dtype as a masked_fill stores it: its raw bits, zero-extended
  // (an fp16 / bf16 fill in the low 16 bits).
  uint64_t fill_bits = 0;
};

namespace cuda {

void dynamic_mask(const DynamicMaskArgs& args, const DynamicMaskLayout& layout);

// In place on a bool tensor of rank 1..4, key dim last; block_size >= 2.
void block_smooth(const TensorView& mask, int64_t block_size, void* stream);

// out (B, 1, 1, pad + L) = True on keys [0, pad), then mask_2d (B, L).
void expand_mask_2d(const TensorView& mask_2d, int64_t pad, const TensorView& out, void* stream);

void select_blocks(const BlockSelectArgs& args);

}  // namespace cuda
}  // namespace fsa::detail
