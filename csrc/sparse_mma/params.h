// Arguments of the mma.sp linear kernel (plain struct: shared by the kernel, the launcher and the
// torch binding, which is host-only C++).
#pragma once

#include <vector_types.h>

namespace sparselora {
namespace sparse_mma {

struct LinearParams {
  const void* x;        // [M, K] rows of ldx elements, 16-byte aligned, K % 8 == 0
  const uint4* values;  // [Mt, KT, 32, 8] 16-bit values (layout.h)
  const uint4* meta;    // [Mt, KQ, 32, 4] int32 (layout.h)
  const void* bias;     // [N] or nullptr
  void* y;              // [M, N] rows of ldy elements
  long long ldx, ldy;
  int M, N, K, Mt, KT, KQ;
  // split-K across CTAs (split_k.h; decode kernel only): grid.z = splits CTAs share each tile's K
  int splits;        // 1: no workspace is touched
  float4* partials;  // [tiles][splits][MT NT 32] fp32 partial tiles (workspace of ops.cpp)
  int* counters;     // [tiles] arrivals; 0 before and after every launch
};

}  // namespace sparse_mma
}  // namespace sparselora
