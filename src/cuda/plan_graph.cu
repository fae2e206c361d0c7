// Per-row top-k planning replayed from a CUDA graph (cuda_backend.h, make_device_topk_plan).
//
// Planning a per-row top-k call launches about 22 kernels, 9 memsets and two cub sorts, and takes
// 15 pool allocations: about 0.2 ms of host time on an H200 host, more than its kernels take at
// the reference's shape, and the call's first kernels wait on it. None of its host decisions read
// the device, so the sequence is a function of the shapes: captured once per (shape, stream) into
// a graph whose memory is one allocation (the arena the capture carves its buffers from, and a
// dense copy of the bias that the graph reads), then replayed with one copy kernel and one graph
// launch. A replayed plan owns its instance (a lease) until the plan is freed; a shape with every
// instance leased captures another, up to kMaxInstances, then plans eagerly. At most kMaxGraphs
// instances are held over every shape (varlen calls plan one shape per document length): the
// idle ones of the least recently planned shapes go first.
//
// The first plan of a shape runs eagerly and measures the arena it needs; the second captures.
// FSA_CUDA_PLAN_GRAPH=0 always plans eagerly (A/B measurements, docs/perf.md).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "cuda/check.h"
#include "cuda/cuda_backend.h"
#include "cuda/device_arch.h"
#include "cuda/device_plan.h"
#include "cuda/memory_pool.h"
#include "cuda/plan_graph.h"

namespace fsa::detail::cuda {
namespace {

constexpr int kMaxInstances = 32;  // leased plans of one shape (e.g. the layers of a step)
constexpr int kMaxGraphs = 64;     // instances over every shape

bool plan_graphs_enabled() {
  static const bool enabled = !env_is("FSA_CUDA_PLAN_GRAPH", "0");
  return enabled;
}

// Everything the planning's host code decides by: the problem's shapes, the bias's read extents
// and dtype (the graph reads a dense copy), the selection, the tiles; and where it runs (a leased
// instance is reused only on its stream, where the plan's last use is ordered before the reuse).
struct GraphKey {
  int device = 0;
  uintptr_t stream = 0;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, num_heads = 0, num_kv_heads = 0;
  int dtype = 0;
  int64_t bias_batch = 0, bias_heads = 0, bias_keys = 0, head_group = 0;
  bool is_causal = false;
  int64_t topk = 0;
  double min_value = 0.0;
  int block_m = 0, block_n = 0;

  auto tie() const {
    return std::tie(device, stream, batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, dtype,
                    bias_batch, bias_heads, bias_keys, head_group, is_causal, topk, min_value,
                    block_m, block_n);
  }
  bool operator<(const GraphKey& other) const { return tie() < other.tie(); }
};

// One replayable copy of a plan: its memory, its graph and the host side of the captured plan.
struct Instance {
  void* memory = nullptr;  // cudaMalloc: the arena, then the dense bias
  void* bias = nullptr;    // the dense bias copy the graph reads
  size_t bytes = 0;        // of `memory`
  cudaGraphExec_t exec = nullptr;
  DeviceTopkPlan plan;  // pointers into `memory`
  std::atomic<bool> leased{false};

  Instance() = default;
  Instance(const Instance&) = delete;
  Instance& operator=(const Instance&) = delete;
  ~Instance() {
    plan = {};
    if (exec) cudaGraphExecDestroy(exec);
    if (memory) cudaFree(memory);
  }
};

struct Entry {
  size_t arena_bytes = 0;  // measured by the shape's first plan; 0 before
  bool failed = false;     // a capture failed: this shape plans eagerly
  uint64_t last_use = 0;   // when this shape was last planned (use_clock)
  std::vector<std::shared_ptr<Instance>> instances;
};

std::mutex graphs_mutex;  // guards graphs, use_clock and every Entry; leases are taken under it
uint64_t use_clock = 0;
thread_local bool t_capturing = false;  // this thread is inside capture(): CaptureBranches fork
// Never destroyed: instances may outlive static destruction through plans held by the caller.
auto* graphs = new std::map<GraphKey, Entry>();

// Private streams per device: 0 to capture on (the caller's may be the legacy default stream,
// which cannot be captured), then CaptureBranches' branches. Only a capture uses them, under
// graphs_mutex.
constexpr int kCaptureStreams = 1 + CaptureBranches::kBranches;
cudaStream_t capture_stream(int device, int which = 0) {
  static std::vector<cudaStream_t> streams;
  if (device * kCaptureStreams >= int(streams.size())) {
    streams.resize((device + 1) * kCaptureStreams, nullptr);
  }
  cudaStream_t& s = streams[device * kCaptureStreams + which];
  if (!s) FSA_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return s;
}

// The bias as the graph reads it: (bias_batch, bias_heads, keys) dense, broadcast dims kept.
BroadcastOperand dense_bias(const BroadcastOperand& bias, void* data) {
  BroadcastOperand d = bias;
  d.data = data;
  const int64_t heads = bias.read_extent(1), keys = bias.read_extent(3);
  d.read_stride[3] = keys == 1 ? 0 : 1;
  d.read_stride[2] = 0;
  d.read_stride[1] = heads == 1 ? 0 : keys;
  d.read_stride[0] = bias.read_extent(0) == 1 ? 0 : heads * keys;
  for (int i = 0; i < 4; ++i) d.stride[i] = d.read_stride[i];
  return d;
}

struct BiasCopy {
  const void* src;
  void* dst;
  int64_t stride_b, stride_h, stride_k;  // source read strides (elements)
  int heads, keys;                       // destination extents: (lists / heads, heads, keys)
};

template <class Bits>
__global__ void copy_bias_kernel(BiasCopy c) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= c.keys) return;
  const int64_t b = blockIdx.y / c.heads, h = blockIdx.y % c.heads;
  static_cast<Bits*>(c.dst)[int64_t(blockIdx.y) * c.keys + j] =
      static_cast<const Bits*>(c.src)[b * c.stride_b + h * c.stride_h + j * c.stride_k];
}

void copy_bias(const BroadcastOperand& bias, void* dst, cudaStream_t stream) {
  const int64_t batch = bias.read_extent(0), heads = bias.read_extent(1),
                keys = bias.read_extent(3);
  if (batch * heads * keys == 0) return;
  const BiasCopy c{bias.data,          dst, bias.read_stride[0], bias.read_stride[1],
                   bias.read_stride[3], int(heads), int(keys)};
  const dim3 grid(unsigned((keys + 255) / 256), unsigned(batch * heads));
  if (bias.dtype == DType::kFloat32) {
    copy_bias_kernel<uint32_t><<<grid, 256, 0, stream>>>(c);
  } else {
    copy_bias_kernel<uint16_t><<<grid, 256, 0, stream>>>(c);
  }
  FSA_CUDA_CHECK(cudaGetLastError());
}

size_t dense_bias_bytes(const BroadcastOperand& bias) {
  return size_t(bias.read_extent(0) * bias.read_extent(1) * bias.read_extent(3)) *
         dtype_size(bias.dtype);
}

// Captures `build` over the instance's dense bias into a new instance (not yet run).
template <class Build>
std::shared_ptr<Instance> capture(size_t arena_bytes, const BroadcastOperand& bias, int device,
                                  const Build& build) {
  auto instance = std::make_shared<Instance>();
  instance->bytes = arena_bytes + std::max<size_t>(dense_bias_bytes(bias), 1);
  FSA_CUDA_CHECK(cudaMalloc(&instance->memory, instance->bytes));
  instance->bias = static_cast<uint8_t*>(instance->memory) + arena_bytes;
  const cudaStream_t stream = capture_stream(device);
  FSA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  cudaGraph_t graph = nullptr;
  try {
    const ScratchArena arena(instance->memory, arena_bytes);
    t_capturing = true;
    instance->plan = build(dense_bias(bias, instance->bias), stream);
    t_capturing = false;
  } catch (...) {
    t_capturing = false;
    cudaStreamEndCapture(stream, &graph);
    if (graph) cudaGraphDestroy(graph);
    throw;
  }
  FSA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  const cudaError_t instantiated = cudaGraphInstantiate(&instance->exec, graph, 0);
  cudaGraphDestroy(graph);
  FSA_CUDA_CHECK(instantiated);
  return instance;
}

// Room for one more instance: below kMaxGraphs over every shape, after dropping idle instances
// of the least recently planned shapes other than `keep` (a leased instance stays: its plan holds
// it). Under graphs_mutex.
bool make_room(const Entry* keep) {
  int64_t held = 0;
  std::vector<Entry*> order;
  for (auto& [key, entry] : *graphs) {
    held += int64_t(entry.instances.size());
    if (&entry != keep && !entry.instances.empty()) order.push_back(&entry);
  }
  std::sort(order.begin(), order.end(),
            [](const Entry* a, const Entry* b) { return a->last_use < b->last_use; });
  for (Entry* entry : order) {
    auto& instances = entry->instances;
    for (auto it = instances.begin(); it != instances.end() && held >= kMaxGraphs;) {
      if ((*it)->leased.load()) {
        ++it;
      } else {
        it = instances.erase(it);
        --held;
      }
    }
    if (held < kMaxGraphs) break;
  }
  return held < kMaxGraphs;
}

// The instance's plan for one call: its pieces' storage is the lease (which gives the instance
// back when the plan's last piece goes), its thresholds name the call's bias, and its map is read
// on the call's stream.
DeviceTopkPlan lease(const std::shared_ptr<Instance>& instance, const void* bias,
                     cudaStream_t stream) {
  std::shared_ptr<void> owner(instance->memory,
                              [instance](void*) { instance->leased.store(false); });
  const DeviceTopkPlan& captured = instance->plan;
  auto thresholds = std::make_shared<RowThresholds>(*captured.thresholds);
  thresholds->bias = bias;
  thresholds->storage = owner;
  auto compaction = std::make_shared<KeyCompaction>(*captured.compaction);
  compaction->storage = owner;  // (topk_storage is a CPU plan's)
  if (const DeviceBlockMap* map = compaction->plan.device_map()) {
    auto copy = std::make_shared<DeviceBlockMap>(*map);
    copy->storage = owner;
    copy->stream = stream;
    compaction->plan = PlanAccess::with_device_map(compaction->plan, std::move(copy));
  }
  return {std::move(thresholds), std::move(compaction)};
}

}  // namespace

CaptureBranches::CaptureBranches(cudaStream_t stream) : stream_(stream) {
  if (!t_capturing) return;  // only the library's own captures (their streams, under the lock)
  int device = 0;
  FSA_CUDA_CHECK(cudaGetDevice(&device));
  // The fork: an event recorded in a capture is a dependency of the graph, not a timed event.
  cudaEvent_t fork = nullptr;
  FSA_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  FSA_CUDA_CHECK(cudaEventRecord(fork, stream));
  for (int i = 0; i < kBranches; ++i) {
    side_[i] = capture_stream(device, 1 + i);
    FSA_CUDA_CHECK(cudaStreamWaitEvent(side_[i], fork, 0));
  }
  cudaEventDestroy(fork);
  forked_ = true;
}

CaptureBranches::~CaptureBranches() {
  if (!forked_) return;
  // Joined even while an exception unwinds: a capture ends only with its branches joined.
  for (cudaStream_t side : side_) {
    cudaEvent_t join = nullptr;
    if (cudaEventCreateWithFlags(&join, cudaEventDisableTiming) != cudaSuccess) continue;
    if (cudaEventRecord(join, side) == cudaSuccess) cudaStreamWaitEvent(stream_, join, 0);
    cudaEventDestroy(join);
  }
}

DeviceTopkPlan make_device_topk_plan(const Geometry& g, const BroadcastOperand& bias,
                                     bool is_causal, int64_t topk, double min_value, int block_m,
                                     int block_n, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  auto build = [&](const BroadcastOperand& b, cudaStream_t s) {
    DeviceTopkPlan plan;
    plan.thresholds = make_device_thresholds(g, b, std::nullopt, is_causal, topk, min_value, s);
    plan.compaction = make_device_topk_compaction(g, b, std::nullopt, is_causal,
                                                  plan.thresholds->view, topk, block_m, block_n, s);
    return plan;
  };
  if (!plan_graphs_enabled()) return build(bias, stream);
  // Inside the caller's own stream capture (e.g. a step captured with torch.cuda.graph) the
  // planning is captured into theirs, eagerly, as before.
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  FSA_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status != cudaStreamCaptureStatusNone) return build(bias, stream);

  GraphKey key;
  FSA_CUDA_CHECK(cudaGetDevice(&key.device));
  key.stream = reinterpret_cast<uintptr_t>(stream);
  key.batch = g.batch, key.seqlen_q = g.seqlen_q, key.seqlen_k = g.seqlen_k;
  key.num_heads = g.num_heads, key.num_kv_heads = g.num_kv_heads;
  key.dtype = int(bias.dtype);
  key.bias_batch = bias.read_extent(0), key.bias_heads = bias.read_extent(1);
  key.bias_keys = bias.read_extent(3), key.head_group = bias.head_group;
  key.is_causal = is_causal, key.topk = topk, key.min_value = min_value;
  key.block_m = block_m, key.block_n = block_n;

  std::shared_ptr<Instance> instance;
  {
    const std::lock_guard<std::mutex> lock(graphs_mutex);
    Entry& entry = (*graphs)[key];
    entry.last_use = ++use_clock;
    if (entry.failed) return build(bias, stream);
    if (entry.arena_bytes == 0) {  // the shape's first plan: eager, measuring its memory
      DeviceTopkPlan plan;
      {
        const ScratchArena measure;
        plan = build(bias, stream);
        entry.arena_bytes = std::max<size_t>(measure.bytes(), ScratchArena::kAlign);
      }
      return plan;
    }
    for (const auto& candidate : entry.instances) {
      bool expected = false;
      if (candidate->leased.compare_exchange_strong(expected, true)) {
        instance = candidate;
        break;
      }
    }
    if (!instance && int(entry.instances.size()) < kMaxInstances && make_room(&entry)) {
      try {
        instance = capture(entry.arena_bytes, bias, key.device, build);
      } catch (const Error& e) {
        entry.failed = true;
        std::fprintf(stderr,
                     "flash_sparse_attn: capturing per-row top-k planning failed (%s); this shape "
                     "plans eagerly from now on\n",
                     e.what());
        return build(bias, stream);
      }
      instance->leased.store(true);
      entry.instances.push_back(instance);
    }
  }
  if (!instance) return build(bias, stream);  // every instance (or graph) leased: plan eagerly
  DeviceTopkPlan plan = lease(instance, bias.data, stream);  // given back if a launch throws
  copy_bias(bias, instance->bias, stream);
  FSA_CUDA_CHECK(cudaGraphLaunch(instance->exec, stream));
  return plan;
}

CudaPlanGraphs plan_graphs() {
  const std::lock_guard<std::mutex> lock(graphs_mutex);
  CudaPlanGraphs held;
  for (const auto& [key, entry] : *graphs) {
    for (const auto& instance : entry.instances) {
      ++held.graphs;
      held.leased += instance->leased.load() ? 1 : 0;
      held.bytes += int64_t(instance->bytes);
    }
  }
  return held;
}

void release_plan_graphs() {
  const std::lock_guard<std::mutex> lock(graphs_mutex);
  for (auto& [key, entry] : *graphs) {
    // Leased instances go when their plans do.
    entry.instances.clear();
  }
}

}  // namespace fsa::detail::cuda
