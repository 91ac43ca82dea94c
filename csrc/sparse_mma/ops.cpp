// The torch side of sparselora::mma_sp_linear: argument checks naming every shape, output
// allocation, device guard and stream; the launch itself is pure CUDA (launch.cu).
#include "sparse_mma/ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <mutex>

#include "common/check.h"
#include "sparse_mma/launch.h"
#include "sparse_mma/layout.h"
#include "sparse_mma/params.h"
#include "sparse_mma/split_k.h"

namespace sparselora {
namespace sparse_mma {
namespace {

struct DeviceInfo {
  int major = 0, minor = 0, sm_count = 0;
  size_t smem_optin = 0;
};

const DeviceInfo& device_info(int device) {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool known[64] = {false};
  TORCH_CHECK(device >= 0 && device < 64, "sparselora.mma_sp_linear: device index ", device, " out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (!known[device]) {
    int smem = 0;
    SPARSELORA_CUDA_CHECK(cudaDeviceGetAttribute(&cache[device].major, cudaDevAttrComputeCapabilityMajor, device));
    SPARSELORA_CUDA_CHECK(cudaDeviceGetAttribute(&cache[device].minor, cudaDevAttrComputeCapabilityMinor, device));
    SPARSELORA_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    SPARSELORA_CUDA_CHECK(cudaDeviceGetAttribute(&cache[device].sm_count, cudaDevAttrMultiProcessorCount, device));
    cache[device].smem_optin = static_cast<size_t>(smem);
    known[device] = true;
  }
  return cache[device];
}

// The split-K workspace of each device (split_k.h): kWorkspaceBytes, zeroed once when allocated,
// kept for the life of the process and shared by every layer (each launch leaves its counters at
// 0). Not allocated inside a CUDA graph capture (the zero fill would become a graph node): a call
// captured before the device's first eager call runs without split-K.
std::mutex workspace_mu;
std::atomic<at::Tensor*> workspace_buf[64] = {};

at::Tensor* workspace(int device, bool allocate) {
  if (at::Tensor* ws = workspace_buf[device].load(std::memory_order_acquire)) return ws;  // every call after the first
  if (!allocate) return nullptr;
  std::lock_guard<std::mutex> lock(workspace_mu);
  if (at::Tensor* ws = workspace_buf[device].load(std::memory_order_acquire)) return ws;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  SPARSELORA_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device).stream(), &status));
  if (status != cudaStreamCaptureStatusNone) {
    TORCH_WARN_ONCE("sparselora.mma_sp_linear: first call on cuda:", device, " inside a CUDA graph capture; the ",
                    "split-K workspace is allocated outside captures, so this graph runs without split-K. Make one ",
                    "call (or prepare the layer) before capturing.");
    return nullptr;
  }
  // never freed: it lives as long as the process (released with the CUDA context)
  auto* ws = new at::Tensor(
      at::zeros({kWorkspaceBytes}, at::TensorOptions().dtype(at::kByte).device(at::Device(at::kCUDA, device))));
  workspace_buf[device].store(ws, std::memory_order_release);
  return ws;
}

}  // namespace

int64_t workspace_bytes(int64_t device, bool allocate) {
  TORCH_CHECK(device >= 0 && device < 64, "sparselora.mma_sp_workspace_bytes: device index ", device, " out of range");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const at::Tensor* ws = workspace(static_cast<int>(device), allocate);
  return ws ? ws->numel() : 0;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& bias, int64_t out_features, int64_t config, int64_t splits) {
  const char* op = "sparselora.mma_sp_linear";
  TORCH_CHECK(x.is_cuda() && values.is_cuda() && meta.is_cuda(), op, ": x, values and meta must be CUDA tensors, got ",
              x.device(), ", ", values.device(), ", ", meta.device());
  TORCH_CHECK(values.device() == x.device() && meta.device() == x.device(), op,
              ": x, values and meta must be on one device, got ", x.device(), ", ", values.device(), ", ",
              meta.device());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": values dtype ", values.scalar_type(),
              " != x dtype ", x.scalar_type());
  TORCH_CHECK(meta.scalar_type() == at::kInt, op, ": meta must be int32, got ", meta.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a feature dimension, got shape ", x.sizes());
  const int64_t k = x.size(-1), n = out_features;
  TORCH_CHECK(n > 0 && n < (1 << 30) && k > 0 && k < (1 << 30), op, ": out_features=", n, ", in_features=", k,
              " out of range");
  const int64_t Mt = row_tiles(static_cast<int>(n)), KT = k_tiles(static_cast<int>(k)), KQ = k_blocks(static_cast<int>(k));
  TORCH_CHECK(values.dim() == 4 && values.size(0) == Mt && values.size(1) == KT && values.size(2) == kWarp &&
                  values.size(3) == kValsPerLane && values.is_contiguous(),
              op, ": values must be the contiguous GPU layout [", Mt, ", ", KT, ", 32, 8] of a [", n, ", ", k,
              "] weight, got ", values.sizes());
  TORCH_CHECK(meta.dim() == 4 && meta.size(0) == Mt && meta.size(1) == KQ && meta.size(2) == kWarp &&
                  meta.size(3) == 4 && meta.is_contiguous(),
              op, ": meta must be the contiguous GPU layout [", Mt, ", ", KQ, ", 32, 4] of a [", n, ", ", k,
              "] weight, got ", meta.sizes());
  if (bias) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == n,
                op, ": bias must be [", n, "] ", x.scalar_type(), " on ", x.device(), ", got ", bias->sizes(), " ",
                bias->scalar_type(), " on ", bias->device());
  }
  c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const int64_t m = x.numel() / k;
  TORCH_CHECK(m < (1LL << 31), op, ": ", m, " tokens is too many for one launch");
  if (m == 0) return at::empty(out_shape, x.options());
  at::Tensor x2 = x.reshape({m, k});
  auto aligned = [](const at::Tensor& t) {
    return t.stride(1) == 1 && t.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  if (!aligned(x2)) x2 = x2.contiguous();
  if (!aligned(x2)) x2 = x2.clone();  // e.g. a view starting mid-allocation (K % 8 == 0 is checked at launch)
  at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({m, n}, x.options());

  LinearParams p{};
  p.x = x2.data_ptr();
  p.values = static_cast<const uint4*>(values.data_ptr());
  p.meta = static_cast<const uint4*>(meta.data_ptr());
  p.bias = bias ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.ldx = x2.stride(0);
  p.ldy = n;
  p.M = static_cast<int>(m);
  p.N = static_cast<int>(n);
  p.K = static_cast<int>(k);
  p.Mt = static_cast<int>(Mt);
  p.KT = static_cast<int>(KT);
  p.KQ = static_cast<int>(KQ);
  const int device = x.get_device();
  const DeviceInfo& info = device_info(device);
  TORCH_CHECK(splits == -1 || (splits >= 1 && splits < (1 << 16)), op, ": splits=", splits, " must be -1 or >= 1");
  if (splits != 1) {
    if (at::Tensor* ws = workspace(device, true)) {
      p.partials = static_cast<float4*>(ws->data_ptr());
      p.counters = reinterpret_cast<int*>(static_cast<char*>(ws->data_ptr()) + kWorkspacePartialBytes);
    }
  }
  char err[512] = {0};
  int used = -1, used_splits = -1;
  const int rc = launch_linear(p, x.scalar_type() == at::kBFloat16 ? DType::kBF16 : DType::kF16,
                               static_cast<int>(config), static_cast<int>(splits), info.major, info.minor,
                               info.smem_optin, info.sm_count, c10::cuda::getCurrentCUDAStream(device).stream(), err,
                               sizeof(err), &used, &used_splits);
  TORCH_CHECK(rc == 0, err);
  return y.view(out_shape);
}

}  // namespace sparse_mma
}  // namespace sparselora
