// Python bindings of the CUDA kernels in csrc/ (module kfac_kernels._C or the JIT-built kfac_kernels_cuda).
#include <torch/extension.h>

#include <optional>

at::Tensor covariance_update(at::Tensor C, const at::Tensor& X, const std::optional<at::Tensor>& mask,
                             bool append_ones, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kfac_kernels CUDA C++ kernels";
  m.def("covariance_update", &covariance_update,
        "In place C += scale * X~^T X~: C (E, E) contiguous fp32, X (N, D) fp16/bf16/fp32 any strides, "
        "mask (N,) bool or None, E = D + append_ones; C stays exactly symmetric. Returns C.",
        py::arg("C"), py::arg("X"), py::arg("mask"), py::arg("append_ones"), py::arg("scale"));
}
