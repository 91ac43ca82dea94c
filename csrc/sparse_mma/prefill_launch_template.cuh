// Launch of one (dtype, prefill tile) instantiation of the mma.sp prefill kernel; each generated
// instantiations/prefill_*.cu instantiates exactly one (as launch_template.cuh does for decode).
#pragma once

#include <cuda_runtime.h>

#include "sparse_mma/prefill_kernel.cuh"

namespace sparselora {
namespace sparse_mma {

#ifndef SPARSELORA_SPARSE_MMA_HOST_SIM  // the host simulation defines its own CPU launch
template <typename T, int WM, int WN, int WMT, int WNT, int S>
cudaError_t launch_prefill_cfg(const LinearParams& p, cudaStream_t stream) {
  using C = PrefillTile<WM, WN, WMT, WNT, S>;
  auto kernel = mma_sp_prefill_kernel<T, WM, WN, WMT, WNT, S>;
  static int opted_in[64] = {0};  // > 48 KB of dynamic shared memory: opt in once per device
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 64 && !opted_in[device]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
    if (err != cudaSuccess) return err;
    opted_in[device] = 1;
  }
  const dim3 grid((p.Mt + C::kRowTiles - 1) / C::kRowTiles, (p.M + C::kTokens - 1) / C::kTokens);
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}
#endif

#define SPARSELORA_INSTANTIATE_PREFILL(T, WM, WN, WMT, WNT, S) \
  template cudaError_t launch_prefill_cfg<T, WM, WN, WMT, WNT, S>(const LinearParams&, cudaStream_t);

}  // namespace sparse_mma
}  // namespace sparselora
