// y[M, N] = x[M, K] · W^T + bias on the sparse tensor cores, W in the GPU layout of layout.h.
//
// One CTA: MT row tiles (16 MT output features) x NT token tiles (8 NT tokens), all of K (of its
// split, below), split over WK warps (warp w takes k-blocks w, w + WK, ...). Each warp runs its own S-stage cp.async
// pipeline through a private slice of shared memory (no CTA barrier in the main loop): per stage
// MT x (8 k-tiles of values + their metadata) and the matching x block [8 NT tokens][256 columns],
// all copied in 16-byte pieces. Values and metadata go straight from shared memory to registers
// (each lane reads back only what it copied); x goes through ldmatrix.x4 (swizzled rows). The WK
// partial sums are reduced through shared memory in warp order (deterministic), bias is added in
// fp32 and the output cast to T.
//
// Split-K across CTAs (split_k.h; the launcher picks `splits` to fill whole waves): grid.z = splits
// CTAs per tile, split z taking a contiguous range of k-blocks. Each writes its fp32 partial tile to
// the workspace, fences, and counts its arrival at the tile's counter; the CTA that arrives last
// sums every split's partial in split order (its own from shared memory), so the result has the
// same bits whatever the arrival order, adds bias, casts, writes y and resets the counter to 0.
// One launch, no memset or finalize kernel: graph capturable. splits = 1 touches no workspace.
#pragma once

#include <cuda_runtime.h>

#include "sparse_mma/layout.h"
#include "sparse_mma/mma_sp.h"
#include "sparse_mma/params.h"
#include "sparse_mma/split_k.h"

namespace sparselora {
namespace sparse_mma {

template <int MT, int NT, int WK, int S>
struct TileConfig {
  static constexpr int kThreads = WK * kWarp;
  static constexpr int kValChunks = MT * kStageKTiles * kWarp;  // uint4 per stage per warp
  static constexpr int kMetaChunks = MT * kWarp;
  static constexpr int kXRows = NT * kTileN;
  static constexpr int kXChunks = kXRows * kXChunksPerRow;
  static constexpr int kStageChunks = kValChunks + kMetaChunks + kXChunks;
  static constexpr int kWarpChunks = S * kStageChunks;
  static constexpr int kReduceBytes = WK * MT * NT * kWarp * 4 * 4;
  static constexpr int kPipeBytes = WK * kWarpChunks * 16;
  static constexpr int kSmemBytes = kPipeBytes > kReduceBytes ? kPipeBytes : kReduceBytes;
  static constexpr int kTileFloat4s = MT * NT * kWarp;  // one CTA's partial tile (split-K)
  // weight bytes one warp keeps in flight while it computes (S - 1 stages)
  static constexpr int kWeightBytesInFlight = WK * (S - 1) * (kValChunks + kMetaChunks) * 16;
};

// The loop-invariant part of a lane's cp.async sources, computed once per CTA: a stage then adds
// only its k-block offset (the main loop's integer work was mostly recomputing these per copy).
template <typename T, int MT>
struct StageSources {
  const uint4* values[MT];  // this lane's chunk of row tile mt0 + mt at k-tile 0 (row tile 0's past N)
  const uint4* meta[MT];    // its metadata at k-block 0
  const T* x;               // token n0, column 0
  int x_rows;               // tokens n0, n0 + 1, ... that exist (rows past them are not copied)
};

template <typename T, int MT>
__device__ __forceinline__ StageSources<T, MT> stage_sources(const LinearParams& p, int mt0, int n0, int lane) {
  StageSources<T, MT> s;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    // a row tile past N (last CTA, MT > 1) copies row tile 0's data, which compute_stage never uses
    const long long row = mt0 + mt < p.Mt ? mt0 + mt : 0;
    s.values[mt] = p.values + row * p.KT * kWarp + lane;
    s.meta[mt] = p.meta + row * p.KQ * kWarp + lane;
  }
  s.x = static_cast<const T*>(p.x) + static_cast<long long>(n0) * p.ldx;
  s.x_rows = p.M - n0;
  return s;
}

// Copies of k-block kq into stage `st`. k-tiles past KT (last k-block) and tokens past M are not
// copied: compute_stage skips those k-tiles and no output of those tokens is written. x columns
// past K inside the last k-block are zero-filled (the padding's zero weights multiply them).
template <typename T, int MT, int NT, int WK, int S>
__device__ __forceinline__ void load_stage(const LinearParams& p, const StageSources<T, MT>& src, uint4* st, int kq,
                                           int lane) {
  using C = TileConfig<MT, NT, WK, S>;
  // shared-window addresses: one base per stage, every other offset a constant or loop-invariant
  const uint32_t sv = smem_addr(st) + lane * 16;  // this lane's chunk of (row tile 0, k-tile 0)
  const uint32_t sm = sv + C::kValChunks * 16;
  const uint32_t sx = smem_addr(st) + (C::kValChunks + C::kMetaChunks) * 16;
  const int kt0 = kq * kStageKTiles;
  const int nkt = min(kStageKTiles, p.KT - kt0);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const uint4* v = src.values[mt] + kt0 * kWarp;
#pragma unroll
    for (int j = 0; j < kStageKTiles; ++j)
      if (j < nkt) cp_async16(sv + (mt * kStageKTiles + j) * kWarp * 16, v + j * kWarp, true);
    cp_async16(sm + mt * kWarp * 16, src.meta[mt] + kq * kWarp, true);
  }
  const int col = kt0 * kTileK + lane * 8;  // this lane's 8 columns
  const bool col_ok = col < p.K;
  const char* x = reinterpret_cast<const char*>(src.x + (col_ok ? col : 0));  // column 0 of an existing row when zero-filling
  const long long ldx_bytes = p.ldx * static_cast<long long>(sizeof(T));
#pragma unroll
  for (int r = 0; r < C::kXRows; ++r) {
    if (r < src.x_rows) cp_async16(sx + (r * kXChunksPerRow + x_smem_chunk(r, lane)) * 16, x, col_ok);
    x += ldx_bytes;
  }
}

template <typename T, int MT, int NT, int WK, int S>
__device__ __forceinline__ void compute_stage(const LinearParams& p, const uint4* st, int kq, int mt0, int lane,
                                              float (&acc)[MT][NT][4], uint32_t& nf) {
  using C = TileConfig<MT, NT, WK, S>;
  const uint4* sv = st;
  const uint4* sm = st + C::kValChunks;
  const uint4* sx = sm + C::kMetaChunks;
  const int nkt = min(kStageKTiles, p.KT - kq * kStageKTiles);  // even: KT is
  uint4 mw[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) mw[mt] = sm[mt * kWarp + lane];
#pragma unroll
  for (int pr = 0; pr < kStageKTiles / 2; ++pr) {
    if (2 * pr < nkt) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int j = 2 * pr + s;
        uint32_t b[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int row = nt * kTileN + ldm_row(lane);
          ldmatrix_x4(b[nt], sx + row * kXChunksPerRow + x_smem_chunk(row, x_chunk_of_ktile(j, lane)));
          nf |= tile_flag<NT>(nonfinite_halves<T>(b[nt][0]) | nonfinite_halves<T>(b[nt][1]) |
                                 nonfinite_halves<T>(b[nt][2]) | nonfinite_halves<T>(b[nt][3]), nt);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          // a row tile past N (last CTA, MT > 1) holds row tile 0's copy (stage_sources): no
          // output of it is written, skip its mma (uniform over the CTA)
          if (mt0 + mt >= p.Mt) continue;
          const uint4 a = sv[(mt * kStageKTiles + j) * kWarp + lane];
          const uint32_t e = pr == 0 ? mw[mt].x : pr == 1 ? mw[mt].y : pr == 2 ? mw[mt].z : mw[mt].w;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if (s == 0) mma_sp_m16n8k32<T, 0>(acc[mt][nt], a, b[nt], e);
            else mma_sp_m16n8k32<T, 1>(acc[mt][nt], a, b[nt], e);
          }
        }
      }
    }
  }
}

// The CTA's sum over its WK warps of accumulator group idx (mt, nt, lane), in warp order.
template <int MT, int NT, int WK>
__device__ __forceinline__ float4 warp_sum(const float4* red, int idx) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int w = 0; w < WK; ++w) {  // fixed order: deterministic
    const float4 f = red[w * MT * NT * kWarp + idx];
    v.x += f.x; v.y += f.y; v.z += f.z; v.w += f.w;
  }
  return v;
}

// Bias (fp32), cast and store of accumulator group idx = (mt * NT + nt) * 32 + lane.
template <typename T, int MT, int NT>
__device__ __forceinline__ void store_outputs(const LinearParams& p, const float4& sum, int mt0, int n0, int idx) {
  const int l = idx % kWarp, mn = idx / kWarp, mt = mn / NT, nt = mn % NT;
  const float v[4] = {sum.x, sum.y, sum.z, sum.w};
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = (mt0 + mt) * kTileM + c_row(l, i);
    const int tok = n0 + nt * kTileN + c_col(l, i);
    if (row < p.N && tok < p.M) {
      float out = v[i];
      if (bias) out += static_cast<float>(bias[row]);
      y[static_cast<long long>(tok) * p.ldy + row] = static_cast<T>(out);
    }
  }
}

template <typename T, int MT, int NT, int WK, int S>
__global__ void __launch_bounds__(WK * kWarp, 1) mma_sp_linear_kernel(const LinearParams p) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(SPARSELORA_SPARSE_MMA_HOST_SIM)
  using C = TileConfig<MT, NT, WK, S>;
  extern __shared__ uint4 smem[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int mt0 = blockIdx.x * MT;
  const int n0 = blockIdx.y * (NT * kTileN);
  // this CTA's split of K: k-blocks [kb0, kb0 + nkb), contiguous, sizes differ by at most one
  const int split = blockIdx.z;
  const int kb0 = split * p.KQ / p.splits;
  const int nkb = (split + 1) * p.KQ / p.splits - kb0;
  uint4* ws = smem + warp * C::kWarpChunks;

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
  uint32_t nf = 0;  // non-finite x seen, per token tile (mma_sp.h: nonfinite_halves, tile_flag)

  const int count = warp < nkb ? (nkb - warp + WK - 1) / WK : 0;  // k-blocks of this warp
  const StageSources<T, MT> src = stage_sources<T, MT>(p, mt0, n0, lane);
  int kq = kb0 + warp;  // the k-block computed next; the one loaded next is S - 1 further
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < count) load_stage<T, MT, NT, WK, S>(p, src, ws + s * C::kStageChunks, kq + s * WK, lane);
    cp_async_commit();  // empty groups keep the wait_group arithmetic uniform
  }
  // ring slots of the stage computed next and of the one loaded next, stepped (no modulo)
  uint4* cp_st = ws;
  uint4* ld_st = ws + (S - 1) * C::kStageChunks;
  uint4* const ring_end = ws + S * C::kStageChunks;
  for (int it = 0; it < count; ++it) {
    cp_async_wait<S - 2>();
    __syncwarp();  // stage `it` visible to the whole warp; stage `it - 1` no longer read by anyone
    if (it + S - 1 < count) load_stage<T, MT, NT, WK, S>(p, src, ld_st, kq + (S - 1) * WK, lane);
    cp_async_commit();
    compute_stage<T, MT, NT, WK, S>(p, cp_st, kq, mt0, lane, acc, nf);
    kq += WK;
    cp_st = cp_st + C::kStageChunks == ring_end ? ws : cp_st + C::kStageChunks;
    ld_st = ld_st + C::kStageChunks == ring_end ? ws : ld_st + C::kStageChunks;
  }
  // every warp saw all of x's columns of its k-blocks for all NT tiles' tokens, and the warps of
  // the splits together all K: a flagged partial makes the reduced sum NaN
  nan_flagged_tokens<MT, NT>(nf, acc, lane);
  cp_async_wait<0>();
  __syncthreads();  // every warp done with its pipeline: reuse shared memory for the reduction

  float4* red = reinterpret_cast<float4*>(smem);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      red[((warp * MT + mt) * NT + nt) * kWarp + lane] =
          make_float4(acc[mt][nt][0], acc[mt][nt][1], acc[mt][nt][2], acc[mt][nt][3]);
  __syncthreads();
  if (p.splits == 1) {
    for (int idx = threadIdx.x; idx < C::kTileFloat4s; idx += C::kThreads)
      store_outputs<T, MT, NT>(p, warp_sum<MT, NT, WK>(red, idx), mt0, n0, idx);
    return;
  }

  // split-K across CTAs: publish this split's partial, count the arrival; the last CTA reduces
  const long long tile = static_cast<long long>(blockIdx.y) * ((p.Mt + MT - 1) / MT) + blockIdx.x;
  float4* parts = p.partials + tile * p.splits * C::kTileFloat4s;
  for (int idx = threadIdx.x; idx < C::kTileFloat4s; idx += C::kThreads)
    st_cg(parts + split * C::kTileFloat4s + idx, warp_sum<MT, NT, WK>(red, idx));
  fence_gpu();  // this thread's stores are visible device-wide before the arrival is counted
  const bool last = syncthreads_or(threadIdx.x == 0 && arrive(p.counters + tile) == p.splits - 1);
  if (!last) return;
  fence_gpu();  // and the other splits' stores are seen here
  for (int idx = threadIdx.x; idx < C::kTileFloat4s; idx += C::kThreads) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < p.splits; ++s) {  // split order, not arrival order: deterministic
      const float4 f = s == split ? warp_sum<MT, NT, WK>(red, idx) : ld_cg(parts + s * C::kTileFloat4s + idx);
      v.x += f.x; v.y += f.y; v.z += f.z; v.w += f.w;
    }
    store_outputs<T, MT, NT>(p, v, mt0, n0, idx);
  }
  if (threadIdx.x == 0) p.counters[tile] = 0;  // ready for the next launch or graph replay
#endif
}

}  // namespace sparse_mma
}  // namespace sparselora
