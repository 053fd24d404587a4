# Locate LibTorch inside a pip-installed `torch` package and define the `aviary_torch` interface
# target.
#
# Why not find_package(Torch)? TorchConfig.cmake drags in torch's own CUDA detection (Caffe2's
# cuda.cmake), which insists on a toolkit matching the wheel and breaks CPU-only builds on
# machines that happen to have a different nvcc. Aviary only needs the headers and a handful of
# shared libraries, so it names them directly:
#   - always: libtorch_cpu, libc10 (CPU tensors, autograd, the C++ frontend);
#   - with AVIARY_TORCH_CUDA: libtorch_cuda, libc10_cuda (CUDA tensors and streams). These are
#     linked only when the wheel's CUDA major version equals nvcc's, so kernels and torch share
#     one CUDA runtime.
#
# Inputs:  AVIARY_PYTHON (interpreter with torch installed) or TORCH_ROOT (…/site-packages/torch).
set(AVIARY_PYTHON "" CACHE FILEPATH "Python interpreter whose `torch` package provides LibTorch")
set(TORCH_ROOT "" CACHE PATH "Directory of the torch Python package (contains include/ and lib/)")

if(NOT TORCH_ROOT)
  if(NOT AVIARY_PYTHON)
    find_program(AVIARY_PYTHON NAMES python3 python REQUIRED)
  endif()
  execute_process(
    COMMAND "${AVIARY_PYTHON}" -c "import os, torch; print(os.path.dirname(torch.__file__))"
    OUTPUT_VARIABLE _torch_root OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
  if(NOT _rc EQUAL 0 OR NOT _torch_root)
    message(FATAL_ERROR "Could not import torch with ${AVIARY_PYTHON}. Run tools/setup.sh, or pass "
                        "-DAVIARY_PYTHON=/path/to/python (with torch==2.11.0) or -DTORCH_ROOT=…")
  endif()
  set(TORCH_ROOT "${_torch_root}" CACHE PATH "" FORCE)
endif()

if(NOT EXISTS "${TORCH_ROOT}/include/torch/csrc/api/include/torch/torch.h")
  message(FATAL_ERROR "TORCH_ROOT=${TORCH_ROOT} has no LibTorch headers (include/torch/csrc/api)")
endif()
file(READ "${TORCH_ROOT}/version.py" _torch_version_py)
string(REGEX MATCH "__version__ = '([^']+)'" _m "${_torch_version_py}")
set(AVIARY_TORCH_VERSION "${CMAKE_MATCH_1}")
string(REGEX MATCH "cuda: Optional\\[str\\] = '([0-9]+)" _m "${_torch_version_py}")
set(AVIARY_TORCH_CUDA_MAJOR "${CMAKE_MATCH_1}")
if(NOT AVIARY_TORCH_VERSION MATCHES "^2\\.11\\.")
  message(WARNING "Aviary is developed against torch 2.11.0; found ${AVIARY_TORCH_VERSION}")
endif()

set(AVIARY_TORCH_LIBRARY_DIR "${TORCH_ROOT}/lib")
function(_aviary_torch_lib var name)
  find_library(${var} NAMES ${name} PATHS "${AVIARY_TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
endfunction()
_aviary_torch_lib(AVIARY_LIBTORCH_CPU torch_cpu)
_aviary_torch_lib(AVIARY_LIBC10 c10)

set(AVIARY_TORCH_CUDA OFF)
if(AVIARY_WITH_CUDA AND AVIARY_TORCH_CUDA_MAJOR)
  string(REGEX MATCH "^[0-9]+" _nvcc_major "${CMAKE_CUDA_COMPILER_VERSION}")
  if(_nvcc_major STREQUAL AVIARY_TORCH_CUDA_MAJOR)
    set(AVIARY_TORCH_CUDA ON)
  else()
    message(WARNING "torch ${AVIARY_TORCH_VERSION} is built for CUDA ${AVIARY_TORCH_CUDA_MAJOR} but "
            "nvcc is ${CMAKE_CUDA_COMPILER_VERSION}: kernels are compiled, but libaviary uses CPU "
            "tensors only. Install a torch wheel built for CUDA ${_nvcc_major} (see README).")
  endif()
endif()

# The wheel bundles its own (newer) {fmt} headers in include/fmt, which would shadow Debian's
# fmt 9 that spdlog and libfmt.so are built against. LibTorch's public headers do not use fmt, so
# the build sees a mirror of torch/include without that one directory.
set(AVIARY_TORCH_INCLUDE_MIRROR "${CMAKE_BINARY_DIR}/torch-include")
file(MAKE_DIRECTORY "${AVIARY_TORCH_INCLUDE_MIRROR}")
file(GLOB _torch_include_entries RELATIVE "${TORCH_ROOT}/include" "${TORCH_ROOT}/include/*")
foreach(_entry IN LISTS _torch_include_entries)
  if(NOT _entry STREQUAL "fmt")
    file(CREATE_LINK "${TORCH_ROOT}/include/${_entry}" "${AVIARY_TORCH_INCLUDE_MIRROR}/${_entry}"
         SYMBOLIC)
  endif()
endforeach()

add_library(aviary_torch INTERFACE)
target_include_directories(aviary_torch SYSTEM INTERFACE
  "$<BUILD_INTERFACE:${AVIARY_TORCH_INCLUDE_MIRROR}>"
  "$<INSTALL_INTERFACE:${TORCH_ROOT}/include>"
  "${TORCH_ROOT}/include/torch/csrc/api/include")
# The pip wheels since torch 2.7 use the C++11 ABI, like Debian's libraries.
target_compile_definitions(aviary_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
target_link_libraries(aviary_torch INTERFACE "${AVIARY_LIBTORCH_CPU}" "${AVIARY_LIBC10}")
if(AVIARY_TORCH_CUDA)
  _aviary_torch_lib(AVIARY_LIBTORCH_CUDA torch_cuda)
  _aviary_torch_lib(AVIARY_LIBC10_CUDA c10_cuda)
  # --no-as-needed: libtorch_cuda registers the CUDA backend from static initialisers, and
  # nothing references its symbols directly.
  target_link_libraries(aviary_torch INTERFACE
    "-Wl,--no-as-needed" "${AVIARY_LIBTORCH_CUDA}" "${AVIARY_LIBC10_CUDA}" "-Wl,--as-needed"
    CUDA::cudart)
  target_compile_definitions(aviary_torch INTERFACE AVIARY_TORCH_CUDA=1)
endif()
target_link_options(aviary_torch INTERFACE "-Wl,-rpath,${AVIARY_TORCH_LIBRARY_DIR}")
message(STATUS "Aviary: LibTorch ${AVIARY_TORCH_VERSION} at ${TORCH_ROOT} (CUDA tensors: ${AVIARY_TORCH_CUDA})")
