// The launcher of the mma.sp linear kernels: shape checks, config choice (generated table) and
// dispatch to the per-config instantiations. Pure CUDA: no torch headers, so it compiles fast and
// the binding (ops.cpp) stays the only file that knows tensors.
#include <cstdio>

#include "sparse_mma/launch.h"
#include "sparse_mma/launch_template.cuh"
#include "sparse_mma/prefill_launch_template.cuh"
#include "sparse_mma/split_k.h"

namespace sparselora {
namespace sparse_mma {

#include "sparse_mma/dispatch.inc"

int num_configs() { return kNumConfigs; }

bool config_info(int id, ConfigInfo* out) {
  const ConfigInfo* c = find_config(id);
  if (!c) return false;
  *out = *c;
  return true;
}

int launch_linear(const LinearParams& p, DType dtype, int config, int splits, int sm_major, int sm_minor,
                  size_t smem_optin, int sm_count, cudaStream_t stream, char* err, size_t errlen, int* used_config,
                  int* used_splits) {
  const char* dname = dtype == DType::kBF16 ? "bf16" : "f16";
  auto fail = [&](const char* why) {
    std::snprintf(err, errlen, "sparselora.mma_sp_linear (M=%d, N=%d, K=%d, %s, config %d, splits %d): %s", p.M, p.N,
                  p.K, dname, config, splits, why);
    return 1;
  };
  if (sm_major < 8) return fail("needs compute capability 8.0 or newer (mma.sp)");
  if (p.K % 8 != 0) return fail("in_features must be a multiple of 8 (x is staged in 16-byte chunks)");
  if (p.ldx % 8 != 0 || reinterpret_cast<size_t>(p.x) % 16 != 0) return fail("x rows must be 16-byte aligned");
  if (reinterpret_cast<size_t>(p.values) % 16 != 0 || reinterpret_cast<size_t>(p.meta) % 16 != 0)
    return fail("values and meta must be 16-byte aligned");
  if (p.Mt != row_tiles(p.N) || p.KT != k_tiles(p.K) || p.KQ != k_blocks(p.K))
    return fail("values/meta are not the GPU layout of an [N, K] weight (Mt, KT or KQ mismatch)");
  if (splits == 0 || splits < -1) return fail("splits must be -1 (choose) or >= 1");
  if (p.M <= 0) return 0;
  if (config < 0) config = choose_config(sm_major, sm_minor, p.M, p.N);
  const ConfigInfo* info = find_config(config);
  if (!info) return fail("no such config");
  if (static_cast<size_t>(info->smem_bytes) > smem_optin)
    return fail("the config needs more shared memory per block than this device offers");
  const long long grid_y = (static_cast<long long>(p.M) + info->nt * kTileN - 1) / (info->nt * kTileN);
  if (grid_y > 65535) return fail("too many tokens for one launch (grid.y > 65535)");
  if (splits > 1) {
    const long long tiles = (p.Mt + info->mt - 1) / info->mt * grid_y;
    if (info->id >= 100) return fail("prefill configs do not split K across CTAs (splits must be -1 or 1)");
    if (!p.partials || !p.counters)
      return fail("no split-K workspace on this device (allocated at the first call outside a CUDA graph capture)");
    if (splits > p.KQ) return fail("more splits than 256-column k-blocks");
    if (!splits_fit(tiles, p.KQ, splits, info->mt, info->nt))
      return fail("tiles x splits x partial tile bytes exceed the split-K workspace (split_k.h)");
  }
  *used_config = config;
  *used_splits = splits;
  const cudaError_t e = dispatch(p, dtype, config, sm_count, stream, used_splits);
  if (e != cudaSuccess) {
    char why[160];
    std::snprintf(why, sizeof(why), "launch failed: %s (%s)", cudaGetErrorName(e), cudaGetErrorString(e));
    return fail(why);
  }
  return 0;
}

}  // namespace sparse_mma
}  // namespace sparselora
