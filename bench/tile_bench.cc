// `fsa_bench --tiles`: the CPU backend's block-map skipping (issue #2's bar): the same causal
// problem with no mask and with a mask that keeps a fraction of whole 64x64 tiles, forward and
// backward. Reports median wall time, the measured densities, effective GFLOP/s over kept entries
// (4*Sq*Sk*D*density per head, x2.5 for backward) and the dense-equivalent rate.
//
//   ./build/fsa_bench --tiles [--seqlen 4096] [--heads 8] [--kv-heads 2] [--dim 64] [--batch 1]
//                     [--tile-density 0.10] [--reps 5] [--dtype bf16|fp16|fp32] [--threads N]

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench_modes.h"
#include "fsa/fsa.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Config {
  int64_t batch = 1, seqlen = 4096, heads = 8, kv_heads = 2, dim = 64;
  double tile_density = 0.10;  // fraction of all 64x64 tiles the mask keeps (diagonal included)
  int reps = 5;
  fsa::DType dtype = fsa::DType::kBFloat16;
  int threads = 0;
};

Config parse(const std::vector<std::string>& args) {
  Config c;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= args.size()) throw fsa_bench::UsageError(a + ": missing value");
      return args[++i].c_str();
    };
    if (a == "--seqlen") c.seqlen = std::atoll(next());
    else if (a == "--heads") c.heads = std::atoll(next());
    else if (a == "--kv-heads") c.kv_heads = std::atoll(next());
    else if (a == "--dim") c.dim = std::atoll(next());
    else if (a == "--batch") c.batch = std::atoll(next());
    else if (a == "--tile-density") c.tile_density = std::atof(next());
    else if (a == "--reps") c.reps = std::atoi(next());
    else if (a == "--threads") c.threads = std::atoi(next());
    else if (a == "--dtype") {
      const std::string d = next();
      if (d == "bf16") c.dtype = fsa::DType::kBFloat16;
      else if (d == "fp16") c.dtype = fsa::DType::kFloat16;
      else if (d == "fp32") c.dtype = fsa::DType::kFloat32;
      else throw fsa_bench::UsageError("--dtype: expected bf16, fp16 or fp32, got " + d);
    } else {
      throw fsa_bench::UsageError("unknown argument '" + a + "' (--tiles takes --seqlen, --heads, "
                                  "--kv-heads, --dim, --batch, --tile-density, --reps, --dtype, "
                                  "--threads)");
    }
  }
  return c;
}

// Random bytes of a float dtype holding N(0, 1) values.
std::vector<uint8_t> random_tensor(int64_t n, fsa::DType dtype, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint8_t> bytes(size_t(n) * fsa::dtype_size(dtype));
  for (int64_t i = 0; i < n; ++i) {
    const float f = normal(rng);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (dtype == fsa::DType::kFloat32) {
      std::memcpy(bytes.data() + 4 * i, &f, 4);
    } else if (dtype == fsa::DType::kBFloat16) {
      const uint16_t h = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    } else {  // fp16 of a value in normal range: truncation is fine for benchmark data
      const uint32_t sign = (u >> 16) & 0x8000u;
      const int32_t e = int32_t((u >> 23) & 0xff) - 127 + 15;
      const uint16_t h = e <= 0 ? uint16_t(sign) : uint16_t(sign | (uint32_t(e) << 10) | ((u >> 13) & 0x3ffu));
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  return bytes;
}

template <typename F>
double median_seconds(int reps, F&& f) {
  f();  // warm-up: thread pool start, page faults of the outputs
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

namespace fsa_bench {

int tiles_main(const std::vector<std::string>& args) {
  Config c;
  try {
    c = parse(args);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "fsa_bench --tiles: %s\n", e.what());
    return 2;
  }
  if (c.threads > 0) fsa::set_num_threads(c.threads);
  const int64_t B = c.batch, S = c.seqlen, H = c.heads, Hk = c.kv_heads, D = c.dim;
  constexpr int64_t kTile = 64;
  std::mt19937 rng(7);
  auto q = random_tensor(B * S * H * D, c.dtype, rng);
  auto k = random_tensor(B * S * Hk * D, c.dtype, rng);
  auto v = random_tensor(B * S * Hk * D, c.dtype, rng);
  auto dout = random_tensor(B * S * H * D, c.dtype, rng);
  std::vector<uint8_t> out(q.size()), dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<float> lse(size_t(B * H * S));

  // Whole-tile mask (B, Hk, S, S): every diagonal tile, plus off-diagonal tiles drawn uniformly
  // over the whole grid so that `tile_density` of all tiles are kept. Causality then drops the
  // kept tiles above the diagonal (about half of them).
  const int64_t nt = (S + kTile - 1) / kTile;
  const double all_tiles = double(nt) * double(nt);
  const double p_off =
      std::clamp((c.tile_density * all_tiles - double(nt)) / (all_tiles - double(nt)), 0.0, 1.0);
  std::vector<uint8_t> mask(size_t(B * Hk * S * S), 0);
  std::bernoulli_distribution keep(p_off);
  int64_t mask_tiles = 0;
  for (int64_t bh = 0; bh < B * Hk; ++bh) {
    for (int64_t ti = 0; ti < nt; ++ti) {
      for (int64_t tj = 0; tj < nt; ++tj) {
        if (tj != ti && !keep(rng)) continue;
        ++mask_tiles;
        for (int64_t i = ti * kTile; i < std::min(S, (ti + 1) * kTile); ++i) {
          std::memset(mask.data() + (bh * S + i) * S + tj * kTile, 1,
                      size_t(std::min(kTile, S - tj * kTile)));
        }
      }
    }
  }

  using fsa::TensorView;
  fsa::ForwardArgs fw;
  fw.query = TensorView::contiguous(q.data(), c.dtype, {B, S, H, D});
  fw.key = TensorView::contiguous(k.data(), c.dtype, {B, S, Hk, D});
  fw.value = TensorView::contiguous(v.data(), c.dtype, {B, S, Hk, D});
  fw.out = TensorView::contiguous(out.data(), c.dtype, {B, S, H, D});
  fw.lse = TensorView::contiguous(lse.data(), fsa::DType::kFloat32, {B, H, S});
  fw.options.is_causal = true;
  fsa::BackwardArgs bw;
  bw.query = fw.query;
  bw.key = fw.key;
  bw.value = fw.value;
  bw.out = fw.out;
  bw.lse = *fw.lse;
  bw.dout = TensorView::contiguous(dout.data(), c.dtype, {B, S, H, D});
  bw.options = fw.options;
  bw.dquery = TensorView::contiguous(dq.data(), c.dtype, {B, S, H, D});
  bw.dkey = TensorView::contiguous(dk.data(), c.dtype, {B, S, Hk, D});
  bw.dvalue = TensorView::contiguous(dv.data(), c.dtype, {B, S, Hk, D});

  std::printf("fsa_bench --tiles (CPU, %d threads): B=%lld S=%lld H=%lld Hk=%lld D=%lld %s causal, "
              "median of %d\n", fsa::num_threads(), (long long)B, (long long)S, (long long)H,
              (long long)Hk, (long long)D, fsa::to_string(c.dtype).c_str(), c.reps);
  std::printf("mask keeps %.2f%% of all %lldx%lld tiles (before causality)\n",
              100.0 * double(mask_tiles) / (all_tiles * double(B * Hk)), (long long)kTile,
              (long long)kTile);
  std::printf("%-22s %10s %10s %12s %12s %10s %10s\n", "case", "kept", "tiles", "fwd ms",
              "bwd ms", "fwd GF/s", "bwd GF/s");
  double fwd_dense = 0, bwd_dense = 0;
  for (int masked = 0; masked < 2; ++masked) {
    std::optional<TensorView> m;
    if (masked) m = TensorView::contiguous(mask.data(), fsa::DType::kBool, {B, Hk, S, S});
    const auto t0 = Clock::now();
    const fsa::Plan plan = fsa::make_plan(fw.query, fw.key, m, true);
    const double plan_ms = 1e3 * std::chrono::duration<double>(Clock::now() - t0).count();
    fw.attn_mask = bw.attn_mask = m;
    fw.plan = bw.plan = &plan;
    const double tf = median_seconds(c.reps, [&] { fsa::forward(fw); });
    const double tb = median_seconds(c.reps, [&] { fsa::backward(bw); });
    // Effective flops over kept entries: 4 * Sq * Sk * D * density per head (x2.5 backward).
    const double kept_flops = 4.0 * double(S) * double(S) * double(D) * plan.kept_density() *
                              double(B * H);
    std::printf("%-22s %9.2f%% %9.2f%% %12.1f %12.1f %10.1f %10.1f\n",
                masked ? "tile mask + causal" : "no mask, causal", 100 * plan.kept_density(),
                100 * plan.visited_tile_fraction(), 1e3 * tf, 1e3 * tb, kept_flops / tf * 1e-9,
                2.5 * kept_flops / tb * 1e-9);
    if (masked) {
      std::printf("plan of the masked case: %.1f ms (one read of the (B, Hk, S, S) mask)\n", plan_ms);
      std::printf("speedup over no mask: forward %.2fx, backward %.2fx\n", fwd_dense / tf,
                  bwd_dense / tb);
    } else {
      fwd_dense = tf;
      bwd_dense = tb;
    }
  }
  return 0;
}

}  // namespace fsa_bench
