// Included by each isa_*.cpp: everything the element loops need from outside, included before
// the translation unit switches the compiler's target, so that no external inline function of a
// library header is compiled for an instruction set the machine may lack.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fusedtrain/dtype_convert.h"
#include "kernel_table.h"

// A kernel table entry left out must not compile (see the tables in isa_*.cpp).
#pragma GCC diagnostic error "-Wmissing-field-initializers"
