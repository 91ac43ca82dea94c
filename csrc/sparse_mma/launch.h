// Host API of the mma.sp linear kernels (no torch types: the launcher compiles as pure CUDA).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace sparselora {
namespace sparse_mma {

struct LinearParams;

enum class DType { kF16 = 0, kBF16 = 1 };

struct ConfigInfo {
  int id, mt, nt, wk, stages, smem_bytes, threads;
};

// Number of tile configs, and the description of config `id` (false if out of range).
int num_configs();
bool config_info(int id, ConfigInfo* out);
// The config the generated table picks for (compute capability, tokens M, out_features N).
int choose_config(int sm_major, int sm_minor, int m, int n);

// Launch y = x W^T + b. `config` -1 picks with choose_config; `splits` (split-K across CTAs, decode
// configs only, split_k.h) -1 picks from the grid and `sm_count`, >= 1 forces it (needs the
// workspace in p.partials / p.counters when > 1). Returns 0 on success; otherwise a nonzero code
// and a message in `err` that names M, N, K, the dtype, the config and the splits.
int launch_linear(const LinearParams& p, DType dtype, int config, int splits, int sm_major, int sm_minor,
                  size_t smem_optin, int sm_count, cudaStream_t stream, char* err, size_t errlen, int* used_config,
                  int* used_splits);

}  // namespace sparse_mma
}  // namespace sparselora
