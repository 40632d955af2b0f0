// Python module entry point of the compiled extensions. Ops are registered with the dispatcher by
// static initialisers (TORCH_LIBRARY in sinkhorn_cpu.cpp, TORCH_LIBRARY_FRAGMENT elsewhere), so
// importing the module, e.g. `import selkd_kernels._C`, is all that is needed to make
// torch.ops.selkd.* available. torch.utils.cpp_extension defines TORCH_EXTENSION_NAME as the
// module's last name component; builds without it (the CMake library, loaded with
// torch.ops.load_library) get no Python entry point and need no Python headers.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

#define SELKD_CONCAT_(a, b) a##b
#define SELKD_CONCAT(a, b) SELKD_CONCAT_(a, b)
#define SELKD_STR_(a) #a
#define SELKD_STR(a) SELKD_STR_(a)

extern "C" PyMODINIT_FUNC SELKD_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, SELKD_STR(TORCH_EXTENSION_NAME),
                                          "selkd-kernels compiled ops (see torch.ops.selkd)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
#endif
