// Launch of one (dtype, tile config) instantiation of the mma.sp linear kernel. Each generated
// instantiations/*.cu instantiates exactly one, so every config compiles in its own nvcc run.
#pragma once

#include <cuda_runtime.h>

#include "sparse_mma/linear_kernel.cuh"

namespace sparselora {
namespace sparse_mma {

#ifndef SPARSELORA_SPARSE_MMA_HOST_SIM  // the host simulation defines its own CPU launch
template <typename T, int MT, int NT, int WK, int S>
cudaError_t launch_linear_cfg(const LinearParams& p, cudaStream_t stream) {
  using C = TileConfig<MT, NT, WK, S>;
  auto kernel = mma_sp_linear_kernel<T, MT, NT, WK, S>;
  // Opt in to > 48 KB of dynamic shared memory once per device (a host-side attribute: allowed
  // while a stream is being captured).
  static int opted_in[64] = {0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 64 && !opted_in[device]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
    if (err != cudaSuccess) return err;
    opted_in[device] = 1;
  }
  const dim3 grid((p.Mt + MT - 1) / MT, (p.M + NT * kTileN - 1) / (NT * kTileN));
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}
#endif

#define SPARSELORA_INSTANTIATE_LINEAR(T, MT, NT, WK, S) \
  template cudaError_t launch_linear_cfg<T, MT, NT, WK, S>(const LinearParams&, cudaStream_t);

}  // namespace sparse_mma
}  // namespace sparselora
