// Demo: 4K-token causal attention whose mask is a top-k selection by a learned per-key bias, the
// same bias added to the scores (the trainable dynamic-mask pattern). Runs on the CPU backend,
// prints the output shape, timings, kept density and the max error against an fp64 evaluation
// of sampled rows.
//
//   ./build/fsa_demo [seqlen] [window]

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "fsa/fsa.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// fp32 -> bf16, round to nearest even (inputs here are finite).
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t B = 1, S = argc > 1 ? std::atoll(argv[1]) : 4096, H = 8, Hk = 2, D = 64;
  const int64_t window = argc > 2 ? std::atoll(argv[2]) : 512;
  const int64_t G = H / Hk;
  std::printf("flash-sparse-attn demo: CPU backend, %d threads\n", fsa::num_threads());
  std::printf("problem: B=%lld S=%lld H=%lld Hk=%lld D=%lld bf16, causal, top-%lld keys per row "
              "by a per-key bias (B, Hk, 1, S)\n",
              (long long)B, (long long)S, (long long)H, (long long)Hk, (long long)D,
              (long long)window);

  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> q(size_t(B * S * H * D)), k(size_t(B * S * Hk * D)), v(k.size());
  for (auto& x : q) x = to_bf16(normal(rng));
  for (auto& x : k) x = to_bf16(normal(rng));
  for (auto& x : v) x = to_bf16(normal(rng));
  // The learned bias: A * softplus(dt), per (batch, kv head, key).
  std::vector<float> bias(size_t(B * Hk * S));
  for (auto& x : bias) x = -0.5f * std::log1p(std::exp(normal(rng)));

  // Top-k mask among the causally visible keys of each row, (B, Hk, S, S) bool.
  auto t0 = Clock::now();
  std::vector<uint8_t> mask(size_t(B * Hk * S * S), 0);
  for (int64_t hk = 0; hk < Hk; ++hk) {
    const float* bh = bias.data() + hk * S;
    std::vector<int64_t> order(static_cast<size_t>(S));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return bh[a] > bh[b]; });
    for (int64_t i = 0; i < S; ++i) {
      uint8_t* row = mask.data() + (hk * S + i) * S;
      int64_t kept = 0;
      for (int64_t j : order) {
        if (j > i) continue;
        row[j] = 1;
        if (++kept == window) break;
      }
    }
  }
  const double mask_s = seconds_since(t0);

  using fsa::DType;
  using fsa::TensorView;
  std::vector<uint16_t> out(q.size());
  std::vector<float> lse(size_t(B * H * S));
  fsa::ForwardArgs args;
  args.query = TensorView::contiguous(q.data(), DType::kBFloat16, {B, S, H, D});
  args.key = TensorView::contiguous(k.data(), DType::kBFloat16, {B, S, Hk, D});
  args.value = TensorView::contiguous(v.data(), DType::kBFloat16, {B, S, Hk, D});
  args.attn_mask = TensorView::contiguous(mask.data(), DType::kBool, {B, Hk, S, S});
  args.attn_bias = TensorView::contiguous(bias.data(), DType::kFloat32, {B, Hk, 1, S});
  args.options.is_causal = true;
  args.out = TensorView::contiguous(out.data(), DType::kBFloat16, {B, S, H, D});
  args.lse = TensorView::contiguous(lse.data(), DType::kFloat32, {B, H, S});

  t0 = Clock::now();
  const fsa::Plan plan = fsa::make_plan(args.query, args.key, args.attn_mask, true);
  const double plan_s = seconds_since(t0);
  args.plan = &plan;
  t0 = Clock::now();
  fsa::forward(args);
  const double fwd_s = seconds_since(t0);

  // Backward with the bias requiring grad, reusing the plan.
  std::vector<uint16_t> dout(q.size()), dq(q.size()), dk(k.size()), dv(v.size());
  for (auto& x : dout) x = to_bf16(normal(rng));
  std::vector<float> dbias(bias.size());
  fsa::BackwardArgs bw;
  bw.query = args.query;
  bw.key = args.key;
  bw.value = args.value;
  bw.out = args.out;
  bw.lse = *args.lse;
  bw.dout = TensorView::contiguous(dout.data(), DType::kBFloat16, {B, S, H, D});
  bw.attn_mask = args.attn_mask;
  bw.attn_bias = args.attn_bias;
  bw.options = args.options;
  bw.dquery = TensorView::contiguous(dq.data(), DType::kBFloat16, {B, S, H, D});
  bw.dkey = TensorView::contiguous(dk.data(), DType::kBFloat16, {B, S, Hk, D});
  bw.dvalue = TensorView::contiguous(dv.data(), DType::kBFloat16, {B, S, Hk, D});
  bw.dbias = TensorView::contiguous(dbias.data(), DType::kFloat32, {B, Hk, 1, S});
  bw.plan = &plan;
  t0 = Clock::now();
  fsa::backward(bw);
  const double bwd_s = seconds_since(t0);

  // fp64 evaluation of sampled rows (every head) for the error report.
  double max_err = 0.0;
  const int64_t sample_rows[] = {0, 1, 63, 64, 1000, S / 2, S - 65, S - 1};
  for (int64_t h = 0; h < H; ++h) {
    const int64_t hk = h / G;
    for (int64_t i : sample_rows) {
      if (i < 0 || i >= S) continue;
      const uint8_t* row = mask.data() + (hk * S + i) * S;
      std::vector<double> s(size_t(S), -INFINITY);
      double mx = -INFINITY;
      for (int64_t j = 0; j <= i; ++j) {
        if (!row[j]) continue;
        double x = 0;
        for (int64_t d = 0; d < D; ++d) {
          x += double(from_bf16(q[size_t((i * H + h) * D + d)])) *
               double(from_bf16(k[size_t((j * Hk + hk) * D + d)]));
        }
        s[size_t(j)] = x / std::sqrt(double(D)) + bias[size_t(hk * S + j)];
        mx = std::max(mx, s[size_t(j)]);
      }
      double sum = 0;
      for (int64_t j = 0; j <= i; ++j) sum += row[j] ? std::exp(s[size_t(j)] - mx) : 0.0;
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t j = 0; j <= i; ++j) {
          if (row[j]) o += std::exp(s[size_t(j)] - mx) / sum * from_bf16(v[size_t((j * Hk + hk) * D + d)]);
        }
        max_err = std::max(max_err, std::abs(o - double(from_bf16(out[size_t((i * H + h) * D + d)]))));
      }
    }
  }

  std::printf("out shape      (%lld, %lld, %lld, %lld) bfloat16\n", (long long)B, (long long)S,
              (long long)H, (long long)D);
  std::printf("kept density   %.2f%% of (query, key) pairs; %.2f%% of 64x64 tiles visited\n",
              100.0 * plan.kept_density(), 100.0 * plan.visited_tile_fraction());
  std::printf("time           mask %.1f ms, plan %.1f ms, forward %.1f ms, backward %.1f ms\n",
              1e3 * mask_s, 1e3 * plan_s, 1e3 * fwd_s, 1e3 * bwd_s);
  std::printf("max |out - fp64 reference| over %zu sampled rows x %lld heads: %.3g (bf16 output)\n",
              sizeof(sample_rows) / sizeof(sample_rows[0]), (long long)H, max_err);
  const bool ok = max_err < 2e-2 && std::isfinite(max_err);
  std::printf("%s\n", ok ? "OK" : "FAILED: error above the bf16 bound 2e-2");
  return ok ? 0 : 1;
}
