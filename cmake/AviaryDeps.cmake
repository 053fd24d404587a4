# Third-party libraries, all from Debian packages (see tools/setup.sh for the package names).
find_package(PkgConfig REQUIRED)
find_package(spdlog REQUIRED)
find_package(fmt REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(CLI11 REQUIRED)
pkg_check_modules(SENTENCEPIECE REQUIRED IMPORTED_TARGET sentencepiece)
pkg_check_modules(RE2 REQUIRED IMPORTED_TARGET re2)
# OpenMP: ATen's at::parallel_for (Aviary's CPU loops and attention) is inline, and runs in
# parallel only where it is compiled with OpenMP; without it every loop runs on one thread. The
# process keeps one libgomp.so.1: the LibTorch wheel's own (same soname) where it is loaded first.
find_package(OpenMP REQUIRED COMPONENTS CXX)
if(NOT TARGET yaml-cpp AND TARGET yaml-cpp::yaml-cpp)
  add_library(yaml-cpp ALIAS yaml-cpp::yaml-cpp)
endif()

# Open MPI: the CPU engine of dist::Comm (Debian: libopenmpi-dev, openmpi-bin). Optional: without
# it the library builds and trains on one process, and `parallel.backend: mpi` says what to install.
set(MPI_CXX_SKIP_MPICXX ON CACHE BOOL "Aviary calls the MPI C API only")
set(AVIARY_MPI AUTO CACHE STRING "Build the Open MPI engine: AUTO|ON|OFF")
set_property(CACHE AVIARY_MPI PROPERTY STRINGS AUTO ON OFF)
set(AVIARY_WITH_MPI OFF)
if(NOT AVIARY_MPI STREQUAL "OFF")
  if(AVIARY_MPI STREQUAL "ON")
    find_package(MPI REQUIRED COMPONENTS CXX)
  else()
    find_package(MPI COMPONENTS CXX)
  endif()
  if(MPI_CXX_FOUND)
    set(AVIARY_WITH_MPI ON)
  endif()
endif()
if(AVIARY_WITH_MPI)
  set(AVIARY_WITH_MPI_01 1)
  message(STATUS "Aviary: Open MPI engine on (${MPI_CXX_LIBRARIES}, mpiexec ${MPIEXEC_EXECUTABLE})")
else()
  set(AVIARY_WITH_MPI_01 0)
  message(STATUS "Aviary: no MPI found: distributed CPU training disabled")
endif()

# NCCL: the GPU engine of dist::Comm. The torch wheel depends on the nvidia-nccl wheel, whose
# headers and library sit next to torch in site-packages; a system NCCL (libnccl-dev) works too.
# Only with CUDA tensors (AVIARY_TORCH_CUDA), since the engine uses LibTorch's CUDA streams.
set(AVIARY_WITH_NCCL OFF)
if(AVIARY_TORCH_CUDA)
  find_path(AVIARY_NCCL_INCLUDE_DIR nccl.h
    HINTS "${TORCH_ROOT}/../nvidia/nccl/include" /usr/include NO_DEFAULT_PATH)
  find_library(AVIARY_NCCL_LIBRARY NAMES nccl libnccl.so.2
    HINTS "${TORCH_ROOT}/../nvidia/nccl/lib" /usr/lib/x86_64-linux-gnu NO_DEFAULT_PATH)
  if(AVIARY_NCCL_INCLUDE_DIR AND AVIARY_NCCL_LIBRARY)
    set(AVIARY_WITH_NCCL ON)
    add_library(aviary_nccl INTERFACE)
    target_include_directories(aviary_nccl SYSTEM INTERFACE "${AVIARY_NCCL_INCLUDE_DIR}")
    target_link_libraries(aviary_nccl INTERFACE "${AVIARY_NCCL_LIBRARY}")
  endif()
endif()
if(AVIARY_WITH_NCCL)
  set(AVIARY_WITH_NCCL_01 1)
  message(STATUS "Aviary: NCCL engine on (${AVIARY_NCCL_LIBRARY})")
else()
  set(AVIARY_WITH_NCCL_01 0)
  message(STATUS "Aviary: NCCL engine off (needs CUDA tensors and nccl.h)")
endif()
