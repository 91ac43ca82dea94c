// One cuSPARSELt handle per CUDA device, created on first use.
//
// A cuSPARSELt handle is tied to the device that is current when cusparseLtInit runs, so we
// make that device current with a guard. Handles are never destroyed: destroying them from a
// static destructor would race CUDA's own teardown at process exit.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAFunctions.h>

#include <memory>
#include <mutex>
#include <vector>

#include "cslt.h"

namespace sparselora::cslt {
namespace {

struct DeviceState {
  std::once_flag once;
  cusparseLtHandle_t handle;
  std::string name;
  int version = 0;
};

// Sized once to the device count; each slot is initialised by its own once_flag, so
// concurrent first calls on different devices do not serialise on one lock.
std::vector<std::unique_ptr<DeviceState>>& states() {
  static std::vector<std::unique_ptr<DeviceState>> s = [] {
    std::vector<std::unique_ptr<DeviceState>> v;
    int n = static_cast<int>(c10::cuda::device_count());
    for (int i = 0; i < n; ++i) v.push_back(std::make_unique<DeviceState>());
    return v;
  }();
  return s;
}

DeviceState& state(int device) {
  auto& s = states();
  TORCH_CHECK(device >= 0 && device < static_cast<int>(s.size()), "sparselora: CUDA device ",
              device, " does not exist (", s.size(), " devices visible)");
  DeviceState& st = *s[device];
  // call_once: if the initialiser throws, the flag stays unset and the next call retries.
  std::call_once(st.once, [&] {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaDeviceProp prop;
    SPARSELORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    TORCH_CHECK(prop.major >= 8, "sparselora: cuSPARSELt needs compute capability >= 8.0, device ",
                device, " (", prop.name, ") is ", prop.major, ".", prop.minor);
    SPARSELORA_CSLT_CHECK(cusparseLtInit(&st.handle));
    SPARSELORA_CSLT_CHECK(cusparseLtGetVersion(&st.handle, &st.version));
    st.name = prop.name;
  });
  return st;
}

}  // namespace

const cusparseLtHandle_t* handle_for(int device) { return &state(device).handle; }

const std::string& device_name(int device) { return state(device).name; }

int library_version(int device) { return state(device).version; }

cudaDataType cuda_dtype(c10::ScalarType t, const char* what) {
  switch (t) {
    case c10::ScalarType::Half:
      return CUDA_R_16F;
    case c10::ScalarType::BFloat16:
      return CUDA_R_16BF;
    default:
      TORCH_CHECK(false, "sparselora: ", what, " has dtype ", t,
                  "; the cuSPARSELt ops take float16 or bfloat16");
  }
  return CUDA_R_16F;  // unreachable: TORCH_CHECK(false, ...) throws
}

const char* dtype_name(c10::ScalarType t) {
  return t == c10::ScalarType::Half ? "float16" : t == c10::ScalarType::BFloat16 ? "bfloat16" : "?";
}

}  // namespace sparselora::cslt
