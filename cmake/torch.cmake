# Finds libtorch inside the PyPI torch wheel. Owned by the runtime work: sets
# WBROKER_HAVE_TORCH (ON/OFF) and, when ON, the imported target wbroker::torch.
#
# find_package(Torch) is deliberately not used: the wheel's Caffe2 config
# insists on a CUDA toolkit for a CUDA build of torch, which breaks every
# machine without one even though only the prebuilt libraries are needed.
# wbroker::torch is therefore assembled by hand from the wheel's layout:
#   torch/include, torch/include/torch/csrc/api/include   (SYSTEM headers)
#   torch/lib/libtorch.so, libtorch_cpu.so, libc10.so     (+ CUDA parts when present)

set(WBROKER_TORCH AUTO CACHE STRING "Build the libtorch model runtime: AUTO, ON or OFF")
set_property(CACHE WBROKER_TORCH PROPERTY STRINGS AUTO ON OFF)

if(EXISTS "${CMAKE_SOURCE_DIR}/.venv/bin/python")
  set(_wb_default_python "${CMAKE_SOURCE_DIR}/.venv/bin/python")
else()
  find_program(_wb_default_python NAMES python3 python)
endif()
set(WBROKER_PYTHON "${_wb_default_python}" CACHE FILEPATH
    "Python interpreter whose torch package provides libtorch")

set(WBROKER_HAVE_TORCH OFF)
set(_wb_torch_why "")

# Reports why torch is not used: fatal with WBROKER_TORCH=ON, a STATUS line otherwise.
macro(_wb_torch_unavailable why)
  set(_wb_torch_why "${why}")
  if(WBROKER_TORCH STREQUAL "ON")
    message(FATAL_ERROR "WBROKER_TORCH=ON but libtorch is unusable: ${why} "
                        "(set WBROKER_PYTHON, or configure with -DWBROKER_TORCH=OFF)")
  endif()
endmacro()

if(WBROKER_TORCH STREQUAL "OFF")
  set(_wb_torch_why "WBROKER_TORCH=OFF")
elseif(NOT WBROKER_PYTHON OR NOT EXISTS "${WBROKER_PYTHON}")
  _wb_torch_unavailable("no Python interpreter (WBROKER_PYTHON='${WBROKER_PYTHON}')")
else()
  # One interpreter call: the package dir, the C++ ABI flag and the version.
  execute_process(
    COMMAND "${WBROKER_PYTHON}" -c
            "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__)"
    OUTPUT_VARIABLE _wb_torch_out ERROR_VARIABLE _wb_torch_err RESULT_VARIABLE _wb_torch_rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _wb_torch_rc EQUAL 0)
    string(REGEX REPLACE "\n$" "" _wb_torch_err "${_wb_torch_err}")
    string(REGEX MATCH "[^\n]*$" _wb_torch_err "${_wb_torch_err}")
    _wb_torch_unavailable("'${WBROKER_PYTHON}' cannot import torch (${_wb_torch_err})")
  else()
    string(REPLACE "\n" ";" _wb_torch_out "${_wb_torch_out}")
    list(GET _wb_torch_out 0 _wb_torch_dir)
    list(GET _wb_torch_out 1 _wb_torch_abi)
    list(GET _wb_torch_out 2 _wb_torch_version)
    set(_wb_torch_lib "${_wb_torch_dir}/lib")
    set(_wb_torch_missing "")
    foreach(_f include/ATen/ATen.h include/torch/csrc/api/include/torch/types.h
               lib/libtorch.so lib/libtorch_cpu.so lib/libc10.so)
      if(NOT EXISTS "${_wb_torch_dir}/${_f}")
        list(APPEND _wb_torch_missing "${_f}")
      endif()
    endforeach()
    if(_wb_torch_missing)
      _wb_torch_unavailable("the torch package at ${_wb_torch_dir} lacks ${_wb_torch_missing}")
    else()
      set(WBROKER_HAVE_TORCH ON)
    endif()
  endif()
endif()

if(WBROKER_HAVE_TORCH AND NOT TARGET wbroker::torch)
  add_library(wbroker::torch INTERFACE IMPORTED GLOBAL)
  target_include_directories(wbroker::torch SYSTEM INTERFACE
    "${_wb_torch_dir}/include" "${_wb_torch_dir}/include/torch/csrc/api/include")
  target_compile_definitions(wbroker::torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_wb_torch_abi})
  # libtorch.so exports its own (statically linked) copy of std::filesystem;
  # listed first, it would interpose on libstdc++'s for the whole program and
  # crashes in e.g. fs::remove_all. Putting libstdc++ ahead of it in
  # DT_NEEDED gives the lookup order a Python process has.
  set(_wb_torch_libs "-Wl,--push-state,--no-as-needed" "-lstdc++" "-Wl,--pop-state"
                     "${_wb_torch_lib}/libtorch.so" "${_wb_torch_lib}/libtorch_cpu.so"
                     "${_wb_torch_lib}/libc10.so")
  # A CUDA build of the wheel: nothing in wbroker references a libtorch_cuda
  # symbol, so the linker would drop it under --as-needed and CUDA tensors
  # would fail at run time ("no CUDA backend"); force it into DT_NEEDED. Its
  # own dependencies (cudart, cublas ... from the nvidia-* wheels) are found
  # through the RUNPATH the wheel baked into it.
  set(_wb_torch_cuda OFF)
  if(EXISTS "${_wb_torch_lib}/libtorch_cuda.so" AND EXISTS "${_wb_torch_lib}/libc10_cuda.so")
    set(_wb_torch_cuda ON)
    list(APPEND _wb_torch_libs "-Wl,--no-as-needed" "${_wb_torch_lib}/libtorch_cuda.so"
         "${_wb_torch_lib}/libc10_cuda.so" "-Wl,--as-needed")
  endif()
  target_link_libraries(wbroker::torch INTERFACE ${_wb_torch_libs}
                        "-Wl,-rpath,${_wb_torch_lib}" Threads::Threads)
  message(STATUS "wbroker: libtorch ON (torch ${_wb_torch_version} at ${_wb_torch_dir}, "
                 "cxx11 abi ${_wb_torch_abi}, cuda libs ${_wb_torch_cuda})")
elseif(NOT WBROKER_HAVE_TORCH)
  message(STATUS "wbroker: libtorch OFF, model runtime not built: ${_wb_torch_why}")
endif()
