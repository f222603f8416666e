"""Collection rules for the doctests pytest runs over ``rotstn/``."""

import importlib.util

# The Triton kernels import triton at the top; triton is an optional extra.
collect_ignore = [] if importlib.util.find_spec("triton") else ["rotstn/_kernels/_triton_kernels.py"]
# Zarr / OME-Zarr stacks need the dask extra (zarr, ome-zarr); their doctests run where it is installed.
if not (importlib.util.find_spec("zarr") and importlib.util.find_spec("ome_zarr")):
    collect_ignore.append("rotstn/_io_zarr.py")
