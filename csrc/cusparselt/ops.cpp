// Tensor-level cuSPARSELt ops: compress a 2:4 weight once, then run linear layers with it.
// Operand roles and layouts are documented at the top of cslt.h.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cslt.h"

namespace sparselora::cslt {
namespace {

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kPtrAlign == 0; }

void check_weight_shape(int64_t n, int64_t k, const char* what) {
  TORCH_CHECK(n > 0 && k > 0 && n % kWeightAlign == 0 && k % kWeightAlign == 0, "sparselora: ", what,
              " is [", n, ", ", k, "]; cuSPARSELt needs out_features and in_features to be positive multiples of ",
              kWeightAlign, " (pad the layer or use another backend)");
}

}  // namespace

at::Tensor compress(const at::Tensor& dense, bool check) {
  TORCH_CHECK(dense.is_cuda(), "sparselora.cslt_compress: weight must be on a CUDA device, got ", dense.device());
  TORCH_CHECK(dense.dim() == 2, "sparselora.cslt_compress: weight must be 2-D [out_features, in_features], got ",
              dense.sizes());
  const cudaDataType t = cuda_dtype(dense.scalar_type(), "the weight");
  const int64_t n = dense.size(0), k = dense.size(1);
  check_weight_shape(n, k, "the weight");
  const int device = dense.get_device();
  c10::cuda::CUDAGuard guard(dense.device());
  at::Tensor w = dense.contiguous();
  if (!aligned(w.data_ptr())) w = w.clone();
  const cusparseLtHandle_t* h = handle_for(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  cusparseLtMatDescriptor_t a;
  SPARSELORA_CSLT_CHECK(cusparseLtStructuredDescriptorInit(h, &a, n, k, k, kPtrAlign, t, CUSPARSE_ORDER_ROW,
                                                           CUSPARSELT_SPARSITY_50_PERCENT));
  // Destroy the descriptor on every exit path, including the checks that throw below.
  struct DescGuard {
    cusparseLtMatDescriptor_t* d;
    ~DescGuard() { cusparseLtMatDescriptorDestroy(d); }
  } desc_guard{&a};

  if (check) {
    // cuSPARSELt compresses a non-2:4 matrix silently into garbage: verify first.
    at::Tensor valid = at::zeros({1}, w.options().dtype(at::kInt));
    SPARSELORA_CSLT_CHECK(cusparseLtSpMMAPruneCheck2(h, &a, /*isSparseA=*/1, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                                     w.data_ptr(), valid.data_ptr<int>(), stream));
    int host_valid = 0;
    SPARSELORA_CUDA_CHECK(cudaMemcpyAsync(&host_valid, valid.data_ptr<int>(), sizeof(int), cudaMemcpyDeviceToHost,
                                          stream));
    SPARSELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
    TORCH_CHECK(host_valid == 0, "sparselora.cslt_compress: the [", n, ", ", k,
                "] weight is not 2:4 sparse along in_features (cusparseLtSpMMAPruneCheck2 rejected it)");
  }
  size_t size = 0, buffer_size = 0;
  SPARSELORA_CSLT_CHECK(cusparseLtSpMMACompressedSize2(h, &a, &size, &buffer_size));
  at::Tensor out = at::empty({static_cast<int64_t>(size)}, w.options().dtype(at::kByte));
  // Scratch from PyTorch's caching allocator: stream-ordered, so freeing it when this scope
  // ends is safe even though the compression kernel may still be running.
  auto scratch = c10::cuda::CUDACachingAllocator::get()->allocate(buffer_size);
  SPARSELORA_CSLT_CHECK(cusparseLtSpMMACompress2(h, &a, /*isSparseA=*/1, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                                 w.data_ptr(), out.data_ptr(), scratch.get(), stream));
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& compressed, int64_t out_features, int64_t in_features,
                  const std::optional<at::Tensor>& bias) {
  const int64_t n = out_features, k = in_features;
  check_weight_shape(n, k, "the compressed weight");
  TORCH_CHECK(x.is_cuda(), "sparselora.cslt_linear: input must be on a CUDA device, got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "sparselora.cslt_linear: input has shape ", x.sizes(),
              ", expected [..., ", k, "]");
  cuda_dtype(x.scalar_type(), "the input");
  TORCH_CHECK(compressed.device() == x.device(), "sparselora.cslt_linear: compressed weight on ",
              compressed.device(), ", input on ", x.device());
  TORCH_CHECK(compressed.scalar_type() == at::kByte && compressed.dim() == 1 && compressed.is_contiguous(),
              "sparselora.cslt_linear: compressed weight must be a contiguous 1-D uint8 tensor from cslt_compress");
  if (bias) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == n,
                "sparselora.cslt_linear: bias must be a [", n, "] ", x.scalar_type(), " tensor on ", x.device(),
                ", got ", bias->sizes(), " ", bias->scalar_type(), " on ", bias->device());
  }
  const int device = x.get_device();
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t expected = compressed_size(device, x.scalar_type(), n, k);
  TORCH_CHECK(compressed.numel() == expected, "sparselora.cslt_linear: compressed weight has ", compressed.numel(),
              " bytes, but a ", dtype_name(x.scalar_type()), " [", n, ", ", k, "] weight compresses to ", expected,
              " bytes on this device (compressed for another shape, dtype or GPU?)");

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const int64_t m = x.numel() / k;
  if (m == 0) return at::empty(out_shape, x.options());

  at::Tensor x2 = x.reshape({m, k}).contiguous();
  const int64_t m_pad = (m + kMAlign - 1) / kMAlign * kMAlign;
  if (m_pad != m) {
    // cuSPARSELt needs the dense row count to be a multiple of kMAlign. The padding rows are
    // zeros, and the matching output rows are computed but never returned.
    at::Tensor padded = at::zeros({m_pad, k}, x2.options());
    padded.narrow(0, 0, m).copy_(x2);
    x2 = padded;
  } else if (!aligned(x2.data_ptr())) {
    x2 = x2.clone();  // e.g. a view starting mid-allocation
  }
  at::Tensor b;
  bool bias_temporary = false;
  if (bias) {
    b = bias->contiguous();
    // A misaligned bias is copied on every call; plan keys leave such a temporary out (one plan
    // per shape and M, not one per call). SparseLinear owns an aligned bias, so never pays this.
    bias_temporary = !b.is_same(*bias);
    if (!aligned(b.data_ptr())) {
      b = b.clone();
      bias_temporary = true;
    }
  }
  at::Tensor out = at::empty({m_pad, n}, x2.options());  // == column-major [n, m_pad]

  Problem p;
  p.device = device;
  p.dtype = x.scalar_type();
  p.n = n;
  p.k = k;
  p.m = m_pad;
  p.has_bias = bias.has_value();
  Operands ops;
  ops.a = compressed.data_ptr();
  ops.b = x2.data_ptr();
  ops.d = out.data_ptr();
  ops.bias = bias ? b.data_ptr() : nullptr;
  ops.bias_temporary = bias_temporary;
  run_matmul(p, ops, c10::cuda::getCurrentCUDAStream(device).stream());

  // The first m rows of a row-major [m_pad, n] tensor are contiguous: no copy.
  return (m_pad == m ? out : out.narrow(0, 0, m)).view(out_shape);
}

}  // namespace sparselora::cslt
