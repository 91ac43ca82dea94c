// y[M, N] = x[M, K] · W^T + bias on the sparse tensor cores for prefill-sized M (>= 64 tokens): a
// classic tiled GEMM over the SAME GPU layout as linear_kernel.cuh (layout.h; no second copy).
//
// One CTA: BM = 16 WM WMT weight rows x BN = 8 WN WNT tokens, all of K, no split-K (deterministic:
// every output is one fixed chain of mma.sp). WM x WN warps, warp (wm, wn) owns row tiles
// wm WMT .. + WMT - 1 and token tiles wn WNT .. + WNT - 1 (WMT x WNT x 4 fp32 accumulators per lane).
// K advances by stages of kPrefillKTiles = 4 k-tiles (128 dense columns, half a metadata k-block):
// per stage the whole CTA copies, with 16-byte cp.async into an S-deep ring,
//   values  BM/16 row tiles x 4 k-tiles x 512 bytes   (contiguous in the layout per row tile),
//   meta    BM/16 x 512 bytes: the k-block's words (each k-block is copied by its two stages: 1/9 of
//           the weight bytes extra, instead of an 8-byte copy or a second ring),
//   x       BN tokens x 128 columns, XOR-swizzled 16-byte chunks (chunk ^ (token & 7)) so that
//           ldmatrix's 8 row addresses hit 8 different bank groups.
// A fragments are read back from shared memory 16 bytes per lane (already in register order), B
// fragments with ldmatrix.x4. Epilogue: bias added in fp32, cast to T, the tile transposed through
// shared memory so that y is written in 16-byte pieces along N. One launch, no workspace.
#pragma once

#include <cuda_runtime.h>

#include "sparse_mma/layout.h"
#include "sparse_mma/mma_sp.h"
#include "sparse_mma/params.h"

namespace sparselora {
namespace sparse_mma {

constexpr int kPrefillKTiles = 4;                                // k-tiles per stage
constexpr int kPrefillXChunks = kPrefillKTiles * kTileK / 8;     // 16-byte chunks per x row per stage

template <int WM, int WN, int WMT, int WNT, int S>
struct PrefillTile {
  static constexpr int kThreads = WM * WN * kWarp;
  static constexpr int kRowTiles = WM * WMT;                      // row tiles per CTA
  static constexpr int kTokens = WN * WNT * kTileN;               // tokens per CTA
  static constexpr int kRows = kRowTiles * kTileM;
  static constexpr int kValChunks = kRowTiles * kPrefillKTiles * kWarp;
  static constexpr int kMetaChunks = kRowTiles * kWarp;
  static constexpr int kXChunks = kTokens * kPrefillXChunks;
  static constexpr int kStageChunks = kValChunks + kMetaChunks + kXChunks;
  static constexpr int kPipeBytes = S * kStageChunks * 16;
  static constexpr int kOutPitch = kRows + 8;                     // T elements per staged output row
  static constexpr int kOutBytes = kTokens * kOutPitch * 2;
  static constexpr int kSmemBytes = kPipeBytes > kOutBytes ? kPipeBytes : kOutBytes;
};

// Each thread copies fixed columns of fixed rows every stage (the chunk counts are multiples of the
// thread count), so the index math is per thread, not per chunk, and the x swizzle is a constant.
template <typename T, int WM, int WN, int WMT, int WNT, int S>
__device__ __forceinline__ void prefill_load_stage(const LinearParams& p, uint4* st, int stage, int mt0, int n0) {
  using C = PrefillTile<WM, WN, WMT, WNT, S>;
  constexpr int kValRow = kPrefillKTiles * kWarp;  // uint4 per row tile per stage
  static_assert(C::kThreads % kValRow == 0 && C::kRowTiles % (C::kThreads / kValRow) == 0, "values split");
  static_assert(C::kThreads % kWarp == 0 && C::kRowTiles % (C::kThreads / kWarp) == 0, "meta split");
  static_assert(C::kThreads % kPrefillXChunks == 0 && C::kTokens % (C::kThreads / kPrefillXChunks) == 0, "x split");
  uint4* sv = st;
  uint4* sm = st + C::kValChunks;
  uint4* sx = sm + C::kMetaChunks;
  const int tid = threadIdx.x;
  const int kt0 = stage * kPrefillKTiles;
  {  // values: row tile r's 4 k-tiles are kValRow consecutive uint4 in the layout
    constexpr int kStep = C::kThreads / kValRow;
    const int off = tid % kValRow;
    const bool k_ok = kt0 + off / kWarp < p.KT;
#pragma unroll
    for (int r = tid / kValRow; r < C::kRowTiles; r += kStep) {
      const bool ok = k_ok && mt0 + r < p.Mt;
      const uint4* src = ok ? p.values + (static_cast<long long>(mt0 + r) * p.KT + kt0) * kWarp + off : p.values;
      cp_async16(sv + r * kValRow + off, src, ok);
    }
  }
  {  // meta: the k-block's 32 x 16 bytes per row tile (both stages of a k-block copy it)
    constexpr int kStep = C::kThreads / kWarp;
    const int lane = tid % kWarp;
#pragma unroll
    for (int r = tid / kWarp; r < C::kRowTiles; r += kStep) {
      const bool ok = mt0 + r < p.Mt;
      const uint4* src = ok ? p.meta + (static_cast<long long>(mt0 + r) * p.KQ + stage / 2) * kWarp + lane : p.meta;
      cp_async16(sm + r * kWarp + lane, src, ok);
    }
  }
  {  // x: token rows, 16 chunks of 8 columns each; columns past K (layout padding) read as zeros
    constexpr int kStep = C::kThreads / kPrefillXChunks;  // a multiple of 8: (r & 7) is fixed per thread
    static_assert(kStep % 8 == 0, "x swizzle per thread");
    const int ch = tid % kPrefillXChunks;
    const int col = kt0 * kTileK + ch * 8;
    const int r0 = tid / kPrefillXChunks;
    const int sch = ch ^ (r0 & 7);
    const T* x = static_cast<const T*>(p.x);
    const T* src = x + static_cast<long long>(n0 + r0) * p.ldx + col;
    const long long step = static_cast<long long>(kStep) * p.ldx;
#pragma unroll
    for (int r = r0; r < C::kTokens; r += kStep, src += step) {
      const bool ok = n0 + r < p.M && col < p.K;
      cp_async16(sx + r * kPrefillXChunks + sch, ok ? src : x, ok);
    }
  }
}

template <typename T, int WM, int WN, int WMT, int WNT, int S>
__device__ __forceinline__ void prefill_compute_stage(const LinearParams& p, const uint4* st, int stage, int mt0,
                                                      int wmt0, int wnt0, int lane, float (&acc)[WMT][WNT][4],
                                                      uint32_t& nf) {
  using C = PrefillTile<WM, WN, WMT, WNT, S>;
  const uint4* sv = st;
  const uint4* sm = st + C::kValChunks;
  const uint4* sx = sm + C::kMetaChunks;
  const int nkt = min(kPrefillKTiles, p.KT - stage * kPrefillKTiles);  // 2 or 4: KT is even
  const int half = stage & 1;  // which half of the k-block: metadata words 2 half, 2 half + 1
  // metadata words 2 half and 2 half + 1 of this lane (one 8-byte read). A row tile past N has zero
  // values and zero-filled metadata, which mma.sp calls undefined: it gets the padding word instead
  // (a valid encoding; 0 x anything). A select, not a branch around the mma: no warp re-convergence
  // per instruction in the loop.
  uint2 e[WMT];
#pragma unroll
  for (int mt = 0; mt < WMT; ++mt) {
    e[mt] = reinterpret_cast<const uint2*>(sm + (wmt0 + mt) * kWarp + lane)[half];
    if (mt0 + wmt0 + mt >= p.Mt) e[mt] = make_uint2(kPadMetaWord, kPadMetaWord);
  }
#pragma unroll
  for (int pr = 0; pr < kPrefillKTiles / 2; ++pr) {
    if (2 * pr < nkt) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int j = 2 * pr + s;
        uint4 a[WMT];
#pragma unroll
        for (int mt = 0; mt < WMT; ++mt) a[mt] = sv[((wmt0 + mt) * kPrefillKTiles + j) * kWarp + lane];
#pragma unroll
        for (int nt = 0; nt < WNT; ++nt) {
          uint32_t b[4];
          const int row = (wnt0 + nt) * kTileN + ldm_row(lane);
          ldmatrix_x4(b, sx + row * kPrefillXChunks + ((j * (kTileK / 8) + ldm_matrix(lane)) ^ (row & 7)));
          nf |= tile_flag<WNT>(nonfinite_halves<T>(b[0]) | nonfinite_halves<T>(b[1]) |
                                 nonfinite_halves<T>(b[2]) | nonfinite_halves<T>(b[3]), nt);
#pragma unroll
          for (int mt = 0; mt < WMT; ++mt) {
            if (s == 0) mma_sp_m16n8k32<T, 0>(acc[mt][nt], a[mt], b, pr ? e[mt].y : e[mt].x);
            else mma_sp_m16n8k32<T, 1>(acc[mt][nt], a[mt], b, pr ? e[mt].y : e[mt].x);
          }
        }
      }
    }
  }
}

template <typename T, int WM, int WN, int WMT, int WNT, int S>
__global__ void __launch_bounds__(WM * WN * kWarp, 1) mma_sp_prefill_kernel(const LinearParams p) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(SPARSELORA_SPARSE_MMA_HOST_SIM)
  using C = PrefillTile<WM, WN, WMT, WNT, S>;
  extern __shared__ uint4 smem[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int wmt0 = (warp % WM) * WMT;  // this warp's first row tile within the CTA
  const int wnt0 = (warp / WM) * WNT;  // and first token tile
  const int mt0 = blockIdx.x * C::kRowTiles;
  const int n0 = blockIdx.y * C::kTokens;

  float acc[WMT][WNT][4];
#pragma unroll
  for (int mt = 0; mt < WMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < WNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
  uint32_t nf = 0;  // non-finite x seen, per token tile (mma_sp.h: nonfinite_halves, tile_flag)

  const int count = (p.KT + kPrefillKTiles - 1) / kPrefillKTiles;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < count) prefill_load_stage<T, WM, WN, WMT, WNT, S>(p, smem + s * C::kStageChunks, s, mt0, n0);
    cp_async_commit();  // empty groups keep the wait_group arithmetic uniform
  }
  for (int it = 0; it < count; ++it) {
    cp_async_wait<S - 2>();
    // every thread's copies of stage `it` landed and everyone finished stage `it - 1`, whose slot
    // the next load overwrites
    __syncthreads();
    const int nxt = it + S - 1;
    if (nxt < count) prefill_load_stage<T, WM, WN, WMT, WNT, S>(p, smem + (nxt % S) * C::kStageChunks, nxt, mt0, n0);
    cp_async_commit();
    prefill_compute_stage<T, WM, WN, WMT, WNT, S>(p, smem + (it % S) * C::kStageChunks, it, mt0, wmt0, wnt0, lane, acc, nf);
  }
  nan_flagged_tokens<WMT, WNT>(nf, acc, lane);  // this warp saw all K of its tokens
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused for the output tile

  // accumulators + bias (fp32) -> T, staged as [token][row] so that y's rows are written 16 bytes wide
  T* so = reinterpret_cast<T*>(smem);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int mt = 0; mt < WMT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = (wmt0 + mt) * kTileM + c_row(lane, i);
      const int grow = mt0 * kTileM + r;
      const float bv = bias && grow < p.N ? static_cast<float>(bias[grow]) : 0.f;
#pragma unroll
      for (int nt = 0; nt < WNT; ++nt) {
        const int tok = (wnt0 + nt) * kTileN + c_col(lane, i);
        so[tok * C::kOutPitch + r] = static_cast<T>(acc[mt][nt][i] + bv);
      }
    }
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  const bool vec = reinterpret_cast<size_t>(p.y) % 16 == 0 && p.ldy % 8 == 0;
  constexpr int kRowChunks = C::kRows / 8;
  for (int c = threadIdx.x; c < C::kTokens * kRowChunks; c += C::kThreads) {
    const int tok = c / kRowChunks, ch = c % kRowChunks;
    const int gtok = n0 + tok, grow = mt0 * kTileM + ch * 8;
    if (gtok >= p.M || grow >= p.N) continue;
    const T* src = so + tok * C::kOutPitch + ch * 8;
    T* dst = y + static_cast<long long>(gtok) * p.ldy + grow;
    if (vec && grow + 8 <= p.N) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && grow + e < p.N; ++e) dst[e] = src[e];
    }
  }
#endif
}

}  // namespace sparse_mma
}  // namespace sparselora
