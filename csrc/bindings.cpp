// The one binding file of sparselora._C: every op schema of the C++ extension, and which
// kernel serves it. Sources are grouped by family under csrc/<family>/ (like FlashAttention's
// csrc/); adding a family means adding its schemas and registrations here.
//
// Ops live in the `sparselora` namespace next to the Python-defined ones (sparselora.ops),
// as a library fragment. mma_sp_linear's schema is defined in Python (so its CPU reference works
// without this extension); only its CUDA kernel is registered here. Fake (meta) kernels for the tensor ops are registered from Python
// (sparselora/backends/cusparselt_backend.py) so torch.compile can trace them.
#include <Python.h>
#include <torch/library.h>

#include "cusparselt/cslt.h"
#include "sparse_mma/ops.h"

namespace cslt = sparselora::cslt;

namespace {

int64_t compressed_size_op(int64_t out_features, int64_t in_features, c10::ScalarType dtype, int64_t device) {
  return cslt::compressed_size(static_cast<int>(device), dtype, out_features, in_features);
}
void set_search_op(bool enabled) { cslt::set_search_enabled(enabled); }
bool search_enabled_op() { return cslt::search_enabled(); }
void set_bias_in_key_op(bool enabled) { cslt::set_bias_in_key(enabled); }
void clear_cache_op(bool plans, bool tuning) { cslt::clear_caches(plans, tuning); }
std::vector<int64_t> cache_stats_op() { return cslt::cache_stats(); }
std::tuple<std::vector<std::string>, std::vector<int64_t>> tuning_export_op() { return cslt::export_tuning(); }
int64_t tuning_import_op(std::vector<std::string> strings, std::vector<int64_t> records) {
  return cslt::import_tuning(strings, records);
}
int64_t version_op(int64_t device) { return cslt::library_version(static_cast<int>(device)); }
int64_t header_version_op() { return CUSPARSELT_VERSION; }
int64_t m_bucket_op(int64_t m) { return cslt::m_bucket(m); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparselora, m) {
  // Tensor ops: CUDA kernels below, fake kernels in Python.
  m.def("cslt_compress(Tensor weight, bool check=True) -> Tensor");
  m.def("cslt_linear(Tensor x, Tensor compressed, int out_features, int in_features, Tensor? bias=None) -> Tensor");
  // Host-side ops (no tensors): one kernel for every backend.
  m.def("cslt_compressed_size(int out_features, int in_features, ScalarType dtype, int device) -> int",
        &compressed_size_op);
  m.def("cslt_set_search(bool enabled) -> ()", &set_search_op);
  m.def("cslt_search_enabled() -> bool", &search_enabled_op);
  m.def("cslt_set_bias_in_key(bool enabled) -> ()", &set_bias_in_key_op);
  m.def("cslt_clear_cache(bool plans=True, bool tuning=False) -> ()", &clear_cache_op);
  m.def("cslt_cache_stats() -> int[]", &cache_stats_op);
  m.def("cslt_tuning_export() -> (str[], int[])", &tuning_export_op);
  m.def("cslt_tuning_import(str[] strings, int[] records) -> int", &tuning_import_op);
  m.def("cslt_version(int device) -> int", &version_op);
  m.def("cslt_header_version() -> int", &header_version_op);
  m.def("cslt_m_bucket(int m) -> int", &m_bucket_op);
  m.def("mma_sp_workspace_bytes(int device, bool allocate=False) -> int", &sparselora::sparse_mma::workspace_bytes);
}

TORCH_LIBRARY_IMPL(sparselora, CUDA, m) {
  m.impl("cslt_compress", &cslt::compress);
  m.impl("cslt_linear", &cslt::linear);
  // schema, CPU reference and fake kernel: sparselora/backends/mma_sp_backend.py
  m.impl("mma_sp_linear", &sparselora::sparse_mma::linear);
}

// `import sparselora._C` loads this library, which runs the registrations above. The module
// itself is empty: everything is reached through torch.ops.sparselora.
static PyModuleDef sparselora_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                          "sparselora C++/CUDA ops (see torch.ops.sparselora)", -1,
                                          nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparselora_c_module); }
