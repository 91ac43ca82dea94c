// Launch of one (dtype, tile config) instantiation of the mma.sp linear kernel. Each generated
// instantiations/*.cu instantiates exactly one, so every config compiles in its own nvcc run.
#pragma once

#include <cuda_runtime.h>

#include "sparse_mma/linear_kernel.cuh"

namespace sparselora {
namespace sparse_mma {

#ifndef SPARSELORA_SPARSE_MMA_HOST_SIM  // the host simulation defines its own CPU launch
// *splits: in, the split count (1..KQ, checked by launch.cu) or -1 to choose (split_k.h); out, the
// one used. sm_count: the device's SMs (a wave is SMs x resident CTAs per SM).
template <typename T, int MT, int NT, int WK, int S>
cudaError_t launch_linear_cfg(LinearParams p, int sm_count, cudaStream_t stream, int* splits) {
  using C = TileConfig<MT, NT, WK, S>;
  auto kernel = mma_sp_linear_kernel<T, MT, NT, WK, S>;
  // Opt in to > 48 KB of dynamic shared memory once per device (a host-side attribute: allowed
  // while a stream is being captured), and ask how many CTAs of this config fit on an SM.
  static int ctas_per_sm[64] = {0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= 64) return cudaErrorInvalidDevice;
  if (!ctas_per_sm[device]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
    if (err != cudaSuccess) return err;
    int n = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, C::kThreads, C::kSmemBytes);
    if (err != cudaSuccess) return err;
    ctas_per_sm[device] = n > 0 ? n : 1;
  }
  const dim3 grid((p.Mt + MT - 1) / MT, (p.M + NT * kTileN - 1) / (NT * kTileN));
  if (*splits < 0)
    *splits = p.partials ? choose_splits(static_cast<long long>(grid.x) * grid.y, p.KQ, WK,
                                         static_cast<long long>(sm_count) * ctas_per_sm[device], MT, NT)
                         : 1;
  p.splits = *splits;
  kernel<<<dim3(grid.x, grid.y, p.splits), C::kThreads, C::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}
#endif

#define SPARSELORA_INSTANTIATE_LINEAR(T, MT, NT, WK, S) \
  template cudaError_t launch_linear_cfg<T, MT, NT, WK, S>(LinearParams, int, cudaStream_t, int*);

}  // namespace sparse_mma
}  // namespace sparselora
