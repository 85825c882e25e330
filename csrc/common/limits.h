#pragma once
// Limits shared with the Python layers. They are set once, in fasteval/_limits.py; setup.py passes each to
// the compilers as a FASTEVAL_<NAME> macro.
#include <cstdint>

#ifndef FASTEVAL_MAX_MATRIX_CLASSES
#error "FASTEVAL_MAX_MATRIX_CLASSES is defined by setup.py from fasteval/_limits.py"
#endif

namespace fasteval {

// The largest C whose (C, C) confusion matrix is indexable with 32-bit bin numbers on every device.
constexpr int64_t kMaxMatrixClasses = FASTEVAL_MAX_MATRIX_CLASSES;
static_assert(kMaxMatrixClasses * kMaxMatrixClasses <= INT32_MAX && (kMaxMatrixClasses + 1) * (kMaxMatrixClasses + 1) > INT32_MAX,
              "MAX_MATRIX_CLASSES in fasteval/_limits.py must be floor(sqrt(2^31 - 1))");

}  // namespace fasteval
