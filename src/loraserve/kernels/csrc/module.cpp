// The Python module of the extension: only what the dispatcher ops cannot say, which ISA each was compiled for.
#include <torch/csrc/utils/pybind.h>

#include "cpu_common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_isa", &loraserve::lora_isa, "the kernels add_lora_ was compiled with");
  m.def("int8_isa", &loraserve::int8_isa, "the kernels int8_linear was compiled with");
}
