// flash_sparse_attn._C: the C++ core over DLPack arrays.
//
// Every array argument is an nb::ndarray view of the caller's memory (torch tensors, numpy
// arrays, and any other __dlpack__ producer): nothing is copied and nothing is allocated here.
// Outputs are allocated by the caller (torch allocates torch tensors, so its caching allocator and
// CUDA graphs keep working); CUDA work runs on the stream the caller passes (an integer
// cudaStream_t, 0 = the legacy default stream). The GIL is released while the core runs.
//
// fsa::Error becomes a Python exception by kind: kDType -> TypeError, kUnsupported ->
// NotImplementedError (a RuntimeError), everything else -> ValueError. The message starts with the
// argument's name.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "fsa/fsa.h"
#include "fsa/mask.h"

namespace nb = nanobind;

namespace {

// Read-only inputs accept read-only producers too (e.g. numpy.broadcast_to views).
using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

std::string dtype_name(const nb::dlpack::dtype& dt) {
  const char* code = "unknown";
  switch (nb::dlpack::dtype_code(dt.code)) {
    case nb::dlpack::dtype_code::Int:
      code = "int";
      break;
    case nb::dlpack::dtype_code::UInt:
      code = "uint";
      break;
    case nb::dlpack::dtype_code::Float:
      code = "float";
      break;
    case nb::dlpack::dtype_code::Bfloat:
      code = "bfloat";
      break;
    case nb::dlpack::dtype_code::Complex:
      code = "complex";
      break;
    case nb::dlpack::dtype_code::Bool:
      return "bool";
  }
  return std::string(code) + std::to_string(int(dt.bits));
}

fsa::DType to_dtype(const nb::dlpack::dtype& dt, const char* name) {
  if (dt.lanes == 1) {
    switch (nb::dlpack::dtype_code(dt.code)) {
      case nb::dlpack::dtype_code::Float:
        if (dt.bits == 32) return fsa::DType::kFloat32;
        if (dt.bits == 16) return fsa::DType::kFloat16;
        if (dt.bits == 64) return fsa::DType::kFloat64;
        break;
      case nb::dlpack::dtype_code::Bfloat:
        if (dt.bits == 16) return fsa::DType::kBFloat16;
        break;
      case nb::dlpack::dtype_code::Bool:
        if (dt.bits == 8) return fsa::DType::kBool;
        break;
      default:
        break;
    }
  }
  throw fsa::Error(fsa::ErrorKind::kDType, name,
                   "unsupported dtype " + dtype_name(dt) +
                       " (expected float16, bfloat16, float32, float64 or bool)");
}

// An int32 index array of the query's device (offsets, page tables): dtype and device checked.
const int32_t* int32_data(const InArray& a, const char* name, const fsa::Device& device,
                          const char* what) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt.lanes != 1 || nb::dlpack::dtype_code(dt.code) != nb::dlpack::dtype_code::Int ||
      dt.bits != 32) {
    throw fsa::Error(fsa::ErrorKind::kDType, name,
                     std::string("expected int32 ") + what + ", got " + dtype_name(dt));
  }
  const fsa::Device at =
      a.device_type() == nb::device::cuda::value
          ? fsa::Device{fsa::DeviceType::kCUDA, int(a.device_id())}
          : fsa::Device{fsa::DeviceType::kCPU, 0};
  if ((a.device_type() != nb::device::cuda::value && a.device_type() != nb::device::cpu::value) ||
      at != device) {
    throw fsa::Error(fsa::ErrorKind::kDevice, name,
                     "expected the query's device " + fsa::to_string(device));
  }
  return static_cast<const int32_t*>(a.data());
}

// Packed sequences' offsets: a contiguous 1-D int32 array on `device` (the query's).
const int32_t* to_offsets(const InArray& a, const char* name, const fsa::Device& device,
                          int64_t& count) {
  const int32_t* data = int32_data(a, name, device, "offsets");
  if (a.ndim() != 1 || a.shape(0) < 1 || (a.shape(0) > 1 && a.stride(0) != 1)) {
    throw fsa::Error(fsa::ErrorKind::kShape, name,
                     "expected a contiguous 1-D array of sequences + 1 >= 1 offsets");
  }
  count = int64_t(a.shape(0));
  return data;
}

// A paged cache's page table: a contiguous (batch, max_pages) int32 array on `device`.
fsa::PagedKV to_page_table(const InArray& a, const fsa::Device& device) {
  fsa::PagedKV paged;
  paged.page_table = int32_data(a, "page_table", device, "page indices");
  if (a.ndim() != 2 || (a.shape(1) > 1 && a.stride(1) != 1) ||
      (a.shape(0) > 1 && a.stride(0) != int64_t(a.shape(1)))) {
    throw fsa::Error(fsa::ErrorKind::kShape, "page_table",
                     "expected a contiguous 2-D (batch, max_pages) array");
  }
  paged.max_pages = int64_t(a.shape(1));
  return paged;
}

template <typename Array>
fsa::TensorView to_view(const Array& a, const char* name) {
  if (a.ndim() > size_t(fsa::kMaxRank)) {
    throw fsa::Error(fsa::ErrorKind::kShape, name,
                     "expected at most " + std::to_string(fsa::kMaxRank) + " dims, got " +
                         std::to_string(a.ndim()));
  }
  fsa::TensorView v;
  v.data = const_cast<void*>(static_cast<const void*>(a.data()));
  v.dtype = to_dtype(a.dtype(), name);
  const int device_type = a.device_type();
  if (device_type == nb::device::cpu::value) {
    v.device = {fsa::DeviceType::kCPU, 0};
  } else if (device_type == nb::device::cuda::value) {
    v.device = {fsa::DeviceType::kCUDA, int(a.device_id())};
  } else {
    throw fsa::Error(fsa::ErrorKind::kDevice, name,
                     "unsupported device type " + std::to_string(device_type) +
                         " (expected a CPU or CUDA array)");
  }
  v.rank = int(a.ndim());
  for (int d = 0; d < v.rank; ++d) {
    v.shape[size_t(d)] = int64_t(a.shape(size_t(d)));
    v.stride[size_t(d)] = int64_t(a.stride(size_t(d)));
  }
  return v;
}

std::optional<fsa::TensorView> to_view(const std::optional<InArray>& a, const char* name) {
  if (!a) return std::nullopt;
  return to_view(*a, name);
}

std::optional<fsa::TensorView> to_out_view(const std::optional<OutArray>& a, const char* name) {
  if (!a) return std::nullopt;
  return to_view(*a, name);
}

void* to_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

fsa::AttentionOptions attention_options(std::optional<double> softmax_scale, bool is_causal,
                                        double softcap, bool deterministic) {
  fsa::AttentionOptions o;
  if (softmax_scale) o.softmax_scale = float(*softmax_scale);
  o.is_causal = is_causal;
  o.softcap = float(softcap);
  o.deterministic = deterministic;
  return o;
}

fsa::CompactKeys compact_keys_mode(const std::string& mode) {
  if (mode == "auto") return fsa::CompactKeys::kAuto;
  if (mode == "always") return fsa::CompactKeys::kAlways;
  if (mode == "never") return fsa::CompactKeys::kNever;
  throw fsa::Error(fsa::ErrorKind::kValue, "compact_keys",
                   "expected 'auto', 'always' or 'never', got '" + mode + "'");
}

fsa::MaskKind mask_kind(const std::string& type) {
  if (type == "topk") return fsa::MaskKind::kTopK;
  if (type == "relu") return fsa::MaskKind::kReLU;
  throw fsa::Error(fsa::ErrorKind::kValue, "type",
                   "unsupported mask type '" + type + "' (supported: 'topk', 'relu')");
}

fsa::BlockReduce block_reduce(const std::string& reduce) {
  if (reduce == "max") return fsa::BlockReduce::kMax;
  if (reduce == "mean") return fsa::BlockReduce::kMean;
  throw fsa::Error(fsa::ErrorKind::kValue, "reduce",
                   "unsupported reduction '" + reduce + "' (supported: 'max', 'mean')");
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "flash_sparse_attn C++ core over DLPack arrays (see include/fsa/*.h)";
  // Plans held by autograd graphs that are still alive at interpreter exit are not leaks of ours.
  nb::set_leak_warnings(false);

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const fsa::Error& e) {
      PyObject* type = PyExc_ValueError;
      if (e.kind() == fsa::ErrorKind::kDType) type = PyExc_TypeError;
      if (e.kind() == fsa::ErrorKind::kUnsupported) type = PyExc_NotImplementedError;
      PyErr_SetString(type, e.what());
    }
  });

#ifdef FSA_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif

  nb::class_<fsa::Plan>(m, "Plan",
                        "A block map for one problem geometry, shared by forward and backward.")
      .def_prop_ro("valid", &fsa::Plan::valid)
      .def_prop_ro("batch", &fsa::Plan::batch)
      .def_prop_ro("num_heads", &fsa::Plan::num_heads)
      .def_prop_ro("num_kv_heads", &fsa::Plan::num_kv_heads)
      .def_prop_ro("seqlen_q", &fsa::Plan::seqlen_q)
      .def_prop_ro("seqlen_k", &fsa::Plan::seqlen_k)
      .def_prop_ro("is_causal", &fsa::Plan::is_causal)
      .def_prop_ro("has_mask", &fsa::Plan::has_mask)
      .def_prop_ro("block_m", [](const fsa::Plan& p) { return p.map().block_m; })
      .def_prop_ro("block_n", [](const fsa::Plan& p) { return p.map().block_n; })
      .def_prop_ro("m_blocks", [](const fsa::Plan& p) { return p.map().m_blocks; })
      .def_prop_ro("n_blocks", [](const fsa::Plan& p) { return p.map().n_blocks; })
      .def_prop_ro("kept_entries", [](const fsa::Plan& p) { return p.map().kept_entries; })
      .def_prop_ro("compacted", &fsa::Plan::compacted)
      .def("compacted_tile_fraction", &fsa::Plan::compacted_tile_fraction)
      .def("kept_density", &fsa::Plan::kept_density)
      .def("visited_tile_fraction", &fsa::Plan::visited_tile_fraction)
      .def("gathered_tile_fraction", &fsa::Plan::gathered_tile_fraction)
      .def("gathered_full_fraction", &fsa::Plan::gathered_full_fraction)
      .def("dkv_tile_fraction", &fsa::Plan::dkv_tile_fraction)
      .def("dkv_full_fraction", &fsa::Plan::dkv_full_fraction);

  m.def(
      "make_plan",
      [](const InArray& query, const InArray& key, const std::optional<InArray>& attn_mask,
         bool is_causal, std::optional<int> block_m, std::optional<int> block_n,
         const std::optional<InArray>& block_mask, std::optional<int> block_mask_m,
         std::optional<int> block_mask_n, uintptr_t stream, const std::string& compact_keys,
         const std::optional<InArray>& topk_bias, int64_t topk, double topk_min_value,
         int64_t max_kept_keys, bool mask_key_intervals, bool compacted_calls_only,
         const std::optional<InArray>& cu_seqlens_q, const std::optional<InArray>& cu_seqlens_k) {
        const fsa::TensorView q = to_view(query, "query"), k = to_view(key, "key");
        const std::optional<fsa::TensorView> mask = to_view(attn_mask, "attn_mask");
        fsa::PlanOptions options;  // the backend's default tiles unless the caller picks them
        if (block_m) options.block_m = *block_m;
        if (block_n) options.block_n = *block_n;
        options.block_mask = to_view(block_mask, "block_mask");
        if (block_mask_m) options.block_mask_m = *block_mask_m;
        if (block_mask_n) options.block_mask_n = *block_mask_n;
        options.stream = to_stream(stream);
        options.compact_keys = compact_keys_mode(compact_keys);
        options.topk_bias = to_view(topk_bias, "attn_bias");
        options.topk = topk;
        options.topk_min_value = topk_min_value;
        options.max_kept_keys = max_kept_keys;
        options.mask_key_intervals = mask_key_intervals;
        options.compacted_calls_only = compacted_calls_only;
        if (cu_seqlens_q.has_value() != cu_seqlens_k.has_value()) {
          throw fsa::Error(fsa::ErrorKind::kValue,
                           cu_seqlens_q ? "cu_seqlens_k" : "cu_seqlens_q",
                           "expected both cu_seqlens_q and cu_seqlens_k, or neither");
        }
        if (cu_seqlens_q) {
          int64_t n_q = 0, n_k = 0;
          fsa::PlanOptions::PackedSequences packed;
          packed.cu_seqlens_q = to_offsets(*cu_seqlens_q, "cu_seqlens_q", q.device, n_q);
          packed.cu_seqlens_k = to_offsets(*cu_seqlens_k, "cu_seqlens_k", q.device, n_k);
          if (n_q != n_k) {
            throw fsa::Error(fsa::ErrorKind::kShape, "cu_seqlens_k",
                             "expected " + std::to_string(n_q) + " offsets (as cu_seqlens_q), got " +
                                 std::to_string(n_k));
          }
          packed.sequences = n_q - 1;
          options.packed = packed;
        }
        nb::gil_scoped_release release;
        return fsa::make_plan(q, k, mask, is_causal, options);
      },
      nb::arg("query"), nb::arg("key"), nb::arg("attn_mask").none(), nb::arg("is_causal"),
      nb::arg("block_m").none() = nb::none(), nb::arg("block_n").none() = nb::none(),
      nb::arg("block_mask").none() = nb::none(), nb::arg("block_mask_m").none() = nb::none(),
      nb::arg("block_mask_n").none() = nb::none(), nb::arg("stream") = 0,
      nb::arg("compact_keys") = "auto", nb::arg("topk_bias").none() = nb::none(),
      nb::arg("topk") = 0, nb::arg("topk_min_value") = -3.4028234663852886e38,
      nb::arg("max_kept_keys") = 0, nb::arg("mask_key_intervals") = false,
      nb::arg("compacted_calls_only") = false, nb::arg("cu_seqlens_q").none() = nb::none(),
      nb::arg("cu_seqlens_k").none() = nb::none(),
      "Builds the block map for query (B, Sq, H, D), key (B, Sk, Hk, D) (shapes only), an optional "
      "bool attn_mask, causality, the tile shape (None: the backend's default) and an optional "
      "block selection over block_mask_m x block_mask_n tiles, whole multiples of the plan's "
      "(None: the plan's tile); a CUDA plan is built on `stream`. compact_keys: 'auto' (a key-only "
      "mask's kept keys are listed when seqlen_q >= 128), 'always' or 'never'. topk > 0: every "
      "row keeps only the topk largest entries of topk_bias (query-invariant, the call's attn_bias) "
      "among the keys the mask and causality let it see, as per-row thresholds. max_kept_keys > 0: "
      "a promise that no (batch, head) of the mask keeps more keys (sizes the compacted keys). "
      "mask_key_intervals: a promise that every key's kept rows (mask AND causality) are one "
      "interval (mask_rows_are_intervals checks it); the plan then compacts the mask's keys. "
      "compacted_calls_only: a promise that every call has a bias (and gradient) without a "
      "query dim, so a compacted CUDA plan skips the map of the full key axis. cu_seqlens_q / "
      "cu_seqlens_k: packed sequences (batch 1), int32 offsets on the query's device; the plan "
      "compacts each sequence's keys (PlanOptions::packed).");

  m.def(
      "mask_rows_are_intervals",
      [](const InArray& query, const InArray& key, const InArray& attn_mask, bool is_causal,
         uintptr_t stream) {
        const fsa::TensorView q = to_view(query, "query"), k = to_view(key, "key");
        const fsa::TensorView mask = to_view(attn_mask, "attn_mask");
        nb::gil_scoped_release release;
        return fsa::mask_rows_are_intervals(q, k, mask, is_causal, to_stream(stream));
      },
      nb::arg("query"), nb::arg("key"), nb::arg("attn_mask"), nb::arg("is_causal"),
      nb::arg("stream") = 0,
      "Whether, for every (batch, head) and key of the bool attn_mask, the rows that keep the key "
      "(the mask AND causality) are one interval: make_plan's mask_key_intervals. Reads the "
      "mask once; on CUDA it runs on `stream` and waits for the answer.");

  m.def(
      "forward",
      [](const InArray& query, const InArray& key, const InArray& value,
         const std::optional<InArray>& attn_mask, const std::optional<InArray>& attn_bias,
         const OutArray& out, const std::optional<OutArray>& lse,
         std::optional<double> softmax_scale, bool is_causal, double softcap, const fsa::Plan* plan,
         uintptr_t stream, const std::optional<InArray>& page_table,
         const std::optional<InArray>& cache_seqlens) {
        fsa::ForwardArgs a;
        a.query = to_view(query, "query");
        if (cache_seqlens) {
          a.cache_seqlens =
              int32_data(*cache_seqlens, "cache_seqlens", a.query.device, "sequence lengths");
          if (cache_seqlens->ndim() != 1 || int64_t(cache_seqlens->shape(0)) != a.query.shape[0] ||
              (cache_seqlens->shape(0) > 1 && cache_seqlens->stride(0) != 1)) {
            throw fsa::Error(fsa::ErrorKind::kShape, "cache_seqlens",
                             "expected a contiguous 1-D (batch,) array with batch " +
                                 std::to_string(a.query.shape[0]) + " (the query's)");
          }
        }
        if (page_table) {
          a.paged_kv = to_page_table(*page_table, a.query.device);
          if (a.paged_kv->max_pages > 0 && int64_t(page_table->shape(0)) != a.query.shape[0]) {
            throw fsa::Error(fsa::ErrorKind::kShape, "page_table",
                             "expected (batch, max_pages) with batch " +
                                 std::to_string(a.query.shape[0]) + " (the query's), got batch " +
                                 std::to_string(page_table->shape(0)));
          }
        }
        a.key = to_view(key, "key");
        a.value = to_view(value, "value");
        a.attn_mask = to_view(attn_mask, "attn_mask");
        a.attn_bias = to_view(attn_bias, "attn_bias");
        a.out = to_view(out, "out");
        a.lse = to_out_view(lse, "lse");
        a.options = attention_options(softmax_scale, is_causal, softcap, false);
        a.plan = plan;
        a.stream = to_stream(stream);
        nb::gil_scoped_release release;
        fsa::forward(a);
      },
      nb::arg("query"), nb::arg("key"), nb::arg("value"), nb::arg("attn_mask").none(),
      nb::arg("attn_bias").none(), nb::arg("out"), nb::arg("lse").none(),
      nb::arg("softmax_scale").none(), nb::arg("is_causal"), nb::arg("softcap"),
      nb::arg("plan").none(), nb::arg("stream") = 0, nb::arg("page_table").none() = nb::none(),
      nb::arg("cache_seqlens").none() = nb::none(),
      "out (B, Sq, H, D) and, when given, lse (B, H, Sq) fp32 are written in place. page_table "
      "(B, max_pages) int32: key and value are pages (num_pages, page_size, Hk, D) of a cache "
      "(ForwardArgs::paged_kv). cache_seqlens (B,) int32: batch b holds keys "
      "[0, cache_seqlens[b]) (ForwardArgs::cache_seqlens).");

  m.def(
      "backward",
      [](const InArray& dout, const InArray& query, const InArray& key, const InArray& value,
         const InArray& out, const InArray& lse, const std::optional<InArray>& attn_mask,
         const std::optional<InArray>& attn_bias, const OutArray& dquery, const OutArray& dkey,
         const OutArray& dvalue, const std::optional<OutArray>& dbias,
         std::optional<double> softmax_scale, bool is_causal, double softcap, bool deterministic,
         const fsa::Plan* plan, uintptr_t stream) {
        fsa::BackwardArgs a;
        a.dout = to_view(dout, "dout");
        a.query = to_view(query, "query");
        a.key = to_view(key, "key");
        a.value = to_view(value, "value");
        a.out = to_view(out, "out");
        a.lse = to_view(lse, "lse");
        a.attn_mask = to_view(attn_mask, "attn_mask");
        a.attn_bias = to_view(attn_bias, "attn_bias");
        a.dquery = to_view(dquery, "dquery");
        a.dkey = to_view(dkey, "dkey");
        a.dvalue = to_view(dvalue, "dvalue");
        a.dbias = to_out_view(dbias, "dbias");
        a.options = attention_options(softmax_scale, is_causal, softcap, deterministic);
        a.plan = plan;
        a.stream = to_stream(stream);
        nb::gil_scoped_release release;
        fsa::backward(a);
      },
      nb::arg("dout"), nb::arg("query"), nb::arg("key"), nb::arg("value"), nb::arg("out"),
      nb::arg("lse"), nb::arg("attn_mask").none(), nb::arg("attn_bias").none(), nb::arg("dquery"),
      nb::arg("dkey"), nb::arg("dvalue"), nb::arg("dbias").none(), nb::arg("softmax_scale").none(),
      nb::arg("is_causal"), nb::arg("softcap"), nb::arg("deterministic"), nb::arg("plan").none(),
      nb::arg("stream") = 0,
      "dquery, dkey, dvalue and, when given, dbias (attn_bias's shape) are written in place.");

  // Benchmark support: the core's own time per forward call, with no Python in the loop (the
  // reference point for measuring the Python layer's overhead, bench/python_overhead.py).
  m.def(
      "_time_forward",
      [](const InArray& query, const InArray& key, const InArray& value, const OutArray& out,
         int64_t iterations, const std::optional<InArray>& attn_mask, const fsa::Plan* plan,
         bool is_causal, uintptr_t stream) {
        fsa::ForwardArgs a;
        a.query = to_view(query, "query");
        a.key = to_view(key, "key");
        a.value = to_view(value, "value");
        a.attn_mask = to_view(attn_mask, "attn_mask");
        a.out = to_view(out, "out");
        a.options = attention_options(std::nullopt, is_causal, 0.0, false);
        a.plan = plan;
        a.stream = to_stream(stream);
        nb::gil_scoped_release release;
        fsa::forward(a);  // warm-up
        const auto start = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < iterations; ++i) fsa::forward(a);
        const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
        return elapsed.count() / double(std::max<int64_t>(iterations, 1));
      },
      nb::arg("query"), nb::arg("key"), nb::arg("value"), nb::arg("out"), nb::arg("iterations"),
      nb::arg("attn_mask").none() = nb::none(), nb::arg("plan").none() = nb::none(),
      nb::arg("is_causal") = false, nb::arg("stream") = 0,
      "Seconds per fsa::forward call, timed in C++ (no bias; CUDA calls are queued on `stream`, "
      "not waited for: on CUDA this is the host's time per call).");

  m.def("set_num_threads", &fsa::set_num_threads, nb::arg("num_threads"),
        "CPU worker threads; 0 = default (FSA_NUM_THREADS or the hardware concurrency).");
  m.def("num_threads", &fsa::num_threads);
  m.def("release_cuda_memory", &fsa::release_cuda_memory,
        "Gives back to the driver what the CUDA backend's memory pools hold unused.");
  m.def("cuda_memory_reserved", &fsa::cuda_memory_reserved,
        "Bytes the CUDA backend's pool of the current device holds.");
  m.def(
      "cuda_plan_graphs",
      [] {
        const fsa::CudaPlanGraphs held = fsa::cuda_plan_graphs();
        return nb::make_tuple(held.graphs, held.leased, held.bytes);
      },
      "(graphs, leased, bytes): the per-row top-k planning graphs held (every device).");
  m.def(
      "cuda_kernel_experiments",
      [] {
        nb::dict out;
        for (const auto& e : fsa::cuda_kernel_experiments()) out[e.name.c_str()] = e.value;
        return out;
      },
      "{name: value}: the kernel experiments the CUDA backend was compiled with (0: off, the "
      "default; src/cuda/experiments.h); empty without CUDA.");

  // ---- mask utilities
  // ----------------------------------------------------------------------------

  m.def(
      "dynamic_mask_shape",
      [](const InArray& attn_bias, const std::optional<InArray>& attn_mask) {
        const auto s = fsa::dynamic_mask_shape(to_view(attn_bias, "attention_bias"),
                                               to_view(attn_mask, "attention_mask"));
        return std::make_tuple(s[0], s[1], s[2], s[3]);
      },
      nb::arg("attention_bias"), nb::arg("attention_mask").none());

  m.def(
      "dynamic_mask",
      [](const InArray& attn_bias, const std::optional<InArray>& attn_mask, const std::string& type,
         int64_t window_size, double min_value, int64_t block_size, const OutArray& out,
         uintptr_t stream) {
        fsa::DynamicMaskArgs a;
        a.attn_bias = to_view(attn_bias, "attention_bias");
        a.attn_mask = to_view(attn_mask, "attention_mask");
        a.kind = mask_kind(type);
        a.window_size = window_size;
        a.min_value = min_value;
        a.block_size = block_size;
        a.out = to_view(out, "out");
        a.stream = to_stream(stream);
        nb::gil_scoped_release release;
        fsa::dynamic_mask(a);
      },
      nb::arg("attention_bias"), nb::arg("attention_mask").none(), nb::arg("type"),
      nb::arg("window_size"), nb::arg("min_value"), nb::arg("block_size"), nb::arg("out"),
      nb::arg("stream") = 0,
      "out (the broadcast shape, bool) is written in place; CUDA arrays on `stream`.");

  m.def(
      "block_smooth",
      [](const OutArray& mask, int64_t block_size, uintptr_t stream) {
        const fsa::TensorView v = to_view(mask, "attention_mask");
        nb::gil_scoped_release release;
        fsa::block_smooth(v, block_size, to_stream(stream));
      },
      nb::arg("attention_mask"), nb::arg("block_size"), nb::arg("stream") = 0);

  m.def(
      "expand_mask_2d",
      [](const InArray& mask_2d, int64_t query_len, int64_t key_len, const OutArray& out,
         uintptr_t stream) {
        fsa::expand_mask_2d(to_view(mask_2d, "attention_mask"), query_len, key_len,
                            to_view(out, "out"), to_stream(stream));
      },
      nb::arg("attention_mask"), nb::arg("query_len"), nb::arg("key_len"), nb::arg("out"),
      nb::arg("stream") = 0);

  m.def(
      "select_blocks",
      [](const InArray& attn_bias, int64_t seqlen_q, int block_m, int block_n, int64_t top_k,
         const std::string& reduce, bool is_causal, const OutArray& out, uintptr_t stream) {
        fsa::BlockSelectArgs a;
        a.attn_bias = to_view(attn_bias, "attention_bias");
        a.seqlen_q = seqlen_q;
        a.block_m = block_m;
        a.block_n = block_n;
        a.top_k = top_k;
        a.reduce = block_reduce(reduce);
        a.is_causal = is_causal;
        a.out = to_view(out, "out");
        a.stream = to_stream(stream);
        nb::gil_scoped_release release;
        fsa::select_blocks(a);
      },
      nb::arg("attention_bias"), nb::arg("query_len"), nb::arg("block_m"), nb::arg("block_n"),
      nb::arg("top_k"), nb::arg("reduce"), nb::arg("is_causal"), nb::arg("out"),
      nb::arg("stream") = 0);
}
