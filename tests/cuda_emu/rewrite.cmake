# Copies a .cu file to OUT with every kernel launch `name<args><<<config>>>(` rewritten as
# `::dpt_emu::launch(config)([](auto... a) { name<args>(a...); }, ` (tests/cuda_emu/emu.h), for
# the CUDA emulator build.
# Usage: cmake -DIN=kernels/cuda/x.cu -DOUT=build/emu/x.cpp -P rewrite.cmake
file(READ "${IN}" text)
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_]*(<[^<>;()]*>)?)<<<([^>]*)>>>\\("
  "::dpt_emu::launch(\\3)([](auto... a) { \\1(a...); }, " text "${text}")
if(text MATCHES "<<<")
  message(FATAL_ERROR "${IN}: a kernel launch the CUDA emulator cannot rewrite")
endif()
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${text}")
file(RENAME "${OUT}.tmp" "${OUT}")
