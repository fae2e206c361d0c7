# CUDA backend. Optional and auto-detected: when nvcc is found the CUDA sources are compiled into
# the library (FSA_WITH_CUDA); otherwise the build is CPU-only and CUDA tensors are rejected with a
# clear error. The knobs below shrink developer and CI builds.
option(FSA_ENABLE_CUDA "Build the CUDA backend when nvcc is found" ON)
set(FSA_CUDA_HEAD_DIMS "64;128;256" CACHE STRING "Kernel head-dim widths to instantiate")
set(FSA_CUDA_DTYPES "bf16;fp16" CACHE STRING "Kernel dtypes to instantiate")
set(FSA_CUDA_INSTANCES "" CACHE STRING
    "Kernel (head dim, dtype) pairs to instantiate, as <hdim>_<dtype> (e.g. '64_fp16;128_bf16'); \
empty: every pair of FSA_CUDA_HEAD_DIMS and FSA_CUDA_DTYPES")
set(FSA_CUDA_ARCHS "80;90a" CACHE STRING "CUDA architectures (sm_80 mma.sync path runs on Hopper too)")
set(FSA_CUTLASS_INCLUDE_DIR "" CACHE PATH
    "CuTe/CUTLASS include dir (default: .deps/cutlass/include from scripts/fetch_cutlass.sh)")

set(FSA_WITH_CUDA OFF)
if(FSA_ENABLE_CUDA)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(FSA_WITH_CUDA ON)
  endif()
endif()

if(NOT FSA_WITH_CUDA)
  if(FSA_ENABLE_CUDA)
    message(STATUS "flash-sparse-attn: CUDA backend OFF (nvcc not found)")
  else()
    message(STATUS "flash-sparse-attn: CUDA backend OFF (FSA_ENABLE_CUDA=OFF)")
  endif()
  return()
endif()

set(CMAKE_CUDA_ARCHITECTURES ${FSA_CUDA_ARCHS})
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)

if(NOT FSA_CUTLASS_INCLUDE_DIR)
  execute_process(COMMAND bash ${PROJECT_SOURCE_DIR}/scripts/fetch_cutlass.sh
                  RESULT_VARIABLE fetch_result)
  if(NOT fetch_result EQUAL 0)
    message(FATAL_ERROR "scripts/fetch_cutlass.sh failed: the CUDA backend needs the CuTe headers "
                        "of nvidia-cutlass 4.2.0.0 (or set FSA_CUTLASS_INCLUDE_DIR, or "
                        "-DFSA_ENABLE_CUDA=OFF)")
  endif()
  set(FSA_CUTLASS_INCLUDE_DIR ${PROJECT_SOURCE_DIR}/.deps/cutlass/include)
endif()

set(fsa_cuda_sources
  ${PROJECT_SOURCE_DIR}/src/cuda/backend.cu
  ${PROJECT_SOURCE_DIR}/src/cuda/compact.cu
  ${PROJECT_SOURCE_DIR}/src/cuda/thresholds.cu
  ${PROJECT_SOURCE_DIR}/src/cuda/mask_kernels.cu
  ${PROJECT_SOURCE_DIR}/src/cuda/memory_pool.cu
  ${PROJECT_SOURCE_DIR}/src/cuda/plan_graph.cu
)
# The instantiated (head dim, dtype) pairs: FSA_CUDA_INSTANCES, or the product of the two lists.
# (CI compiles one dtype per head dim: both dtypes' code, half the kernel sources.)
set(fsa_cuda_instances ${FSA_CUDA_INSTANCES})
if(NOT fsa_cuda_instances)
  foreach(hdim ${FSA_CUDA_HEAD_DIMS})
    foreach(dtype ${FSA_CUDA_DTYPES})
      list(APPEND fsa_cuda_instances ${hdim}_${dtype})
    endforeach()
  endforeach()
endif()
foreach(instance ${fsa_cuda_instances})
  if(NOT instance MATCHES "^(64|128|256)_(bf16|fp16)$")
    message(FATAL_ERROR "FSA_CUDA_INSTANCES: '${instance}' is not <hdim>_<dtype> with hdim 64, "
                        "128 or 256 and dtype bf16 or fp16")
  endif()
  set(gen ${PROJECT_SOURCE_DIR}/src/cuda/generated/forward_hdim${instance}.cu)
  if(NOT EXISTS ${gen})
    message(FATAL_ERROR "${gen} does not exist: run scripts/generate_kernels.py, or fix "
                        "FSA_CUDA_HEAD_DIMS / FSA_CUDA_DTYPES / FSA_CUDA_INSTANCES")
  endif()
  list(APPEND fsa_cuda_sources ${gen})
  target_compile_definitions(fsa PRIVATE FSA_CUDA_BUILT_${instance}=1)
  set(gen_bwd ${PROJECT_SOURCE_DIR}/src/cuda/generated/backward_hdim${instance}.cu)
  if(EXISTS ${gen_bwd})
    list(APPEND fsa_cuda_sources ${gen_bwd})
    target_compile_definitions(fsa PRIVATE FSA_CUDA_BWD_BUILT_${instance}=1)
  endif()
endforeach()

target_sources(fsa PRIVATE ${fsa_cuda_sources})
# The Hopper kernels (wgmma) exist only in an sm_90a image; without one, sm_90 devices run the
# sm80 kernels (from the sm_80 image or its PTX).
if("90a" IN_LIST FSA_CUDA_ARCHS)
  target_compile_definitions(fsa PRIVATE FSA_CUDA_HAS_SM90A=1)
endif()
set_target_properties(fsa PROPERTIES CUDA_ARCHITECTURES "${FSA_CUDA_ARCHS}")
target_compile_definitions(fsa PUBLIC FSA_WITH_CUDA)
target_include_directories(fsa SYSTEM PRIVATE ${FSA_CUTLASS_INCLUDE_DIR})
# Static cudart: a Python process that loads torch (with its own cudart) and this extension in
# either order must not end up with two runtimes.
target_link_libraries(fsa PUBLIC CUDA::cudart_static)
# -lineinfo for profilers; spills are reported (DESIGN kernel rule 7).
target_compile_options(fsa PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo
                       -Xptxas=--warn-on-spills>)
message(STATUS "flash-sparse-attn: CUDA backend ON (${CMAKE_CUDA_COMPILER}; archs ${FSA_CUDA_ARCHS}; "
               "instances ${fsa_cuda_instances})")
