// Split-K across CTAs for the mma.sp decode kernel (linear_kernel.cuh): how many CTAs share one
// tile's K, and the workspace their partial sums go through. Host-only integer arithmetic, mirrored
// bit for bit by sparselora/mma_sp_configs.py (choose_splits), compared by the host simulation.
//
// Why: a decode grid is ceil(N / rows per CTA) x ceil(M / tokens per CTA) CTAs, e.g. 112 for
// N = 3584 at 32 rows, while an H100/H200 holds 132 SMs x 2-3 CTAs. Splitting K over `splits` CTAs
// multiplies the grid, so more SMs (and more cp.async stages) pull weights at once; each split
// takes a contiguous range of 256-column k-blocks (sizes differ by at most one).
//
// Workspace (one per device, ops.cpp; zeroed once at allocation): fp32 partial tiles, then one
// arrival counter per tile. The CTA that arrives last sums the partials in split order
// (deterministic) and sets its counter back to 0, so the next launch or graph replay reuses it
// with no memset. Launches on one device must be stream-ordered (they share it).
#pragma once

namespace sparselora {
namespace sparse_mma {

constexpr long long kWorkspacePartialBytes = 2LL << 20;  // fp32 partial tiles of one launch
constexpr int kWorkspaceCounters = 8192;                 // arrival counters: tiles of one launch
constexpr long long kWorkspaceBytes = kWorkspacePartialBytes + 4LL * kWorkspaceCounters;
constexpr int kMaxAutoSplits = 16;
// The cost model counts, per CTA slot, k-blocks streamed plus this many for a split CTA's extra
// work: the last CTA of a tile waits for about three L2 round trips (fence, counter, partials),
// ~1 us, about what a CTA takes to stream 2 k-blocks at its share of HBM (36 KB/us per SM on
// H200, 2 CTAs per SM, 9 KB per k-block of 32 rows). It keeps marginal splits out.
constexpr int kSplitCostKBlocks = 2;

// Bytes of one CTA's fp32 partial tile: MT x NT mma tiles x 32 lanes x 4 accumulators.
inline constexpr long long partial_tile_bytes(int mt, int nt) { return static_cast<long long>(mt) * nt * 32 * 16; }

// Whether `splits` CTAs per tile fit the workspace (and each split gets at least one k-block).
inline bool splits_fit(long long tiles, int kq, int splits, int mt, int nt) {
  return splits >= 1 && splits <= kq && (splits == 1 || (tiles <= kWorkspaceCounters &&
                                                         tiles * splits * partial_tile_bytes(mt, nt) <= kWorkspacePartialBytes));
}

// The split count the launcher uses: the one that minimises waves x (k-blocks per CTA + split
// cost), where a wave is `slots` = SMs x resident CTAs per SM; ties go to fewer splits. Every
// warp of a split gets at least one k-block (splits <= KQ / WK).
inline int choose_splits(long long tiles, int kq, int wk, long long slots, int mt, int nt) {
  if (tiles <= 0 || slots <= 0) return 1;
  int best = 1;
  long long best_cost = (tiles + slots - 1) / slots * kq;
  for (int s = 2; s <= kMaxAutoSplits && s <= kq / wk; ++s) {
    if (!splits_fit(tiles, kq, s, mt, nt)) break;
    const long long cost = (tiles * s + slots - 1) / slots * ((kq + s - 1) / s + kSplitCostKBlocks);
    if (cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}

}  // namespace sparse_mma
}  // namespace sparselora
