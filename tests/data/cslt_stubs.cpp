// Host-only stand-ins for the cuSPARSELt implementation, used by tests/test_csrc_compile.py to
// build csrc/bindings.cpp against a CPU torch and check that every schema registers at load time
// and that the Python fake kernels match the schemas. Never part of the real extension.
#include "cusparselt/cslt.h"

namespace sparselora::cslt {
at::Tensor compress(const at::Tensor& d, bool) { TORCH_CHECK(false, "stub"); }
at::Tensor linear(const at::Tensor& x, const at::Tensor&, int64_t, int64_t, const std::optional<at::Tensor>&) { TORCH_CHECK(false, "stub"); }
int64_t compressed_size(int, c10::ScalarType, int64_t n, int64_t k) { return n * k * 9 / 16; }
void set_search_enabled(bool) {}
bool search_enabled() { return true; }
void set_bias_in_key(bool) {}
void clear_caches(bool, bool) {}
std::vector<int64_t> cache_stats() { return {1,2,3,4,5,6}; }
std::tuple<std::vector<std::string>, std::vector<int64_t>> export_tuning() { return {{"dev","bfloat16"}, {1,2,3,4,5,6,7,8,9}}; }
int64_t import_tuning(const std::vector<std::string>& s, const std::vector<int64_t>& r) { return (int64_t)s.size()*100 + r.size(); }
int64_t m_bucket(int64_t m) { return m; }
int library_version(int) { return 1000; }
}

// Stand-in for the mma.sp op's CUDA kernel (csrc/sparse_mma/ops.cpp needs CUDA torch to link).
#include "sparse_mma/ops.h"

namespace sparselora::sparse_mma {
at::Tensor linear(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                  int64_t, int64_t) { TORCH_CHECK(false, "stub"); }
int64_t workspace_bytes(int64_t, bool) { return 0; }
}
