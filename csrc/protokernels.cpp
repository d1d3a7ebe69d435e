// Library-wide entry points of protokernels._C (the per-op kernels live in <op>.cu).
#include <torch/csrc/stable/library.h>

#include <string>

#ifndef PROTOKERNELS_BUILD
#error "setup.py defines PROTOKERNELS_BUILD, the CUDA version and architectures of this build"
#endif
#define PK_STRINGIZE_(x) #x
#define PK_STRINGIZE(x) PK_STRINGIZE_(x)

namespace {
// e.g. "cuda13_0_sm80_sm90": available_backends() compares the architectures with the GPU's.
std::string cuda_build_info() { return PK_STRINGIZE(PROTOKERNELS_BUILD); }
}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(protokernels, m) { m.def("cuda_build_info() -> str"); }

STABLE_TORCH_LIBRARY_IMPL(protokernels, CompositeExplicitAutograd, m) {
  m.impl("cuda_build_info", TORCH_BOX(&cuda_build_info));
}
