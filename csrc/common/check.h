// Error checks shared by every csrc family: each failure names the call that failed.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

// Throws a c10::Error (a RuntimeError in Python) naming the CUDA runtime call and its error.
#define SPARSELORA_CUDA_CHECK(call)                                                        \
  do {                                                                                     \
    cudaError_t sparselora_err_ = (call);                                                  \
    TORCH_CHECK(sparselora_err_ == cudaSuccess, "sparselora: CUDA call `", #call,          \
                "` failed: ", cudaGetErrorName(sparselora_err_), " (",                     \
                cudaGetErrorString(sparselora_err_), ")");                                 \
  } while (0)
