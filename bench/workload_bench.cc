// The workload engine of the C++ bench CLIs: data set-up, planning, timing and output for one
// workload on the CPU backend or (when the library is built with CUDA) on GPU 0. The method is
// described at the top of workload_bench.h; nothing is allocated inside a timed loop.

#include "workload_bench.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <thread>

#include "fsa/mask.h"

#ifdef FSA_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fsa_bench {
namespace {

using fsa::DType;
using fsa::TensorView;

constexpr double kMiB = 1024.0 * 1024.0;
// Rotated input sets: enough that 2x the cache is touched between two uses of a set, at most
// kMaxSets (a smaller working set falls back to the flush).
constexpr double kColdFactor = 2.0;
constexpr int64_t kMaxSets = 64;
constexpr size_t kCudaFlushBytes = size_t(256) << 20;

// ---- small helpers ---------------------------------------------------------------------------

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16: return "bf16";
    case DType::kFloat16: return "fp16";
    case DType::kFloat32: return "fp32";
    case DType::kFloat64: return "fp64";
    case DType::kBool: return "bool";
  }
  return "?";
}

std::string format(const char* fmt, double value) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, value);
  return buf;
}

// Rows kept in the block rows [i0, i1) x keys [j0, j1) by bottom-right causality (row i keeps key
// j iff j <= i + offset, offset = Sk - Sq): row i keeps clamp(i + offset + 1 - j0, 0, j1 - j0).
double causal_kept(int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t offset) {
  const int64_t width = j1 - j0;
  const int64_t first = std::clamp(j0 - offset, i0, i1);         // first row keeping >= 1 key
  const int64_t whole = std::clamp(j1 - 1 - offset, first, i1);  // first row keeping all keys
  const double n = double(whole - first);
  const double at_first = double(first + offset + 1 - j0);
  return n * at_first + n * (n - 1) / 2 + double(i1 - whole) * double(width);
}

// Fraction of all Sq x Sk entries kept by causality alone.
double unmasked_density(const Workload& w) {
  if (!w.causal) return 1.0;
  return causal_kept(0, w.seqlen_q, 0, w.seqlen_k, w.seqlen_k - w.seqlen_q) /
         (double(w.seqlen_q) * double(w.seqlen_k));
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (inputs are finite)
  return uint16_t(u >> 16);
}

uint16_t to_fp16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, magnitude = u & 0x7fffffffu;
  if (magnitude >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (magnitude < 0x38800000u) return uint16_t(sign);             // below 2^-14: zero (bench data)
  uint32_t h = (magnitude - 0x38000000u) >> 13;                   // exponent rebiased 127 -> 15
  const uint32_t rest = magnitude & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // round to nearest even
  return uint16_t(sign | h);
}

void store(void* dst, DType dtype, int64_t i, float value) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(dst)[i] = value;
  } else {
    static_cast<uint16_t*>(dst)[i] = dtype == DType::kBFloat16 ? to_bf16(value) : to_fp16(value);
  }
}

// n values of about N(0, 1) (Irwin-Hall: four 16-bit uniforms of one 64-bit draw, rescaled to unit
// variance) in `dtype`, on all cores; deterministic for a seed whatever the thread count.
void fill_normal(void* dst, DType dtype, int64_t n, uint64_t seed) {
  constexpr int64_t kChunk = int64_t(1) << 20;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t workers =
      std::max<int64_t>(1, std::min<int64_t>(chunks, std::thread::hardware_concurrency()));
  auto work = [&](int64_t worker) {
    for (int64_t c = worker; c < chunks; c += workers) {
      uint64_t state = seed * 0x100000001b3ull + uint64_t(c);
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) {
        const uint64_t r = splitmix64(state);
        const float sum = float(r & 0xffffu) + float((r >> 16) & 0xffffu) +
                          float((r >> 32) & 0xffffu) + float(r >> 48);
        store(dst, dtype, i, (sum * (1.0f / 65536.0f) - 2.0f) * 1.7320508f);
      }
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < workers; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

Stats summarize(std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  Stats s;
  s.min_ms = ms.front();
  s.median_ms = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  s.p90_ms = ms[size_t(std::ceil(0.9 * double(n))) - 1];  // nearest rank
  return s;
}

// ---- devices: memory and timing --------------------------------------------------------------

class BenchDevice {
 public:
  virtual ~BenchDevice() = default;
  virtual fsa::Device id() const = 0;
  virtual std::string name() const = 0;
  virtual std::string clock() const = 0;
  virtual std::string cache_name() const = 0;
  virtual size_t cache_bytes() const = 0;  // 0 = unknown
  virtual size_t flush_bytes() const = 0;
  virtual std::string pool_note() const = 0;
  virtual void* stream() = 0;
  virtual void* alloc(size_t bytes) = 0;  // zero-filled, freed with the device object
  virtual void upload(void* dst, const void* src, size_t bytes) = 0;
  virtual void flush() = 0;  // queued before a timed call, outside its timed region
  virtual void sync() = 0;
  virtual void reset_pool_peak() {}
  virtual double pool_peak_bytes() { return -1; }
  // Runs warmup + reps calls of body(i) with before(i) ahead of each; returns the reps times (ms).
  virtual std::vector<double> time(int warmup, int reps, const std::function<void(int)>& before,
                                   const std::function<void(int)>& body) = 0;
};

class CpuDevice final : public BenchDevice {
 public:
  ~CpuDevice() override {
    for (void* p : allocations_) std::free(p);
  }
  fsa::Device id() const override { return fsa::Device{}; }
  std::string name() const override {
    return "CPU backend (" + std::to_string(fsa::num_threads()) + " threads)";
  }
  std::string clock() const override { return "std::chrono::steady_clock around each call"; }
  std::string cache_name() const override { return "LLC"; }
  // The last-level cache as reported, at most 64 MiB: VMs often report the whole socket's L3
  // (hundreds of MiB over many core complexes), which would only inflate the rotated sets.
  size_t cache_bytes() const override {
    long bytes = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (bytes <= 0) bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return bytes > 0 ? std::min(size_t(bytes), size_t(64) << 20) : 0;
  }
  size_t flush_bytes() const override {  // 2x the LLC, at least 8 MiB
    return std::max<size_t>(size_t(kColdFactor * double(cache_bytes())), size_t(8) << 20);
  }
  std::string pool_note() const override { return "host buffers allocated before timing"; }
  void* stream() override { return nullptr; }
  void* alloc(size_t bytes) override {
    void* p = std::calloc(std::max<size_t>(bytes, 1), 1);
    if (!p)
      throw std::runtime_error("out of host memory allocating " + std::to_string(bytes) + " bytes");
    allocations_.push_back(p);
    return p;
  }
  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void flush() override {
    if (!flush_buffer_) flush_buffer_ = static_cast<uint8_t*>(alloc(flush_bytes()));
    std::memset(flush_buffer_, ++flush_value_, flush_bytes());
  }
  void sync() override {}
  std::vector<double> time(int warmup, int reps, const std::function<void(int)>& before,
                           const std::function<void(int)>& body) override {
    using Clock = std::chrono::steady_clock;
    std::vector<double> ms(size_t(reps), 0.0);
    for (int i = 0; i < warmup + reps; ++i) {
      before(i);
      const auto t0 = Clock::now();
      body(i);
      const auto t1 = Clock::now();
      if (i >= warmup)
        ms[size_t(i - warmup)] = std::chrono::duration<double, std::milli>(t1 - t0).count();
    }
    return ms;
  }

 private:
  std::vector<void*> allocations_;
  uint8_t* flush_buffer_ = nullptr;
  uint8_t flush_value_ = 0;
};

#ifdef FSA_WITH_CUDA
void cuda_check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(call) + ": " + cudaGetErrorString(status));
  }
}
#define BENCH_CUDA(call) cuda_check((call), #call)

class CudaDevice final : public BenchDevice {
 public:
  CudaDevice() {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0) {
      throw UsageError(std::string("--device cuda: no CUDA device (") +
                       (status != cudaSuccess ? cudaGetErrorString(status) : "0 devices") +
                       "); --device cpu times the CPU backend");
    }
    BENCH_CUDA(cudaSetDevice(0));
    cudaDeviceProp prop{};
    BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
    name_ = prop.name;
    l2_bytes_ = size_t(std::max(prop.l2CacheSize, 0));
    BENCH_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    // The library takes split-KV / backward scratch and plan storage from the default pool with
    // cudaMallocAsync; with the default threshold (0) the pool hands memory back to the driver at
    // every synchronization, so a timed call could pay for a fresh allocation.
    BENCH_CUDA(cudaDeviceGetDefaultMemPool(&pool_, 0));
    uint64_t keep = UINT64_MAX;
    BENCH_CUDA(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep));
  }
  ~CudaDevice() override {  // also hands the pool's kept memory back before the next workload
    cudaDeviceSynchronize();
    for (void* p : allocations_) cudaFree(p);
    cudaStreamDestroy(stream_);
    cudaMemPoolTrimTo(pool_, 0);
  }
  fsa::Device id() const override { return fsa::Device{fsa::DeviceType::kCUDA, 0}; }
  std::string name() const override { return name_; }
  std::string clock() const override {
    return "CUDA events around each call on one stream (host enqueues ahead)";
  }
  std::string cache_name() const override { return "L2"; }
  size_t cache_bytes() const override { return l2_bytes_; }
  size_t flush_bytes() const override {
    return std::max(kCudaFlushBytes, size_t(4 * double(l2_bytes_)));
  }
  std::string pool_note() const override {
    return "default mempool release threshold UINT64_MAX (library scratch is reused pool "
           "memory, no driver allocation in the timed loop)";
  }
  void* stream() override { return stream_; }
  void* alloc(size_t bytes) override {
    void* p = nullptr;
    BENCH_CUDA(cudaMalloc(&p, std::max<size_t>(bytes, 1)));
    allocations_.push_back(p);
    BENCH_CUDA(cudaMemset(p, 0, std::max<size_t>(bytes, 1)));
    return p;
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    BENCH_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  }
  void flush() override {
    if (!flush_buffer_) flush_buffer_ = alloc(flush_bytes());
    BENCH_CUDA(cudaMemsetAsync(flush_buffer_, ++flush_value_, flush_bytes(), stream_));
  }
  // The whole device: uploads (cudaMemcpy / cudaMemset on the legacy stream) are not ordered with
  // the non-blocking timing stream.
  void sync() override { BENCH_CUDA(cudaDeviceSynchronize()); }
  void reset_pool_peak() override {
    uint64_t zero = 0;
    BENCH_CUDA(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrUsedMemHigh, &zero));
  }
  double pool_peak_bytes() override {
    uint64_t peak = 0;
    BENCH_CUDA(cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrUsedMemHigh, &peak));
    return double(peak);
  }
  std::vector<double> time(int warmup, int reps, const std::function<void(int)>& before,
                           const std::function<void(int)>& body) override {
    std::vector<cudaEvent_t> start(static_cast<size_t>(reps)), stop(static_cast<size_t>(reps));
    for (int r = 0; r < reps; ++r) {
      BENCH_CUDA(cudaEventCreate(&start[size_t(r)]));
      BENCH_CUDA(cudaEventCreate(&stop[size_t(r)]));
    }
    for (int i = 0; i < warmup; ++i) {
      before(i);
      body(i);
    }
    sync();
    for (int r = 0; r < reps; ++r) {
      before(warmup + r);
      BENCH_CUDA(cudaEventRecord(start[size_t(r)], stream_));
      body(warmup + r);
      BENCH_CUDA(cudaEventRecord(stop[size_t(r)], stream_));
    }
    sync();
    BENCH_CUDA(cudaGetLastError());
    std::vector<double> ms(static_cast<size_t>(reps));
    for (int r = 0; r < reps; ++r) {
      float t = 0;
      BENCH_CUDA(cudaEventElapsedTime(&t, start[size_t(r)], stop[size_t(r)]));
      ms[size_t(r)] = t;
      cudaEventDestroy(start[size_t(r)]);
      cudaEventDestroy(stop[size_t(r)]);
    }
    return ms;
  }

 private:
  std::string name_;
  size_t l2_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaMemPool_t pool_ = nullptr;
  std::vector<void*> allocations_;
  void* flush_buffer_ = nullptr;
  uint8_t flush_value_ = 0;
};
#endif  // FSA_WITH_CUDA

std::unique_ptr<BenchDevice> open_device(const Timing& timing) {
  if (timing.device == fsa::DeviceType::kCPU) {
    if (timing.threads > 0) fsa::set_num_threads(timing.threads);
    return std::make_unique<CpuDevice>();
  }
#ifdef FSA_WITH_CUDA
  return std::make_unique<CudaDevice>();
#else
  throw UsageError(
      "--device cuda: this build has no CUDA backend (no nvcc, or "
      "FSA_ENABLE_CUDA=OFF); --device cpu times the CPU backend");
#endif
}

// ---- the workload's data ---------------------------------------------------------------------

void validate(const Workload& w, const std::vector<Mode>& modes, const Timing& t) {
  if (w.batch < 1 || w.seqlen_q < 1 || w.seqlen_k < 1 || w.heads < 1 || w.kv_heads < 1 ||
      w.head_dim < 1) {
    throw UsageError("--shape: expected B,Sq,Sk,H,Hk,D all >= 1");
  }
  if (w.heads % w.kv_heads != 0) {
    throw UsageError("--shape: H (" + std::to_string(w.heads) + ") must be a multiple of Hk (" +
                     std::to_string(w.kv_heads) + ")");
  }
  if (w.head_dim > 256)
    throw UsageError("--shape: D must be 1..256, got " + std::to_string(w.head_dim));
  if (w.dtype == DType::kFloat32 && t.device != fsa::DeviceType::kCPU) {
    throw UsageError(
        "--dtype fp32: the CUDA backend takes bf16 or fp16 (fp32 only with --device cpu)");
  }
  if (w.bias_dtype && *w.bias_dtype != DType::kFloat32 && *w.bias_dtype != w.dtype) {
    throw UsageError(std::string("--bias-dtype: expected fp32 or the query dtype (") +
                     dtype_name(w.dtype) + "), got " + dtype_name(*w.bias_dtype));
  }
  if (w.density != 0 && !(w.density > 0 && w.density <= 1)) {
    throw UsageError("--density: expected a fraction of all Sq x Sk entries in (0, 1], e.g. 0.1");
  }
  if (w.density > 0 && w.top_k >= 0) throw UsageError("--density and --top-k: give one of them");
  if (w.select_block < 1) throw UsageError("--select-block: expected >= 1");
  if (w.key_mask_every < 0) throw UsageError("--key-mask-every: expected >= 1");
  if (w.key_mask_every > 0 && w.has_selection()) {
    throw UsageError("--key-mask-every: not combined with --density / --top-k");
  }
  if (modes.empty()) throw UsageError("--mode: expected at least one of fwd, bwd, fwdbwd");
  if (t.reps < 1) throw UsageError("--reps: expected >= 1");
  if (t.warmup < 0) throw UsageError("--warmup: expected >= 0");
}

// Host copies of everything a call reads, built once and uploaded into every rotated set.
struct HostData {
  std::vector<uint8_t> q, k, v, dout, bias, mask, selection;
  int64_t top_k = -1;
  double selection_density = 0;  // kept fraction of Sq x Sk counted on the host
};

// The selection's kept fraction of all Sq x Sk entries (causality applied inside its blocks).
double selection_density(const std::vector<uint8_t>& sel, const Workload& w) {
  const int64_t bs = w.select_block;
  const int64_t mb = (w.seqlen_q + bs - 1) / bs, nb = (w.seqlen_k + bs - 1) / bs;
  const int64_t offset = w.seqlen_k - w.seqlen_q;
  std::vector<double> kept(size_t(mb * nb));  // per block, the same for every (batch, kv head)
  for (int64_t m = 0; m < mb; ++m) {
    const int64_t i0 = m * bs, i1 = std::min(w.seqlen_q, i0 + bs);
    for (int64_t n = 0; n < nb; ++n) {
      const int64_t j0 = n * bs, j1 = std::min(w.seqlen_k, j0 + bs);
      kept[size_t(m * nb + n)] =
          w.causal ? causal_kept(i0, i1, j0, j1, offset) : double(i1 - i0) * double(j1 - j0);
    }
  }
  double total = 0;
  for (size_t i = 0; i < sel.size(); ++i) total += sel[i] ? kept[i % kept.size()] : 0.0;
  return total / (double(w.batch * w.kv_heads) * double(w.seqlen_q) * double(w.seqlen_k));
}

HostData make_host_data(const Workload& w, bool backward) {
  HostData h;
  const size_t esize = fsa::dtype_size(w.dtype);
  const int64_t nq = w.batch * w.seqlen_q * w.heads * w.head_dim;
  const int64_t nk = w.batch * w.seqlen_k * w.kv_heads * w.head_dim;
  h.q.resize(size_t(nq) * esize);
  h.k.resize(size_t(nk) * esize);
  h.v.resize(size_t(nk) * esize);
  fill_normal(h.q.data(), w.dtype, nq, 1);
  fill_normal(h.k.data(), w.dtype, nk, 2);
  fill_normal(h.v.data(), w.dtype, nk, 3);
  if (backward) {
    h.dout.resize(h.q.size());
    fill_normal(h.dout.data(), w.dtype, nq, 4);
  }
  if (w.has_bias()) {  // -softplus(N(0, 1)): a learned log-decay-like per-key bias
    const DType bdt = w.bias_dtype.value_or(w.dtype);
    const int64_t nb = w.batch * w.kv_heads * w.seqlen_k;
    h.bias.resize(size_t(nb) * fsa::dtype_size(bdt));
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int64_t i = 0; i < nb; ++i)
      store(h.bias.data(), bdt, i, -std::log1p(std::exp(normal(rng))));
  }
  if (w.key_mask_every > 0) {
    h.mask.resize(size_t(w.batch * w.seqlen_k));
    for (int64_t b = 0; b < w.batch; ++b) {
      for (int64_t j = 0; j < w.seqlen_k; ++j) {
        h.mask[size_t(b * w.seqlen_k + j)] = (j / w.select_block) % w.key_mask_every == 0;
      }
    }
  }
  if (w.has_selection()) {
    const int64_t bs = w.select_block;
    const int64_t mb = (w.seqlen_q + bs - 1) / bs, nb = (w.seqlen_k + bs - 1) / bs;
    h.selection.assign(size_t(w.batch * w.kv_heads * mb * nb), 0);
    fsa::BlockSelectArgs a;
    a.attn_bias = TensorView::contiguous(h.bias.data(), w.bias_dtype.value_or(w.dtype),
                                         {w.batch, w.kv_heads, 1, w.seqlen_k});
    a.seqlen_q = w.seqlen_q;
    a.block_m = a.block_n = w.select_block;
    a.reduce = fsa::BlockReduce::kMean;
    a.is_causal = w.causal;
    a.out = TensorView::contiguous(h.selection.data(), DType::kBool, {w.batch, w.kv_heads, mb, nb});
    auto density_at = [&](int64_t k) {
      a.top_k = k;
      fsa::select_blocks(a);
      return selection_density(h.selection, w);
    };
    int64_t k = w.top_k;
    if (k < 0) {  // the density grows with k: the smallest k reaching the target, or the one below
      int64_t lo = 0, hi = nb;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (density_at(mid) >= w.density)
          hi = mid;
        else
          lo = mid + 1;
      }
      k = lo;
      if (k > 0 && w.density - density_at(k - 1) < density_at(k) - w.density) --k;
    }
    h.selection_density = density_at(k);
    h.top_k = k;
  }
  return h;
}

// One rotated copy of everything a call touches, in device memory.
struct Buffers {
  void *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr, *lse = nullptr;
  void *bias = nullptr, *mask = nullptr;
  void *dout = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr, *dbias = nullptr;
};

size_t set_bytes(const Workload& w, const HostData& h, bool backward) {
  size_t bytes = 2 * h.q.size() + h.k.size() + h.v.size() + h.bias.size() + h.mask.size();
  if (backward)
    bytes += size_t(w.batch * w.heads * w.seqlen_q) * 4 + 2 * h.q.size() + h.k.size() + h.v.size() +
             h.bias.size();
  return bytes;
}

}  // namespace

// ---- run -------------------------------------------------------------------------------------

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kForward: return "fwd";
    case Mode::kBackward: return "bwd";
    case Mode::kForwardBackward: return "fwd+bwd";
  }
  return "?";
}

std::string describe(const Workload& w) {
  std::ostringstream s;
  s << "(" << w.batch << "," << w.seqlen_q << "," << w.seqlen_k << "," << w.heads << ","
    << w.kv_heads << "," << w.head_dim << ")" << (w.causal ? " causal" : "") << " "
    << dtype_name(w.dtype);
  if (w.has_bias()) s << ", bias (B,Hk,1,Sk) " << dtype_name(w.bias_dtype.value_or(w.dtype));
  if (w.density > 0) s << ", block selection for density " << w.density;
  if (w.top_k >= 0) s << ", block selection top-" << w.top_k;
  if (w.key_mask_every > 0) s << ", key mask: 1 of " << w.key_mask_every << " key blocks";
  if (w.has_selection() || w.key_mask_every > 0) s << " (" << w.select_block << "-blocks)";
  return s.str();
}

Result run_workload(const Workload& w, const std::vector<Mode>& modes, const Timing& timing) {
  validate(w, modes, timing);
  // Declared first: the device (stream, memory) outlives the plans and views below.
  std::unique_ptr<BenchDevice> device = open_device(timing);
  const bool backward =
      std::any_of(modes.begin(), modes.end(), [](Mode m) { return m != Mode::kForward; });
  HostData host = make_host_data(w, backward);
  const double selection_density_host = host.selection_density;
  const fsa::Device dev = device->id();
  const DType bias_dtype = w.bias_dtype.value_or(w.dtype);
  const int64_t B = w.batch, Sq = w.seqlen_q, Sk = w.seqlen_k, H = w.heads, Hk = w.kv_heads,
                D = w.head_dim;

  Result result;
  result.device_name = device->name();
  result.dense_density = unmasked_density(w);
  result.top_k = host.top_k;

  // Cold cache: how many rotated sets.
  const double ws = double(set_bytes(w, host, backward)), cache = double(device->cache_bytes());
  CachePolicy policy = timing.cache;
  int64_t sets = 1;
  const std::string cache_desc = device->cache_name() + " " + format("%.1f MiB", cache / kMiB);
  if (policy == CachePolicy::kRotate) {
    if (cache <= 0) {
      result.cache = "warm: " + device->cache_name() + " size unknown, one input set";
      policy = CachePolicy::kWarm;
    } else if (ws >= kColdFactor * cache) {
      result.cache = "cold: working set " + format("%.1f MiB", ws / kMiB) + " >= 2x " + cache_desc +
                     ", one input set";
    } else {
      sets = int64_t(std::ceil(kColdFactor * cache / ws)) + 1;
      if (sets > kMaxSets) {
        sets = 1;
        policy = CachePolicy::kFlush;
      } else {
        result.cache = "cold: " + std::to_string(sets) + " rotated input sets (working set " +
                       format("%.2f MiB", ws / kMiB) + " < 2x " + cache_desc + ")";
      }
    }
  }
  if (policy == CachePolicy::kFlush) {
    result.cache = "cold: " + format("%.0f MiB", double(device->flush_bytes()) / kMiB) +
                   " buffer written between calls (untimed; working set " +
                   format("%.2f MiB", ws / kMiB) + ", " + cache_desc + ")";
  } else if (policy == CachePolicy::kWarm && timing.cache == CachePolicy::kWarm) {
    result.cache = "warm: one input set, no flush (--l2 warm)";
  }

  // Every buffer of every set, before any timing.
  const size_t q_bytes = host.q.size(), k_bytes = host.k.size();
  const size_t lse_bytes = size_t(B * H * Sq) * 4;
  std::vector<Buffers> buf(static_cast<size_t>(sets));
  for (Buffers& b : buf) {
    b.q = device->alloc(q_bytes);
    b.k = device->alloc(k_bytes);
    b.v = device->alloc(k_bytes);
    b.out = device->alloc(q_bytes);
    device->upload(b.q, host.q.data(), q_bytes);
    device->upload(b.k, host.k.data(), k_bytes);
    device->upload(b.v, host.v.data(), k_bytes);
    if (backward) b.lse = device->alloc(lse_bytes);
    if (!host.bias.empty()) {
      b.bias = device->alloc(host.bias.size());
      device->upload(b.bias, host.bias.data(), host.bias.size());
    }
    if (!host.mask.empty()) {
      b.mask = device->alloc(host.mask.size());
      device->upload(b.mask, host.mask.data(), host.mask.size());
    }
    if (backward) {
      b.dout = device->alloc(q_bytes);
      device->upload(b.dout, host.dout.data(), q_bytes);
      b.dq = device->alloc(q_bytes);
      b.dk = device->alloc(k_bytes);
      b.dv = device->alloc(k_bytes);
      if (b.bias) b.dbias = device->alloc(host.bias.size());
    }
  }
  void* selection = nullptr;
  const int64_t mb = (Sq + w.select_block - 1) / w.select_block;
  const int64_t nb = (Sk + w.select_block - 1) / w.select_block;
  if (!host.selection.empty()) {
    selection = device->alloc(host.selection.size());
    device->upload(selection, host.selection.data(), host.selection.size());
  }
  host = HostData{};  // the host copies are no longer needed
  device->sync();

  std::vector<fsa::ForwardArgs> fwd(static_cast<size_t>(sets));
  std::vector<fsa::BackwardArgs> bwd(static_cast<size_t>(sets));
  for (int64_t s = 0; s < sets; ++s) {
    const Buffers& b = buf[size_t(s)];
    fsa::ForwardArgs& a = fwd[size_t(s)];
    a.query = TensorView::contiguous(b.q, w.dtype, {B, Sq, H, D}, dev);
    a.key = TensorView::contiguous(b.k, w.dtype, {B, Sk, Hk, D}, dev);
    a.value = TensorView::contiguous(b.v, w.dtype, {B, Sk, Hk, D}, dev);
    a.out = TensorView::contiguous(b.out, w.dtype, {B, Sq, H, D}, dev);
    // The LSE is written when a backward will need it (a training forward), not for inference.
    if (b.lse) a.lse = TensorView::contiguous(b.lse, DType::kFloat32, {B, H, Sq}, dev);
    if (b.bias) a.attn_bias = TensorView::contiguous(b.bias, bias_dtype, {B, Hk, 1, Sk}, dev);
    if (b.mask) a.attn_mask = TensorView::contiguous(b.mask, DType::kBool, {B, 1, 1, Sk}, dev);
    a.options.is_causal = w.causal;
    a.stream = device->stream();
    if (!backward) continue;
    fsa::BackwardArgs& g = bwd[size_t(s)];
    g.query = a.query, g.key = a.key, g.value = a.value, g.out = a.out, g.lse = *a.lse;
    g.attn_mask = a.attn_mask, g.attn_bias = a.attn_bias, g.options = a.options;
    g.dout = TensorView::contiguous(b.dout, w.dtype, {B, Sq, H, D}, dev);
    g.dquery = TensorView::contiguous(b.dq, w.dtype, {B, Sq, H, D}, dev);
    g.dkey = TensorView::contiguous(b.dk, w.dtype, {B, Sk, Hk, D}, dev);
    g.dvalue = TensorView::contiguous(b.dv, w.dtype, {B, Sk, Hk, D}, dev);
    if (b.dbias) g.dbias = TensorView::contiguous(b.dbias, bias_dtype, {B, Hk, 1, Sk}, dev);
    g.stream = device->stream();
  }

  auto before = [&](int) {
    if (policy == CachePolicy::kFlush) device->flush();
  };
  auto set_of = [&](int i) { return size_t(i % sets); };

  // The plan serving every set (same shapes, mask and selection contents), then make_plan timed
  // alone (one plan object per call, so that no plan is freed inside a timed region).
  fsa::PlanOptions po;
  po.stream = device->stream();
  if (selection) {
    po.block_mask = TensorView::contiguous(selection, DType::kBool, {B, Hk, mb, nb}, dev);
    po.block_mask_m = po.block_mask_n = w.select_block;
  }
  fsa::Plan plan;
  try {
    plan = fsa::make_plan(fwd[0].query, fwd[0].key, fwd[0].attn_mask, w.causal, po);
  } catch (const fsa::Error& e) {  // a selection block that is not a multiple of the plan's tiles
    if (e.argument().rfind("block_mask", 0) == 0) {
      throw UsageError("--select-block: " + std::string(e.what()));
    }
    throw;
  }
  {
    // The previous call's plan is released between calls (untimed), as a training step releases
    // the last step's: the pool then serves each plan from memory it keeps.
    std::vector<fsa::Plan> plans(size_t(timing.warmup + timing.reps));
    auto release_previous = [&](int i) {
      before(i);
      if (i > 0) plans[size_t(i - 1)] = fsa::Plan();
    };
    const std::vector<double> plan_ms =
        device->time(timing.warmup, timing.reps, release_previous, [&](int i) {
          const fsa::ForwardArgs& a = fwd[set_of(i)];
          plans[size_t(i)] = fsa::make_plan(a.query, a.key, a.attn_mask, w.causal, po);
        });
    Row plan_row;
    plan_row.kind = "plan";
    plan_row.time = summarize(plan_ms);
    result.rows.push_back(plan_row);
  }
  device->sync();
  result.density = plan.kept_density();
  if (result.top_k >= 0 && std::abs(result.density - selection_density_host) > 1e-9) {
    std::fprintf(stderr, "warning: planned density %.9f differs from the selection's %.9f\n",
                 result.density, selection_density_host);
  }
  for (auto& a : fwd) a.plan = &plan;
  for (auto& g : bwd) g.plan = &plan;

  if (backward) {  // valid out / LSE for the backward, in every set
    for (const auto& a : fwd) fsa::forward(a);
    device->sync();
  }
  const double fwd_flops = 4.0 * double(Sq) * double(Sk) * double(D) * double(H) * double(B);
  for (Mode mode : modes) {
    std::function<void(int)> body;
    double factor = 1.0;
    switch (mode) {
      case Mode::kForward: body = [&](int i) { fsa::forward(fwd[set_of(i)]); }; break;
      case Mode::kBackward:
        body = [&](int i) { fsa::backward(bwd[set_of(i)]); };
        factor = 2.5;
        break;
      case Mode::kForwardBackward:
        body = [&](int i) {
          fsa::forward(fwd[set_of(i)]);
          fsa::backward(bwd[set_of(i)]);
        };
        factor = 3.5;
        break;
    }
    device->sync();
    device->reset_pool_peak();
    Row row;
    row.kind = mode_name(mode);
    row.time = summarize(device->time(timing.warmup, timing.reps, before, body));
    row.pool_peak_bytes = device->pool_peak_bytes();
    row.flops = factor * fwd_flops * result.density;
    row.dense_flops = factor * fwd_flops * result.dense_density;
    if (mode == Mode::kForward && Sq == 1) {  // decode: kept K and V rows, read once each
      row.kv_bytes =
          result.density * double(B * Sk * Hk * D) * 2.0 * double(fsa::dtype_size(w.dtype));
    }
    result.rows.push_back(row);
  }
  device->sync();
  result.method = device->clock() + "; " + std::to_string(timing.warmup) + " warmup + " +
                  std::to_string(timing.reps) + " timed calls; median (min, p90) ms; " +
                  device->pool_note();
  return result;
}

// ---- output ----------------------------------------------------------------------------------

void print_header(const Result& r, const std::string& what) {
  std::printf("fsa bench: %s on %s\n", what.c_str(), r.device_name.c_str());
  std::printf("method: %s\n", r.method.c_str());
  std::string on;  // kernel experiments compiled in (src/cuda/experiments.h): a default build none
  for (const auto& e : fsa::cuda_kernel_experiments()) {
    if (e.value != 0) on += " " + e.name + "=" + std::to_string(e.value);
  }
  if (!on.empty()) std::printf("kernel experiments:%s\n", on.c_str());
}

void print_table_columns(const char* first, int width) {
  std::printf("%-*s %9s %9s %9s %9s %9s %8s %8s\n", width, first, "ms", "min", "p90", "TFLOP/s",
              "dense-eq", "density", "GB/s");
}

void print_row(const std::string& label, const Row& row, const Result& r, int width) {
  std::printf("%-*s %9.3f %9.3f %9.3f", width, label.c_str(), row.time.median_ms, row.time.min_ms,
              row.time.p90_ms);
  if (row.kind != "plan") {
    const double s = row.time.median_ms * 1e-3;
    std::printf(" %9.3f %9.3f %7.2f%%", row.flops / s * 1e-12, row.dense_flops / s * 1e-12,
                100.0 * r.density);
    if (row.kv_bytes > 0) std::printf(" %8.0f", row.kv_bytes / s * 1e-9);
  }
  std::printf("\n");
}

namespace {
std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}
std::string json_number(double x) {
  if (!std::isfinite(x)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", x);
  return buf;
}
}  // namespace

void print_json(const std::string& name, const Row& row, const Result& r, const Workload& w,
                const Timing& t) {
  const double s = row.time.median_ms * 1e-3;
  const bool timed_call = row.kind != "plan";
  std::ostringstream o;
  o << "{\"name\": " << json_string(name) << ", \"kind\": " << json_string(row.kind)
    << ", \"backend\": " << json_string(t.device == fsa::DeviceType::kCPU ? "cpu" : "cuda")
    << ", \"device\": " << json_string(r.device_name) << ", \"B\": " << w.batch
    << ", \"Sq\": " << w.seqlen_q << ", \"Sk\": " << w.seqlen_k << ", \"H\": " << w.heads
    << ", \"Hk\": " << w.kv_heads << ", \"D\": " << w.head_dim
    << ", \"causal\": " << (w.causal ? "true" : "false")
    << ", \"dtype\": " << json_string(dtype_name(w.dtype)) << ", \"bias\": "
    << (w.has_bias() ? json_string(dtype_name(w.bias_dtype.value_or(w.dtype))) : "null")
    << ", \"density_target\": " << (w.density > 0 ? json_number(w.density) : "null")
    << ", \"top_k\": " << (r.top_k >= 0 ? std::to_string(r.top_k) : "null")
    << ", \"select_block\": " << w.select_block << ", \"key_mask_every\": "
    << (w.key_mask_every > 0 ? std::to_string(w.key_mask_every) : "null")
    << ", \"density\": " << json_number(r.density)
    << ", \"dense_density\": " << json_number(r.dense_density)
    << ", \"ms\": " << json_number(row.time.median_ms)
    << ", \"ms_min\": " << json_number(row.time.min_ms)
    << ", \"ms_p90\": " << json_number(row.time.p90_ms) << ", \"reps\": " << t.reps
    << ", \"warmup\": " << t.warmup
    << ", \"tflops\": " << (timed_call ? json_number(row.flops / s * 1e-12) : "null")
    << ", \"dense_tflops\": " << (timed_call ? json_number(row.dense_flops / s * 1e-12) : "null")
    << ", \"gbps\": " << (row.kv_bytes > 0 ? json_number(row.kv_bytes / s * 1e-9) : "null")
    << ", \"pool_peak_mib\": "
    << (row.pool_peak_bytes >= 0 ? json_number(row.pool_peak_bytes / kMiB) : "null")
    << ", \"cache\": " << json_string(r.cache) << ", \"method\": " << json_string(r.method) << "}";
  std::printf("%s\n", o.str().c_str());
}

// ---- command line ----------------------------------------------------------------------------

std::string usage(const char* program) {
  return std::string("usage: ") + program +
         " --shape B,Sq,Sk,H,Hk,D [options]\n"
         "  --causal                  bottom-right causal\n"
         "  --dtype bf16|fp16|fp32    q/k/v dtype (default bf16; fp32 with --device cpu only)\n"
         "  --density P               trainable-mask workload: bias (B,Hk,1,Sk); per query block\n"
         "                            the diagonal + the top-k key blocks by mean bias, k chosen\n"
         "                            so that the planned density (fraction of all Sq x Sk\n"
         "                            entries) is closest to P\n"
         "  --top-k K                 the same with k given\n"
         "  --select-block N          selection / key-mask block size (default 128)\n"
         "  --key-mask-every N        key-only mask (B,1,1,Sk) keeping every N-th key block\n"
         "  --bias                    add a (B,Hk,1,Sk) bias (implied by --density / --top-k)\n"
         "  --bias-dtype fp32|bf16|fp16  default: the query dtype\n"
         "  --mode fwd,bwd,fwdbwd     one or more, comma-separated (default fwd)\n"
         "  --reps N                  timed calls (default 20)\n"
         "  --warmup N                untimed calls first (default 5)\n"
         "  --l2 rotate|flush|warm    cold cache by rotated input sets (default) or a flush\n"
         "  --device cuda|cpu         default cuda when built with CUDA\n"
         "  --threads N               CPU backend threads\n"
         "  --name LABEL              row label prefix\n"
         "  --json                    one JSON object per row instead of the table\n";
}

namespace {

int64_t parse_int(const std::string& flag, const std::string& text, int64_t min) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || v < min) {
    throw UsageError(flag + ": expected an integer >= " + std::to_string(min) + ", got '" + text +
                     "'");
  }
  return v;
}

DType parse_dtype(const std::string& flag, const std::string& text) {
  if (text == "bf16") return DType::kBFloat16;
  if (text == "fp16") return DType::kFloat16;
  if (text == "fp32") return DType::kFloat32;
  throw UsageError(flag + ": expected bf16, fp16 or fp32, got '" + text + "'");
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(text);
  while (std::getline(in, part, sep)) parts.push_back(part);
  if (!text.empty() && text.back() == sep) parts.emplace_back();
  return parts;
}

}  // namespace

void parse_cli(const std::vector<std::string>& args, Cli& cli) {
  Workload& w = cli.workload;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string flag = args[i], value;
    bool has_value = false;
    if (const size_t eq = flag.find('='); flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      has_value = true;
    }
    auto next = [&](const char* expected) -> std::string {
      if (has_value) return value;
      if (i + 1 >= args.size())
        throw UsageError(flag + ": missing value (expected " + expected + ")");
      return args[++i];
    };
    auto no_value = [&] {
      if (has_value) throw UsageError(flag + ": takes no value");
    };
    if (flag == "--shape") {
      const std::string text = next("B,Sq,Sk,H,Hk,D");
      const auto parts = split(text, ',');
      if (parts.size() != 6) {
        throw UsageError("--shape: expected six comma-separated integers B,Sq,Sk,H,Hk,D, got '" +
                         text + "'");
      }
      const char* names[] = {"B", "Sq", "Sk", "H", "Hk", "D"};
      int64_t v[6];
      for (int d = 0; d < 6; ++d)
        v[d] = parse_int(std::string("--shape ") + names[d], parts[size_t(d)], 1);
      w.batch = v[0], w.seqlen_q = v[1], w.seqlen_k = v[2], w.heads = v[3], w.kv_heads = v[4],
      w.head_dim = v[5];
      cli.has_shape = true;
    } else if (flag == "--causal") {
      no_value();
      w.causal = true;
    } else if (flag == "--dtype") {
      w.dtype = parse_dtype(flag, next("bf16, fp16 or fp32"));
    } else if (flag == "--density") {
      const std::string text = next("a fraction in (0, 1]");
      char* end = nullptr;
      const double p = std::strtod(text.c_str(), &end);
      if (text.empty() || *end != '\0' || !(p > 0 && p <= 1)) {
        throw UsageError(
            "--density: expected a fraction of all Sq x Sk entries in (0, 1], e.g. "
            "0.1, got '" +
            text + "'");
      }
      w.density = p;
    } else if (flag == "--top-k") {
      w.top_k = parse_int(flag, next("an integer >= 0"), 0);
    } else if (flag == "--select-block") {
      w.select_block = int(parse_int(flag, next("an integer >= 1"), 1));
    } else if (flag == "--key-mask-every") {
      w.key_mask_every = parse_int(flag, next("an integer >= 1"), 1);
    } else if (flag == "--bias") {
      no_value();
      w.bias = true;
    } else if (flag == "--bias-dtype") {
      w.bias_dtype = parse_dtype(flag, next("fp32, bf16 or fp16"));
    } else if (flag == "--mode") {
      const std::string text = next("fwd, bwd or fwdbwd, comma-separated");
      cli.modes.clear();
      for (const std::string& m : split(text, ',')) {
        Mode mode;
        if (m == "fwd")
          mode = Mode::kForward;
        else if (m == "bwd")
          mode = Mode::kBackward;
        else if (m == "fwdbwd" || m == "fwd+bwd")
          mode = Mode::kForwardBackward;
        else
          throw UsageError("--mode: expected fwd, bwd or fwdbwd (comma-separated), got '" + m +
                           "'");
        if (std::find(cli.modes.begin(), cli.modes.end(), mode) == cli.modes.end()) {
          cli.modes.push_back(mode);
        }
      }
    } else if (flag == "--reps") {
      cli.timing.reps = int(parse_int(flag, next("an integer >= 1"), 1));
    } else if (flag == "--warmup") {
      cli.timing.warmup = int(parse_int(flag, next("an integer >= 0"), 0));
    } else if (flag == "--l2") {
      const std::string text = next("rotate, flush or warm");
      if (text == "rotate")
        cli.timing.cache = CachePolicy::kRotate;
      else if (text == "flush")
        cli.timing.cache = CachePolicy::kFlush;
      else if (text == "warm")
        cli.timing.cache = CachePolicy::kWarm;
      else
        throw UsageError("--l2: expected rotate, flush or warm, got '" + text + "'");
    } else if (flag == "--device") {
      const std::string text = next("cuda or cpu");
      if (text == "cuda")
        cli.timing.device = fsa::DeviceType::kCUDA;
      else if (text == "cpu")
        cli.timing.device = fsa::DeviceType::kCPU;
      else
        throw UsageError("--device: expected cuda or cpu, got '" + text + "'");
    } else if (flag == "--threads") {
      cli.timing.threads = int(parse_int(flag, next("an integer >= 1"), 1));
    } else if (flag == "--name") {
      cli.name = next("a label");
    } else if (flag == "--json") {
      no_value();
      cli.json = true;
    } else {
      throw UsageError("unknown argument '" + args[i] + "'");
    }
  }
}

int run_cli(const Cli& cli) {
  if (!cli.has_shape) throw UsageError("--shape: required (B,Sq,Sk,H,Hk,D)");
  const Result r = run_workload(cli.workload, cli.modes, cli.timing);
  const std::string name = cli.name.empty() ? describe(cli.workload) : cli.name;
  if (!cli.json) {
    print_header(r, name);
    std::printf("cache: %s\n", r.cache.c_str());
    if (r.top_k >= 0) {
      std::printf(
          "selection: top-%lld key blocks of %d by mean bias per query block%s; planned "
          "density %.2f%%\n",
          (long long)r.top_k, cli.workload.select_block,
          cli.workload.causal ? " + the diagonal" : "", 100.0 * r.density);
    }
    print_table_columns("", 8);
  }
  for (const Row& row : r.rows) {
    if (cli.json)
      print_json(name, row, r, cli.workload, cli.timing);
    else
      print_row(row.kind, row, r, 8);
  }
  return 0;
}

int cli_main(const char* program, const std::vector<std::string>& args, Cli cli) {
  for (const std::string& a : args) {
    if (a == "--help" || a == "-h") {
      std::printf("%s", usage(program).c_str());
      return 0;
    }
  }
  try {
    parse_cli(args, cli);
    return run_cli(cli);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: %s (--help lists the flags)\n", program, e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return 1;
  }
}

}  // namespace fsa_bench
