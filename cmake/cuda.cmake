# CUDA backend detection. CUDA is optional: when nvcc is found and src/cuda has sources, they are
# compiled into the library (FSA_WITH_CUDA); otherwise the build is CPU-only and CUDA tensors are
# rejected with a clear error.
option(FSA_ENABLE_CUDA "Build the CUDA backend when nvcc is found" ON)

file(GLOB FSA_CUDA_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/cuda/*.cu
     ${PROJECT_SOURCE_DIR}/src/cuda/generated/*.cu)
set(FSA_WITH_CUDA OFF)
if(FSA_ENABLE_CUDA)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER AND FSA_CUDA_SOURCES)
    set(FSA_WITH_CUDA ON)
  endif()
endif()

if(FSA_WITH_CUDA)
  enable_language(CUDA)
  message(STATUS "flash-sparse-attn: CUDA backend ON (${CMAKE_CUDA_COMPILER})")
  target_sources(fsa PRIVATE ${FSA_CUDA_SOURCES})
  target_compile_definitions(fsa PUBLIC FSA_WITH_CUDA)
else()
  if(NOT FSA_ENABLE_CUDA)
    message(STATUS "flash-sparse-attn: CUDA backend OFF (FSA_ENABLE_CUDA=OFF)")
  elseif(NOT FSA_CUDA_SOURCES)
    message(STATUS "flash-sparse-attn: CUDA backend OFF (no CUDA sources in this version)")
  else()
    message(STATUS "flash-sparse-attn: CUDA backend OFF (nvcc not found)")
  endif()
endif()
