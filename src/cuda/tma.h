#pragma once
// Tensor memory accelerator (TMA) loads of the sm90 kernels: a tensor map per global tensor,
// encoded on the host for each call and passed to the kernel as a __grid_constant__ parameter, and
// the PTX that copies a box of it into shared memory and signals an mbarrier with its bytes.

#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdio>

namespace fsa::detail::cuda {

// An encoded CUtensorMap (its size and alignment), without cuda.h in the parameter structs.
struct alignas(128) TensorMap {
  uint64_t opaque[16];
};
static_assert(sizeof(TensorMap) == sizeof(CUtensorMap) &&
                  alignof(TensorMap) == alignof(CUtensorMap),
              "TensorMap holds a CUtensorMap");

// The forward's K and V as 4-d tensors (head dim, keys, kv heads, batch) of 16-bit elements, read
// in (64 x 64) boxes with the 128-byte swizzle of the GMMA layouts; `enabled` false: the kernel
// copies K and V with cp.async. The D = 256 dQ pass reads them in (64 columns x 32 keys) boxes.
struct KvTensorMaps {
  TensorMap k, v;
  bool enabled;
};

// The same for the backward's Q and dO (head dim, queries, heads, batch), which the sm90 dK/dV
// passes stream (load_step_rows_async).
struct QdoTensorMaps {
  TensorMap q, dout;
  bool enabled;
};

#if defined(__CUDACC__)
// Waits for `bytes` more to land on `bar` in its current phase (the TMA copies' complete_tx).
__device__ __forceinline__ void mbarrier_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(bar))),
               "r"(bytes)
               : "memory");
}

// Copies the box at coordinates (c0, c1, c2, c3) of `map` to `smem` (1024-byte aligned under the
// 128-byte swizzle); its bytes complete on `bar`. Rows and columns outside the tensor are zeros.
__device__ __forceinline__ void tma_load_4d(void* smem, const TensorMap& map, int c0, int c1,
                                            int c2, int c3, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(
          static_cast<uint32_t>(__cvta_generic_to_shared(smem))),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar)))
      : "memory");
}
#endif

// Encodes a (head_dim, rows, heads, batch) tensor of 16-bit elements at `base` with the given
// element strides into `map`, boxes of 64 columns x `box_rows` rows. False where TMA cannot
// address it (a base not 16-byte aligned, a stride not a multiple of 8 elements) or the driver
// refuses it.
inline bool encode_rows_map(TensorMap& map, const void* base, int head_dim, int rows, int heads,
                            int batch, int64_t stride_s, int64_t stride_h, int64_t stride_b,
                            int box_rows = 64) {
  // cuTensorMapEncodeTiled's type (cudaTypedefs.h's PFN typedef, which CUTLASS includes inside its
  // namespace).
  using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const EncodeTiled encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<EncodeTiled>(fn);
  }();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  // A dim of one element may carry any stride: give it its predecessor's extent, which TMA accepts.
  const int64_t s1 = stride_s;
  const int64_t s2 = heads > 1 ? stride_h : s1 * rows;
  const int64_t s3 = batch > 1 ? stride_b : s2 * heads;
  for (int64_t s : {s1, s2, s3}) {
    if (s <= 0 || s % 8 != 0 || s >= (int64_t(1) << 39)) return false;
  }
  const cuuint64_t dims[4] = {cuuint64_t(head_dim), cuuint64_t(rows), cuuint64_t(heads),
                              cuuint64_t(batch)};
  const cuuint64_t strides[3] = {cuuint64_t(s1) * 2, cuuint64_t(s2) * 2, cuuint64_t(s3) * 2};
  const cuuint32_t box[4] = {64, cuuint32_t(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  return encode(reinterpret_cast<CUtensorMap*>(&map), CU_TENSOR_MAP_DATA_TYPE_UINT16, 4,
                const_cast<void*>(base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The K and V maps of a call (`p`: ForwardParams or BackwardParams, whose key fields are named
// alike), boxes of 64 columns x `box_rows` keys; false where either cannot be encoded.
template <class Params>
bool encode_kv_maps(KvTensorMaps& maps, const Params& p, int box_rows = 64) {
  return encode_rows_map(maps.k, p.k, p.head_dim, p.seqlen_k, p.num_kv_heads, p.batch,
                         p.k_stride_s, p.k_stride_h, p.k_stride_b, box_rows) &&
         encode_rows_map(maps.v, p.v, p.head_dim, p.seqlen_k, p.num_kv_heads, p.batch,
                         p.v_stride_s, p.v_stride_h, p.v_stride_b, box_rows);
}

// Where TMA cannot address a call's tensors (encode_rows_map false: the caller's layout, not a
// choice of ours), the first such call says so on stderr, once per process (`logged`: a training
// loop repeats the same call): `tensors` are copied with cp.async by `kernel`.
inline void log_tma_fallback(std::atomic<bool>& logged, const char* tensors, const char* kernel) {
  if (logged.exchange(true)) return;
  std::fprintf(stderr,
               "flash_sparse_attn: TMA cannot address this call's %s (a stride of 0, as "
               "torch.expand gives, or the driver refused the tensor map); %s copies them with "
               "cp.async instead, a few percent slower. Logged once per process.\n",
               tensors, kernel);
}

}  // namespace fsa::detail::cuda
