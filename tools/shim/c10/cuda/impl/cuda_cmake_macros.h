// Compile-check shim: the torch CPU wheel ships c10/cuda headers but not this generated
// one. A CUDA build of torch has the real file; this shim is never on its include path.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
