// Device wrappers of the few PTX instructions the mma.sp family uses, each written once.
// Pure CUDA (no torch headers). Layouts of the operands: layout.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "sparse_mma/layout.h"

namespace sparselora {
namespace sparse_mma {

template <typename T> struct MmaType;
template <> struct MmaType<__half> { static constexpr const char* name = "f16"; };
template <> struct MmaType<__nv_bfloat16> { static constexpr const char* name = "bf16"; };

#ifdef SPARSELORA_SPARSE_MMA_HOST_SIM
// Host simulation (tests/data/sparse_mma_host_sim.cpp, one CPU thread per lane): the same kernel
// source runs with these defined on the CPU, from the PTX ISA's description of each instruction.
void cp_async16(void* smem, const void* gmem, bool valid);
uint32_t smem_addr(const void* p);
void cp_async16(uint32_t smem, const void* gmem, bool valid);
void cp_async_commit();
template <int N>
void cp_async_wait();
void ldmatrix_x4(uint32_t (&r)[4], const void* smem);
template <typename T, int SEL>
void mma_sp_m16n8k32(float (&d)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e);
uint32_t shfl_xor(uint32_t v, int mask);
uint32_t shfl_idx(uint32_t v, int src_lane);
float nan_f32();
void st_cg(float4* p, const float4& v);
float4 ld_cg(const float4* p);
void fence_gpu();
int arrive(int* counter);
bool syncthreads_or(bool v);
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (weights and x are streamed once per CTA);
// when !valid, the 16 shared bytes are zero-filled and nothing is read. The destination is a
// shared-window address: constant offsets from one base then fold into the instruction (from
// generic pointers ptxas rebuilt each destination per copy).
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  cp_async16(smem_addr(smem), gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ldmatrix.x4 (not transposed): lane l supplies the row address of matrix l / 8; register q
// receives row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix q.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// d += A (16x32, 2:4, kept values a + metadata e) * B (32x8), fp32 accumulate. SEL: the sparsity
// selector (lanes t in {0,1} supply e for SEL 0, t in {2,3} for SEL 1). ::ordered_metadata: our
// metadata always has i0 < i1 (the canonical layout guarantees it).
template <typename T, int SEL>
__device__ __forceinline__ void mma_sp_m16n8k32(float (&d)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e);

#define SPARSELORA_MMA_SP(TYPE, PTXTYPE)                                                                  \
  template <>                                                                                             \
  __device__ __forceinline__ void mma_sp_m16n8k32<TYPE, 0>(float(&d)[4], const uint4& a,                  \
                                                           const uint32_t(&b)[4], uint32_t e) {           \
    asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." PTXTYPE "." PTXTYPE         \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n" \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                          \
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),     \
                   "r"(e));                                                                               \
  }                                                                                                       \
  template <>                                                                                             \
  __device__ __forceinline__ void mma_sp_m16n8k32<TYPE, 1>(float(&d)[4], const uint4& a,                  \
                                                           const uint32_t(&b)[4], uint32_t e) {           \
    asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." PTXTYPE "." PTXTYPE         \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x1;\n" \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                          \
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),     \
                   "r"(e));                                                                               \
  }

SPARSELORA_MMA_SP(__half, "f16")
SPARSELORA_MMA_SP(__nv_bfloat16, "bf16")
#undef SPARSELORA_MMA_SP

__device__ __forceinline__ uint32_t shfl_xor(uint32_t v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
__device__ __forceinline__ uint32_t shfl_idx(uint32_t v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fffffff); }

// Split-K across CTAs (linear_kernel.cuh): partial tiles go through L2 (.cg: L1 is not coherent
// between SMs), each writer fences before its CTA's arrival is counted, and the barrier that
// follows the count tells every thread whether its CTA arrived last.
__device__ __forceinline__ void st_cg(float4* p, const float4& v) { __stcg(p, v); }
__device__ __forceinline__ float4 ld_cg(const float4* p) { return __ldcg(p); }
__device__ __forceinline__ void fence_gpu() { __threadfence(); }
__device__ __forceinline__ int arrive(int* counter) { return atomicAdd(counter, 1); }
__device__ __forceinline__ bool syncthreads_or(bool v) { return __syncthreads_or(v) != 0; }
#endif  // SPARSELORA_SPARSE_MMA_HOST_SIM

// Non-finite flag of x (masked-dense semantics: a token with a NaN/Inf at ANY column, pruned ones
// included, gets NaN in every output, which mma.sp alone cannot give since it never multiplies x at
// pruned columns). For a register of two 16-bit halves: bit 15 / bit 31 set iff that half has an
// all-ones exponent. u = (w & E) ^ E is 0 in a half exactly then; u - 1 borrows into bit 15 only
// for a 0 half (a non-zero u half is >= the exponent's lowest bit, so the borrow from the low half
// cannot reach bit 31 either). Three integer ops per register; OR-accumulated, tested once.
template <typename T> struct ExpMask;
template <> struct ExpMask<__half> { static constexpr uint32_t value = 0x7C007C00u; };
template <> struct ExpMask<__nv_bfloat16> { static constexpr uint32_t value = 0x7F807F80u; };
template <typename T>
SPARSE_MMA_HD uint32_t nonfinite_halves(uint32_t w) {
  const uint32_t u = (w & ExpMask<T>::value) ^ ExpMask<T>::value;
  return (u - 0x00010001u) & 0x80008000u;
}

// The flags of up to 8 token tiles packed in one register (registers are what the prefill tiles
// run out of): token tile nt's nonfinite_halves, shifted right by nt, lands in bits 15 - nt and
// 31 - nt. Applied after the main loop: the lane's flag covers token lane_group(lane) of every tile
// and a quarter of the columns; the accumulators of every flagged token are set to NaN, so that
// the split-K sum, bias and cast keep it non-finite.
template <int NT>
SPARSE_MMA_HD uint32_t tile_flag(uint32_t halves_flag, int nt) {
  static_assert(NT <= 8, "one flag register holds 8 token tiles");
  return halves_flag >> nt;
}
template <int MT, int NT>
#ifdef SPARSELORA_SPARSE_MMA_HOST_SIM
inline
#else
__device__ __forceinline__
#endif
void nan_flagged_tokens(uint32_t nf, float (&acc)[MT][NT][4], int lane) {
  nf |= shfl_xor(nf, 1);  // the 4 lanes of a group: same tokens, other columns
  nf |= shfl_xor(nf, 2);
  const uint32_t f0 = shfl_idx(nf, 4 * (2 * lane_in_group(lane)));      // tokens c_col(lane, 0)
  const uint32_t f1 = shfl_idx(nf, 4 * (2 * lane_in_group(lane) + 1));  // tokens c_col(lane, 1)
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if ((i & 1 ? f1 : f0) & (0x80008000u >> nt)) acc[mt][nt][i] = nan_f32();
}

}  // namespace sparse_mma
}  // namespace sparselora
