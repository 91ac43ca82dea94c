// Tensor-level op of the mma.sp family (schema defined in Python: sparselora/backends/mma_sp_backend.py,
// which also holds the CPU reference and the fake kernel; bindings.cpp registers this CUDA kernel).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace sparselora {
namespace sparse_mma {

// sparselora::mma_sp_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias, int out_features,
//                           int config=-1, int splits=-1) -> Tensor
// x [..., K] fp16/bf16; values [Mt, KT, 32, 8] and meta [Mt, KQ, 32, 4] int32 in the GPU layout of
// layout.h; returns x W^T + bias, [..., out_features], x's dtype. config -1: the generated table's
// choice; splits -1: split-K across CTAs chosen by the launcher (split_k.h), >= 1 forces it.
at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  const std::optional<at::Tensor>& bias, int64_t out_features, int64_t config, int64_t splits);

// sparselora::mma_sp_workspace_bytes(int device, bool allocate=False) -> int: bytes of the device's
// split-K workspace (0 if not allocated; `allocate` allocates it unless a graph is being captured).
int64_t workspace_bytes(int64_t device, bool allocate);

}  // namespace sparse_mma
}  // namespace sparselora
