// The Python module shim of resfast._C: importing it registers the ops above; build_info() returns the
// configuration setup.py recorded (csrc/build_config.h, generated at build time).
#include <torch/extension.h>

#include "build_config.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "resfast C++/CUDA ops (registered with the PyTorch dispatcher under torch.ops.resfast)";
  m.def("build_info", []() { return std::string(RESFAST_BUILD_INFO_JSON); },
        "JSON of the build configuration: torch version, CUDA, arch list, flags");
}
