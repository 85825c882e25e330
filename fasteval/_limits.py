"""Limits shared by the Python layers and the compiled kernels, set once here.

setup.py reads this file as text (the package cannot be imported before it is built) and passes each
constant to the C++ and CUDA compilers as the ``FASTEVAL_<NAME>`` macro, which ``csrc/common/limits.h``
turns into a checked ``constexpr``.
"""

# The largest C whose (C, C) confusion matrix has at most 2**31 - 1 entries, so that every device can
# index its bins with 32-bit numbers: floor(sqrt(2**31 - 1)).
MAX_MATRIX_CLASSES = 46340
