// `fsa_bench --check` and `fsa_bench --bench` (CUDA builds): the CUDA forward and backward
// against the CPU backend on small shapes, and timings of the three workloads. Timing is
// bench/workload_bench.h's: CUDA events, warmup, median / min / p90, cold L2, no allocation in the
// timed loop. Peers (SDPA, FlexAttention) are timed by bench/sweep.py in the same gpu_check.sh run.
//
//   ./build/fsa_bench --check
//   ./build/fsa_bench --bench [--reps 20] [--warmup 5] [--l2 rotate|flush|warm] [--json]

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench_modes.h"
#include "fsa/fsa.h"
#include "workload_bench.h"

namespace {

#define CHECK_CUDA(call)                                                               \
  do {                                                                                 \
    cudaError_t e_ = (call);                                                           \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(1, host.size() * sizeof(T))));
  CHECK_CUDA(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

struct Case {
  const char* name;
  int64_t B, Sq, Sk, H, Hk, D;
  bool causal;
  int mask_kind;  // 0 none, 1 full (B,Hk,Sq,Sk) random 30% with False tiles, 2 key-only (B,1,1,Sk)
  int bias_kind;  // 0 none, 1 (B,Hk,1,Sk) fp32, 2 (B,H,Sq,Sk) bf16, 3 (1,1,Sq,1) fp32,
                  // 4 (1,Hk,Sq,Sk) bf16, 5 (B,1,Sq,Sk) fp32
  float softcap;
  bool deterministic = false;  // also: a second CUDA backward must be bitwise identical
  int dbias_pad = 0;  // the CUDA dbias's rows are padded by this many elements (a strided dbias;
                      // the padding must come back untouched)
};

fsa::Device cuda0() { return fsa::Device{fsa::DeviceType::kCUDA, 0}; }

bool run_check(const Case& c, std::mt19937& rng) {
  using fsa::DType;
  using fsa::TensorView;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::vector<uint16_t> q(size_t(c.B * c.Sq * c.H * c.D)), k(size_t(c.B * c.Sk * c.Hk * c.D)),
      v(k.size());
  for (auto& x : q) x = to_bf16(normal(rng));
  for (auto& x : k) x = to_bf16(normal(rng));
  for (auto& x : v) x = to_bf16(normal(rng));
  std::vector<uint8_t> mask;
  std::vector<int64_t> mshape;
  if (c.mask_kind == 1) {
    mshape = {c.B, c.Hk, c.Sq, c.Sk};
    mask.resize(size_t(c.B * c.Hk * c.Sq * c.Sk));
    for (size_t i = 0; i < mask.size(); ++i) {
      const int64_t j = int64_t(i) % c.Sk, r = (int64_t(i) / c.Sk) % c.Sq;
      const bool dead_tile = ((r / 64) + (j / 64)) % 3 == 0;  // whole False 64x64 tiles
      mask[i] = !dead_tile && uni(rng) < 0.3f;
    }
  } else if (c.mask_kind == 2) {
    mshape = {c.B, 1, 1, c.Sk};
    mask.resize(size_t(c.B * c.Sk));
    for (auto& x : mask) x = uni(rng) < 0.5f;
  }
  std::vector<float> bias32;
  std::vector<uint16_t> bias16;
  std::vector<int64_t> bshape;
  if (c.bias_kind == 1) {
    bshape = {c.B, c.Hk, 1, c.Sk};
    bias32.resize(size_t(c.B * c.Hk * c.Sk));
    for (auto& x : bias32) x = normal(rng);
  } else if (c.bias_kind == 2) {
    bshape = {c.B, c.H, c.Sq, c.Sk};
    bias16.resize(size_t(c.B * c.H * c.Sq * c.Sk));
    for (auto& x : bias16) x = to_bf16(normal(rng));
  } else if (c.bias_kind == 3) {
    bshape = {1, 1, c.Sq, 1};
    bias32.resize(size_t(c.Sq));
    for (auto& x : bias32) x = normal(rng);
  } else if (c.bias_kind == 4) {
    bshape = {1, c.Hk, c.Sq, c.Sk};
    bias16.resize(size_t(c.Hk * c.Sq * c.Sk));
    for (auto& x : bias16) x = to_bf16(normal(rng));
  } else if (c.bias_kind == 5) {
    bshape = {c.B, 1, c.Sq, c.Sk};
    bias32.resize(size_t(c.B * c.Sq * c.Sk));
    for (auto& x : bias32) x = normal(rng);
  }
  const bool bias16_kind = c.bias_kind == 2 || c.bias_kind == 4;

  auto view = [](void* p, DType t, const std::vector<int64_t>& s, fsa::Device dev) {
    return TensorView::contiguous(p, t, {s[0], s[1], s[2], s[3]}, dev);
  };
  auto make_args = [&](void* qp, void* kp, void* vp, void* mp, void* bp, void* op, void* lp,
                       fsa::Device dev) {
    fsa::ForwardArgs a;
    a.query = view(qp, DType::kBFloat16, {c.B, c.Sq, c.H, c.D}, dev);
    a.key = view(kp, DType::kBFloat16, {c.B, c.Sk, c.Hk, c.D}, dev);
    a.value = view(vp, DType::kBFloat16, {c.B, c.Sk, c.Hk, c.D}, dev);
    if (c.mask_kind) a.attn_mask = view(mp, DType::kBool, mshape, dev);
    if (c.bias_kind) {
      a.attn_bias = view(bp, bias16_kind ? DType::kBFloat16 : DType::kFloat32, bshape, dev);
    }
    a.options.is_causal = c.causal;
    a.options.softcap = c.softcap;
    a.options.deterministic = c.deterministic;
    a.out = view(op, DType::kBFloat16, {c.B, c.Sq, c.H, c.D}, dev);
    a.lse = TensorView::contiguous(lp, DType::kFloat32, {c.B, c.H, c.Sq}, dev);
    return a;
  };
  void* bias_host = bias16_kind ? static_cast<void*>(bias16.data()) : bias32.data();

  // CPU backend (fp32 accumulation from the same bf16 inputs).
  std::vector<uint16_t> out_cpu(q.size());
  std::vector<float> lse_cpu(size_t(c.B * c.H * c.Sq));
  fsa::forward(make_args(q.data(), k.data(), v.data(), mask.data(), bias_host, out_cpu.data(),
                         lse_cpu.data(), fsa::Device{}));

  // CUDA, outputs poisoned (NaN bit patterns) so unwritten elements show.
  uint16_t *dq = to_device(q), *dk = to_device(k), *dv = to_device(v);
  uint8_t* dm = to_device(mask);
  void* db = bias16_kind ? static_cast<void*>(to_device(bias16))
                         : static_cast<void*>(to_device(bias32));
  uint16_t* dout = nullptr;
  float* dlse = nullptr;
  CHECK_CUDA(cudaMalloc(&dout, std::max<size_t>(1, q.size() * 2)));
  CHECK_CUDA(cudaMalloc(&dlse, std::max<size_t>(1, lse_cpu.size() * 4)));
  CHECK_CUDA(cudaMemset(dout, 0xff, q.size() * 2));
  CHECK_CUDA(cudaMemset(dlse, 0xff, lse_cpu.size() * 4));
  std::string error;
  try {
    fsa::forward(make_args(dq, dk, dv, dm, db, dout, dlse, cuda0()));
    CHECK_CUDA(cudaDeviceSynchronize());
  } catch (const std::exception& e) {
    error = e.what();
  }
  const auto out_gpu = to_host(dout, q.size());
  const auto lse_gpu = to_host(dlse, lse_cpu.size());
  for (void* p : {static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dv),
                  static_cast<void*>(dm), db, static_cast<void*>(dout), static_cast<void*>(dlse)}) {
    cudaFree(p);
  }
  if (!error.empty()) {
    std::printf("%-40s ERROR %s\n", c.name, error.c_str());
    return false;
  }

  double max_err = 0, max_ref = 0, lse_err = 0;
  int64_t nan = 0, empty_mismatch = 0;
  for (size_t i = 0; i < out_gpu.size(); ++i) {
    const float g = from_bf16(out_gpu[i]), r = from_bf16(out_cpu[i]);
    if (std::isnan(g)) ++nan;
    max_err = std::max(max_err, double(std::abs(g - r)));
    max_ref = std::max(max_ref, double(std::abs(r)));
  }
  for (size_t i = 0; i < lse_gpu.size(); ++i) {
    if (std::isinf(lse_cpu[i]) || std::isinf(lse_gpu[i])) {
      empty_mismatch += lse_cpu[i] != lse_gpu[i];
      continue;
    }
    if (std::isnan(lse_gpu[i])) ++nan;
    lse_err = std::max(lse_err, double(std::abs(lse_gpu[i] - lse_cpu[i])));
  }
  // The GPU rounds P to bf16 before P.V (as every flash kernel does); the CPU keeps fp32. Their
  // difference is bounded by a few bf16 ulps of the output scale.
  const bool ok = nan == 0 && empty_mismatch == 0 && max_err <= 2e-2 * std::max(1.0, max_ref) &&
                  lse_err <= 1e-2;
  std::printf("%-40s %s  max|out diff| %.2e (|out| max %.2f)  max|lse diff| %.2e  nan %lld  "
              "empty-row mismatches %lld\n",
              c.name, ok ? "PASS" : "FAIL", max_err, max_ref, lse_err, (long long)nan,
              (long long)empty_mismatch);
  if (c.D > 128) return ok;  // the CUDA backward covers head_dim <= 128 for now

  // Backward: both backends from the CPU forward's out and LSE, the same dO.
  std::vector<uint16_t> dout_h(q.size());
  for (auto& x : dout_h) x = to_bf16(normal(rng));
  const size_t bias_elems = bias16_kind ? bias16.size() : bias32.size();
  const size_t bias_bytes = bias_elems * (bias16_kind ? 2 : 4);
  auto make_bwd = [&](void* qp, void* kp, void* vp, void* mp, void* bp, void* op, void* lp,
                      void* dop, void* dqp, void* dkp, void* dvp, void* dbp, fsa::Device dev) {
    const fsa::ForwardArgs f = make_args(qp, kp, vp, mp, bp, op, lp, dev);
    fsa::BackwardArgs a;
    a.query = f.query, a.key = f.key, a.value = f.value, a.out = f.out, a.lse = *f.lse;
    a.attn_mask = f.attn_mask, a.attn_bias = f.attn_bias, a.options = f.options;
    a.dout = view(dop, DType::kBFloat16, {c.B, c.Sq, c.H, c.D}, dev);
    a.dquery = view(dqp, DType::kBFloat16, {c.B, c.Sq, c.H, c.D}, dev);
    a.dkey = view(dkp, DType::kBFloat16, {c.B, c.Sk, c.Hk, c.D}, dev);
    a.dvalue = view(dvp, DType::kBFloat16, {c.B, c.Sk, c.Hk, c.D}, dev);
    const DType bt = bias16_kind ? DType::kBFloat16 : DType::kFloat32;
    if (c.bias_kind && (c.dbias_pad == 0 || dev.type != fsa::DeviceType::kCUDA)) {
      a.dbias = view(dbp, bt, bshape, dev);
    } else if (c.bias_kind) {
      const int64_t pitch = bshape[3] + c.dbias_pad;
      a.dbias = TensorView::strided(dbp, bt, {bshape[0], bshape[1], bshape[2], bshape[3]},
                                    {bshape[1] * bshape[2] * pitch, bshape[2] * pitch, pitch, 1},
                                    dev);
    }
    return a;
  };
  std::vector<uint16_t> dq_c(q.size()), dk_c(k.size()), dv_c(k.size());
  std::vector<uint8_t> dbias_c(bias_bytes);
  fsa::backward(make_bwd(q.data(), k.data(), v.data(), mask.data(), bias_host, out_cpu.data(),
                         lse_cpu.data(), dout_h.data(), dq_c.data(), dk_c.data(), dv_c.data(),
                         dbias_c.data(), fsa::Device{}));
  uint16_t *gq = to_device(q), *gk = to_device(k), *gv = to_device(v), *go = to_device(out_cpu),
           *gdo = to_device(dout_h);
  float* glse = to_device(lse_cpu);
  uint8_t* gm = to_device(mask);
  void* gb = bias16_kind ? static_cast<void*>(to_device(bias16)) : static_cast<void*>(to_device(bias32));
  uint16_t *gdq = nullptr, *gdk = nullptr, *gdv = nullptr;
  uint8_t* gdb = nullptr;
  CHECK_CUDA(cudaMalloc(&gdq, std::max<size_t>(2, q.size() * 2)));
  CHECK_CUDA(cudaMalloc(&gdk, std::max<size_t>(2, k.size() * 2)));
  CHECK_CUDA(cudaMalloc(&gdv, std::max<size_t>(2, k.size() * 2)));
  const size_t bias_elt = bias16_kind ? 2 : 4;
  const size_t dbias_rows = c.bias_kind ? size_t(bshape[0] * bshape[1] * bshape[2]) : 0;
  const size_t dbias_row_bytes = c.bias_kind ? size_t(bshape[3]) * bias_elt : 0;
  const size_t dbias_pitch_bytes = dbias_row_bytes + size_t(c.dbias_pad) * bias_elt;
  const size_t gdb_bytes = c.dbias_pad ? dbias_rows * dbias_pitch_bytes : bias_bytes;
  CHECK_CUDA(cudaMalloc(&gdb, std::max<size_t>(4, gdb_bytes)));
  CHECK_CUDA(cudaMemset(gdq, 0xff, q.size() * 2));  // NaN poison
  CHECK_CUDA(cudaMemset(gdk, 0xff, k.size() * 2));
  CHECK_CUDA(cudaMemset(gdv, 0xff, k.size() * 2));
  CHECK_CUDA(cudaMemset(gdb, 0xff, gdb_bytes));
  // The caller's dbias bytes, rows packed; for a padded dbias, whether its padding stayed 0xff.
  bool pad_untouched = true;
  auto dbias_bytes_of = [&](const std::vector<uint8_t>& raw) {
    if (!c.dbias_pad) return raw;
    std::vector<uint8_t> packed(bias_bytes);
    for (size_t r = 0; r < dbias_rows; ++r) {
      const uint8_t* row = raw.data() + r * dbias_pitch_bytes;
      std::memcpy(packed.data() + r * dbias_row_bytes, row, dbias_row_bytes);
      for (size_t x = dbias_row_bytes; x < dbias_pitch_bytes; ++x) pad_untouched &= row[x] == 0xff;
    }
    return packed;
  };
  std::string berror;
  try {
    fsa::backward(make_bwd(gq, gk, gv, gm, gb, go, glse, gdo, gdq, gdk, gdv, gdb, cuda0()));
    CHECK_CUDA(cudaDeviceSynchronize());
  } catch (const std::exception& e) {
    berror = e.what();
  }
  const auto dq_g = to_host(gdq, q.size()), dk_g = to_host(gdk, k.size()), dv_g = to_host(gdv, k.size());
  const auto dbias_g = dbias_bytes_of(to_host(gdb, gdb_bytes));
  // deterministic: a second run over fresh poison must reproduce every gradient bit for bit.
  bool bitwise = true;
  if (c.deterministic && berror.empty()) {
    CHECK_CUDA(cudaMemset(gdq, 0xff, q.size() * 2));
    CHECK_CUDA(cudaMemset(gdk, 0xff, k.size() * 2));
    CHECK_CUDA(cudaMemset(gdv, 0xff, k.size() * 2));
    CHECK_CUDA(cudaMemset(gdb, 0xff, gdb_bytes));
    fsa::backward(make_bwd(gq, gk, gv, gm, gb, go, glse, gdo, gdq, gdk, gdv, gdb, cuda0()));
    CHECK_CUDA(cudaDeviceSynchronize());
    bitwise = to_host(gdq, q.size()) == dq_g && to_host(gdk, k.size()) == dk_g &&
              to_host(gdv, k.size()) == dv_g && dbias_bytes_of(to_host(gdb, gdb_bytes)) == dbias_g;
    std::printf("    second run bitwise identical: %s\n", bitwise ? "ok" : "FAIL");
  }
  for (void* ptr : {static_cast<void*>(gq), static_cast<void*>(gk), static_cast<void*>(gv),
                    static_cast<void*>(go), static_cast<void*>(gdo), static_cast<void*>(glse),
                    static_cast<void*>(gm), gb, static_cast<void*>(gdq), static_cast<void*>(gdk),
                    static_cast<void*>(gdv), static_cast<void*>(gdb)}) {
    cudaFree(ptr);
  }
  if (!berror.empty()) {
    std::printf("%-40s ERROR (backward) %s\n", c.name, berror.c_str());
    return false;
  }
  // Relative to the tensor's largest reference value: the GPU rounds P and dS to bf16 before
  // their products (as every flash kernel does), the CPU keeps fp32.
  auto compare = [](const char* what, const std::vector<float>& g, const std::vector<float>& r) {
    double err = 0, ref = 0;
    int64_t bad = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      if (!std::isfinite(g[i])) ++bad;
      err = std::max(err, double(std::abs(g[i] - r[i])));
      ref = std::max(ref, double(std::abs(r[i])));
    }
    const bool good = bad == 0 && err <= 3e-2 * std::max(ref, 1e-3);
    std::printf("    %-6s %s max|diff| %.2e (|ref| max %.2e) non-finite %lld\n", what,
                good ? "ok  " : "FAIL", err, ref, (long long)bad);
    return good;
  };
  auto floats16 = [](const std::vector<uint16_t>& x) {
    std::vector<float> f(x.size());
    for (size_t i = 0; i < x.size(); ++i) f[i] = from_bf16(x[i]);
    return f;
  };
  auto bias_floats = [&](const std::vector<uint8_t>& bytes) {
    std::vector<float> f(bias_elems);
    for (size_t i = 0; i < bias_elems; ++i) {
      if (bias16_kind) {
        uint16_t h;
        std::memcpy(&h, bytes.data() + 2 * i, 2);
        f[i] = from_bf16(h);
      } else {
        std::memcpy(&f[i], bytes.data() + 4 * i, 4);
      }
    }
    return f;
  };
  bool bok = compare("dq", floats16(dq_g), floats16(dq_c));
  bok &= compare("dk", floats16(dk_g), floats16(dk_c));
  bok &= compare("dv", floats16(dv_g), floats16(dv_c));
  if (c.bias_kind) bok &= compare("dbias", bias_floats(dbias_g), bias_floats(dbias_c));
  bok &= bitwise;
  if (c.dbias_pad) {
    std::printf("    dbias padding untouched: %s\n", pad_untouched ? "ok" : "FAIL");
    bok &= pad_untouched;
  }
  std::printf("%-40s %s (backward)\n", c.name, bok ? "PASS" : "FAIL");
  return ok && bok;
}

}  // namespace

namespace fsa_bench {

int cuda_check() {
  std::mt19937 rng(2024);
  const Case cases[] = {
      {"dense (2,512,512,8,8,64)", 2, 512, 512, 8, 8, 64, false, 0, 0, 0},
      {"dense causal (2,512,512,8,8,64)", 2, 512, 512, 8, 8, 64, true, 0, 0, 0},
      {"causal (1,300,517,4,4,128) ragged", 1, 300, 517, 4, 4, 128, true, 0, 0, 0},
      {"causal Sq>Sk (1,200,77,2,1,128)", 1, 200, 77, 2, 1, 128, true, 0, 0, 0},
      {"D=256 causal (1,257,333,2,2,256)", 1, 257, 333, 2, 2, 256, true, 0, 0, 0},
      {"D=32 pad (1,129,190,2,1,32)", 1, 129, 190, 2, 1, 32, false, 0, 0, 0},
      {"D=96 pad (1,129,190,2,1,96)", 1, 129, 190, 2, 1, 96, true, 0, 0, 0},
      {"D=21 padded copy (1,100,150,2,1,21)", 1, 100, 150, 2, 1, 21, true, 0, 1, 0},
      {"D=130 padded copy (1,100,150,2,2,130)", 1, 100, 150, 2, 2, 130, false, 1, 0, 0},
      {"mask full+tiles GQA (2,256,320,8,2,64)", 2, 256, 320, 8, 2, 64, true, 1, 1, 0},
      {"mask key-only, bias full (1,200,300,4,2,128)", 1, 200, 300, 4, 2, 128, false, 2, 2, 0},
      {"bias (1,1,Sq,1) softcap 5 (1,256,256,4,4,64)", 1, 256, 256, 4, 4, 64, true, 0, 3, 5.0f},
      {"decode GQA mask+bias (3,1,1025,32,4,128)", 3, 1, 1025, 32, 4, 128, true, 2, 1, 0},
      {"Sk = 0 (1,64,0,2,2,64)", 1, 64, 0, 2, 2, 64, false, 0, 0, 0},
      // Few CTAs: split-KV (and, below, GQA packing with per-head bias and per-kv-head mask).
      {"split causal (1,300,2000,2,2,64)", 1, 300, 2000, 2, 2, 64, true, 0, 0, 0},
      {"split+pack mask/bias (2,3,700,8,2,64)", 2, 3, 700, 8, 2, 64, true, 1, 2, 0},
      {"split+pack decode (1,1,4096,16,2,128)", 1, 1, 4096, 16, 2, 128, true, 2, 1, 0},
      {"bias (1,Hk,Sq,Sk) summed (2,150,270,4,2,64)", 2, 150, 270, 4, 2, 64, true, 1, 4, 0},
      {"softcap 30, full bias (1,200,260,2,2,128)", 1, 200, 260, 2, 2, 128, true, 0, 2, 30.0f},
      // 16-bit biases with a query dim and Sk % 8 == 0: the sm90 kernels stage their tiles in
      // shared memory (ragged query and key tiles, a mask, a summed broadcast).
      {"staged bias, mask (2,333,256,4,2,128)", 2, 333, 256, 4, 2, 128, true, 1, 2, 0},
      {"staged bias (1,Hk,Sq,Sk) (2,190,136,4,2,64)", 2, 190, 136, 4, 2, 64, false, 0, 4, 0},
      // A strided dbias (odd row pitch): zeroed and written through its strides, key by key.
      {"full bias, strided dbias (1,150,200,4,2,64)", 1, 150, 200, 4, 2, 64, true, 0, 2, 0, false,
       3},
      // deterministic=True with a full bias broadcast over heads / batch: ordered dQ launches.
      {"det. bias (1,Hk,Sq,Sk) (2,150,270,4,2,64)", 2, 150, 270, 4, 2, 64, true, 1, 4, 0, true},
      {"det. bias (B,1,Sq,Sk) (2,333,200,6,2,128)", 2, 333, 200, 6, 2, 128, false, 0, 5, 0, true},
  };
  int failed = 0;
  for (const Case& c : cases) failed += !run_check(c, rng);
  std::printf("%d passed, %d failed\n", int(std::size(cases)) - failed, failed);
  return failed ? 1 : 0;
}

// The three workloads through the workload engine (bench/workload_bench.h: CUDA events,
// warmup, median / min / p90, cold L2, scratch from a pool that keeps its memory), under the row
// names of the earlier runs so that their numbers stay comparable.
int cuda_bench(const Timing& timing, bool json) {
  using fsa_bench::Mode;
  struct Item {
    fsa_bench::Workload workload;
    std::vector<Mode> modes;
    std::vector<std::pair<const char*, const char*>> rows;  // (row kind, label), in print order
  };
  const std::vector<Mode> all = {Mode::kForward, Mode::kBackward, Mode::kForwardBackward};
  fsa_bench::Workload dense;  // (B, S, H, D) = (2, 16384, 16, 128), no mask
  dense.batch = 2, dense.seqlen_q = dense.seqlen_k = 16384, dense.heads = dense.kv_heads = 16;
  dense.head_dim = 128, dense.causal = true;
  // Trainable mask: bias (B, Hk, 1, S) fp32; per (b, kv head, 128-query block) the diagonal
  // 128-key block + the top-16 earlier ones by mean bias.
  fsa_bench::Workload trainable;
  trainable.batch = 1, trainable.seqlen_q = trainable.seqlen_k = 16384, trainable.heads = 32;
  trainable.kv_heads = 8, trainable.head_dim = 128, trainable.causal = true;
  trainable.top_k = 16, trainable.select_block = 128, trainable.bias_dtype = fsa::DType::kFloat32;
  // Decode: key-only mask (B, 1, 1, Sk) keeping 1/8 of the 128-key blocks.
  fsa_bench::Workload decode;
  decode.batch = 1, decode.seqlen_q = 1, decode.seqlen_k = 524288, decode.heads = 32;
  decode.kv_heads = 8, decode.head_dim = 128, decode.causal = true;
  decode.key_mask_every = 8, decode.select_block = 128;
  const Item items[] = {
      {dense, all,
       {{"fwd", "dense causal (2,16384,16,16,128) fwd"},
        {"bwd", "dense causal (2,16384,16,16,128) bwd"},
        {"fwd+bwd", "dense causal (2,16384,16,16,128) fwd + bwd"}}},
      {trainable, all,
       {{"fwd", "trainable mask (1,16384,32,8,128) fwd"},
        {"plan", "  its plan (block selection -> lists)"},
        {"bwd", "trainable mask bwd (bias grad)"},
        {"fwd+bwd", "trainable mask fwd + bwd"}}},
      {decode, {Mode::kForward},
       {{"fwd", "decode (1,1,524288,32,8,128) 1/8 blocks"},
        {"plan", "  its plan (key-only mask -> lists)"}}},
  };
  std::vector<std::string> notes;
  for (const Item& item : items) {
    const fsa_bench::Result r = fsa_bench::run_workload(item.workload, item.modes, timing);
    if (!json && notes.empty()) {
      fsa_bench::print_header(r, "fsa_bench --bench (the issue's workloads, bf16)");
      fsa_bench::print_table_columns("workload", 52);
    }
    notes.push_back(fsa_bench::describe(item.workload) + ": " + r.cache);
    for (const auto& [kind, label] : item.rows) {
      for (const fsa_bench::Row& row : r.rows) {
        if (row.kind != kind) continue;
        if (json) fsa_bench::print_json(label, row, r, item.workload, timing);
        else fsa_bench::print_row(label, row, r, 52);
      }
    }
    std::fflush(stdout);
  }
  if (!json) {
    for (const std::string& note : notes) std::printf("cache, %s\n", note.c_str());
  }
  return 0;
}

}  // namespace fsa_bench
