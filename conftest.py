"""Collection rules for the doctests pytest runs over ``rotstn/``."""

import importlib.util

# The Triton kernels import triton at the top; triton is an optional extra.
collect_ignore = [] if importlib.util.find_spec("triton") else ["rotstn/_kernels/_triton_kernels.py"]
