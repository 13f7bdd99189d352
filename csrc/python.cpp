// The Python module shim of resfast._C: importing it registers the ops above; build_info() returns the
// configuration setup.py recorded (build_config.h, generated at build time under build/); cpu_kernel_isa() the
// instruction set of the CPU training kernels in use.
#include <torch/extension.h>

#include "bn_train.h"
#include "build_config.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "resfast C++/CUDA ops (registered with the PyTorch dispatcher under torch.ops.resfast)";
  m.def("build_info", []() { return std::string(RESFAST_BUILD_INFO_JSON); },
        "JSON of the build configuration: torch version, CUDA, arch list, flags");
  m.def("cpu_kernel_isa", []() { return std::string(resfast::cpu_kernel_isa()); },
        "instruction set of the CPU training kernels in use: 'avx2' or 'baseline' (RESFAST_CPU_ISA=baseline forces "
        "the baseline copy)");
}
