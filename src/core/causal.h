#pragma once
// Bottom-right aligned causality (SPEC section 2): key j is visible to query row i iff
// j <= i + Sk - Sq. Shared by the planner and every backend so they agree on every edge.

#include <algorithm>
#include <cstdint>

namespace fsa::detail {

struct CausalBand {
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  bool causal = false;

  // Keys [0, visible_end(i)) are visible to row i; 0 means the row sees nothing (Sq > Sk rows).
  int64_t visible_end(int64_t i) const {
    if (!causal) return seqlen_k;
    return std::clamp<int64_t>(i + seqlen_k - seqlen_q + 1, 0, seqlen_k);
  }
};

}  // namespace fsa::detail
