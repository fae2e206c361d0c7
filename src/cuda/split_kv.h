#pragma once
// How many ways split-KV cuts each CTA's key list (ForwardParams::num_splits). Host code without
// CUDA headers, so that tests/cpp checks it on any machine.

#include <algorithm>
#include <cstdint>

namespace fsa::detail::cuda {

// Split-KV when a grid of `ctas` would not fill the GPU's `slots` (SMs x CTAs per SM): the split
// count whose grid fills its waves best, the smallest within 2% of it (fewer partial outputs to
// merge), at most two waves, and at least 4 of the n_blocks key tiles per split on average so the
// combine stays cheap relative to the work it merges. A grid of 1.2 waves runs as long as 2 full
// ones: at batch 8, 512K keys, 64 CTAs on 264 slots split 5 ways ran 320 CTAs at 42% of the copy
// bandwidth (docs/perf.md, "Decode and paged K/V on H200"); 4 ways fill one wave.
inline int choose_splits(int64_t ctas, int64_t n_blocks, int64_t slots) {
  if (ctas < 1 || slots < 1 || ctas >= slots || n_blocks < 8) return 1;
  const int64_t most =
      std::max<int64_t>(std::min<int64_t>({2 * slots / ctas, n_blocks / 4, 128}), 1);
  auto fill = [&](int64_t s) {  // the share of its waves' slots a grid of s splits fills
    const int64_t total = ctas * s, waves = (total + slots - 1) / slots;
    return double(total) / double(waves * slots);
  };
  double best = 0.0;
  for (int64_t s = 1; s <= most; ++s) best = std::max(best, fill(s));
  int64_t s = 1;
  while (fill(s) < 0.98 * best) ++s;  // the smallest count within 2% of the best fill
  return int(s);
}

}  // namespace fsa::detail::cuda
