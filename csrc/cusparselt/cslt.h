// cuSPARSELt-backed 2:4 GEMM: y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]).
//
// Operand roles (the one place this is decided):
//   * The weight W [N, K] is cuSPARSELt's *structured* operand A: row-major, ld = K, op = N.
//     Its 2:4 groups run along K (each row, 4 consecutive inputs), which is the canonical
//     sparselora layout, and it is compressed once (cslt_compress), independently of M.
//   * The activation x [M, K] (row-major, contiguous) is the dense operand B, described as a
//     row-major [M, K] matrix with op = T, i.e. op(B) = x^T [K, M].
//   * D = A · op(B) = W x^T is [N, M], written column-major with ld = N: the same bytes as a
//     row-major [M, N] tensor, so the output needs no transpose.
//   * Because the weight is A, D has one row per output feature, and cuSPARSELt's bias
//     vector (one value per row of D) is exactly nn.Linear's bias [N], fused in the epilogue.
// fp16 / bf16 inputs and outputs, fp32 accumulation (CUSPARSE_COMPUTE_32F).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <cusparseLt.h>

#include "../common/check.h"

// Throws naming the cuSPARSELt call and its status.
#define SPARSELORA_CSLT_CHECK(call)                                                        \
  do {                                                                                     \
    cusparseStatus_t sparselora_st_ = (call);                                              \
    TORCH_CHECK(sparselora_st_ == CUSPARSE_STATUS_SUCCESS, "sparselora: cuSPARSELt call `", \
                #call, "` failed: ", cusparseLtGetErrorName(sparselora_st_), " (",         \
                cusparseLtGetErrorString(sparselora_st_), ")");                            \
  } while (0)

namespace sparselora::cslt {

// Shape rules (cuSPARSELt, 16-bit types): the structured matrix needs rows and columns that
// are multiples of 16; dense matrices multiples of 8. M is padded up to kMAlign internally.
constexpr int64_t kWeightAlign = 16;
constexpr int64_t kMAlign = 8;
constexpr uint32_t kPtrAlign = 16;  // bytes; every operand pointer must be this aligned

// ---- handle.cpp: one cuSPARSELt handle per device, created lazily and thread-safely ----
const cusparseLtHandle_t* handle_for(int device);
const std::string& device_name(int device);
int library_version(int device);
cudaDataType cuda_dtype(c10::ScalarType t, const char* what);
const char* dtype_name(c10::ScalarType t);

// ---- plan_cache.cpp: plans keyed by everything they depend on; one search per shape ----
// What a plan is built for. The layout is fixed (see the top of this file) but kept in the
// key so that a second layout can never collide with it.
struct Problem {
  int device = 0;
  c10::ScalarType dtype = c10::ScalarType::Half;
  int64_t n = 0, k = 0, m = 0;  // m already padded to kMAlign
  bool has_bias = false;
  int layout = 0;
};

// The algorithm choice of a plan. split_k == 0 means "cuSPARSELt's default" (attribute not set).
struct AlgConfig {
  int alg_id = 0;
  int split_k = 0;
  int split_k_mode = 0;
  int split_k_buffers = 0;
  int64_t time_ns = 0;  // measured by the search (0: not measured)
};

// A ready-to-run plan. All cuSPARSELt objects live at a stable heap address: the plan keeps
// pointers into the descriptors, so an entry is never moved or copied.
struct PlanEntry;

// Operand pointers of the call that needs the plan (the search runs on them).
struct Operands {
  const void* a = nullptr;     // compressed weight
  const void* b = nullptr;     // x, padded to m rows
  void* d = nullptr;           // output [m, n] row-major == [n, m] column-major
  const void* bias = nullptr;  // nullptr when the problem has no bias
  bool bias_temporary = false; // bias is a per-call copy (it was misaligned): keep it out of plan keys
};

// Runs D = A op(B) (+ bias) with the cached plan for `p`, creating and tuning it on first use.
void run_matmul(const Problem& p, const Operands& ops, cudaStream_t stream);

// Compressed-weight size in bytes for an [n, k] weight of this dtype on `device` (memoised).
int64_t compressed_size(int device, c10::ScalarType dtype, int64_t n, int64_t k);

// Settings and introspection (exposed as ops in bindings.cpp).
void set_search_enabled(bool on);
bool search_enabled();
void set_bias_in_key(bool on);
void clear_caches(bool plans, bool tuning);
// [plans cached, plan hits, plan misses, searches run, tuning entries, bias rebinds]
std::vector<int64_t> cache_stats();
// Tuning table as flat arrays: strings are (device name, dtype name) pairs, records are
// kTuneRecord ints per entry: n, k, m_bucket, bias, alg_id, split_k, split_k_mode,
// split_k_buffers, time_ns.
constexpr int kTuneRecord = 9;
std::tuple<std::vector<std::string>, std::vector<int64_t>> export_tuning();
int64_t import_tuning(const std::vector<std::string>& strings, const std::vector<int64_t>& records);
int64_t m_bucket(int64_t m);

// ---- ops.cpp: the tensor-level ops registered in bindings.cpp ----
at::Tensor compress(const at::Tensor& dense, bool check);
at::Tensor linear(const at::Tensor& x, const at::Tensor& compressed, int64_t out_features,
                  int64_t in_features, const std::optional<at::Tensor>& bias);

}  // namespace sparselora::cslt
