// Python entry point of hart_fast._C.
//
// Importing the module loads this shared object, and loading it runs the
// static TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations of the other
// translation units; the ops are then reachable as torch.ops.hart_fast.*.
// The module itself deliberately exposes no functions (no pybind11, so this
// file compiles in well under a second); it only reports how it was built.
#include <Python.h>

#ifndef HART_FAST_WITH_CUDA
#define HART_FAST_WITH_CUDA 0
#endif

static struct PyModuleDef hart_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled hart_fast kernels; use them through hart_fast.ops or torch.ops.hart_fast.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&hart_fast_c_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "CUDA_ENABLED", HART_FAST_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
