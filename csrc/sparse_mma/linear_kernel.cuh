// y[M, N] = x[M, K] · W^T + bias on the sparse tensor cores, W in the GPU layout of layout.h.
//
// One CTA: MT row tiles (16 MT output features) x NT token tiles (8 NT tokens), all of K, split
// over WK warps (warp w takes k-blocks w, w + WK, ...). Each warp runs its own S-stage cp.async
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

template <typename T, int MT, int NT, int WK, int S>
__device__ __forceinline__ void load_stage(const LinearParams& p, uint4* st, int kq, int mt0, int n0, int lane) {
  using C = TileConfig<MT, NT, WK, S>;
  uint4* sv = st;
  uint4* sm = st + C::kValChunks;
  uint4* sx = sm + C::kMetaChunks;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int mtg = mt0 + mt;
    const bool row_ok = mtg < p.Mt;
    const uint4* src = p.values + (static_cast<long long>(row_ok ? mtg : 0) * p.KT + kq * kStageKTiles) * kWarp + lane;
#pragma unroll
    for (int j = 0; j < kStageKTiles; ++j) {
      const bool ok = row_ok && (kq * kStageKTiles + j < p.KT);
      cp_async16(sv + (mt * kStageKTiles + j) * kWarp + lane, ok ? src + j * kWarp : p.values, ok);
    }
    const uint4* msrc = p.meta + (static_cast<long long>(row_ok ? mtg : 0) * p.KQ + kq) * kWarp + lane;
    cp_async16(sm + mt * kWarp + lane, row_ok ? msrc : p.meta, row_ok);
  }
  const T* x = static_cast<const T*>(p.x);
  const int col = kq * (kStageKTiles * kTileK) + lane * 8;  // this lane's 8 columns
#pragma unroll
  for (int r = 0; r < C::kXRows; ++r) {
    const int tok = n0 + r;
    const bool ok = tok < p.M && col < p.K;
    const T* src = ok ? x + static_cast<long long>(tok) * p.ldx + col : x;
    cp_async16(sx + r * kXChunksPerRow + x_smem_chunk(r, lane), src, ok);
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
          // a row tile past N (last CTA, MT > 1) has zero-filled metadata, which mma.sp calls
          // undefined: skip it (uniform over the CTA)
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
  const int kw = kb0 + warp;                                      // its first one
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < count) load_stage<T, MT, NT, WK, S>(p, ws + s * C::kStageChunks, kw + s * WK, mt0, n0, lane);
    cp_async_commit();  // empty groups keep the wait_group arithmetic uniform
  }
  for (int it = 0; it < count; ++it) {
    cp_async_wait<S - 2>();
    __syncwarp();  // stage `it` visible to the whole warp; stage `it - 1` no longer read by anyone
    const int nxt = it + S - 1;
    if (nxt < count) load_stage<T, MT, NT, WK, S>(p, ws + (nxt % S) * C::kStageChunks, kw + nxt * WK, mt0, n0, lane);
    cp_async_commit();
    compute_stage<T, MT, NT, WK, S>(p, ws + (it % S) * C::kStageChunks, kw + it * WK, mt0, lane, acc, nf);
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
