// Device wrappers of the few PTX instructions the mma.sp family uses, each written once.
// Pure CUDA (no torch headers). Layouts of the operands: layout.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace sparselora {
namespace sparse_mma {

template <typename T> struct MmaType;
template <> struct MmaType<__half> { static constexpr const char* name = "f16"; };
template <> struct MmaType<__nv_bfloat16> { static constexpr const char* name = "bf16"; };

#ifdef SPARSELORA_SPARSE_MMA_HOST_SIM
// Host simulation (tests/data/sparse_mma_host_sim.cpp, one CPU thread per lane): the same kernel
// source runs with these defined on the CPU, from the PTX ISA's description of each instruction.
void cp_async16(void* smem, const void* gmem, bool valid);
void cp_async_commit();
template <int N>
void cp_async_wait();
void ldmatrix_x4(uint32_t (&r)[4], const void* smem);
template <typename T, int SEL>
void mma_sp_m16n8k32(float (&d)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e);
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (weights and x are streamed once per CTA);
// when !valid, the 16 shared bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
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
#endif  // SPARSELORA_SPARSE_MMA_HOST_SIM

}  // namespace sparse_mma
}  // namespace sparselora
