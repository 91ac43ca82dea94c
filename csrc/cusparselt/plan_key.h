// Plan-cache keys and reuse rules of the cuSPARSELt GEMM. Plain C++ (no CUDA, torch or
// cuSPARSELt), so a CPU test (tests/test_gpu_risks.py) compiles and checks them directly.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sparselora::cslt {

struct PlanKey {
  int device;
  int dtype;
  int64_t n, k, m;
  bool bias;
  uintptr_t bias_ptr;  // see bias_key
  int layout;
  bool operator==(const PlanKey& o) const {
    return device == o.device && dtype == o.dtype && n == o.n && k == o.k && m == o.m &&
           bias == o.bias && bias_ptr == o.bias_ptr && layout == o.layout;
  }
};

inline void hash_mix(size_t& h, size_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); }

struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    size_t h = 0;
    for (size_t v : {size_t(k.device), size_t(k.dtype), size_t(k.n), size_t(k.k), size_t(k.m),
                     size_t(k.bias), size_t(k.bias_ptr), size_t(k.layout)})
      hash_mix(h, v);
    return h;
  }
};

// The bias pointer that goes into a plan key. Only in bias-in-key mode, and only for a bias the
// caller owns: a bias the op had to copy (misaligned) is a new temporary on every call, and
// keying on it would build (and cache) one plan per call. Such calls share one pointer-free plan
// whose bias pointer is re-bound before each launch, under the plan's lock (run_matmul).
inline uintptr_t bias_key(bool bias_in_key, const void* bias, bool bias_is_temporary) {
  return (bias_in_key && bias != nullptr && !bias_is_temporary) ? reinterpret_cast<uintptr_t>(bias) : 0;
}

inline PlanKey make_plan_key(int device, int dtype, int64_t n, int64_t k, int64_t m, const void* bias,
                             bool bias_is_temporary, bool bias_in_key, int layout) {
  return PlanKey{device, dtype, n, k, m, bias != nullptr, bias_key(bias_in_key, bias, bias_is_temporary), layout};
}

// May a cached plan serve this call? A plan built during a CUDA-graph capture for a shape with
// no tuned algorithm yet runs cuSPARSELt's default (the search cannot run inside a capture). It
// is "provisional": it serves further captures, but the first call outside a capture searches
// and replaces it, so a capture-time default is never kept as the tuned choice.
inline bool reuse_cached_plan(bool provisional, bool capturing) { return !provisional || capturing; }

}  // namespace sparselora::cslt
