"""Packaging glue that pyproject.toml cannot express.

The Triton kernels live in the top-level ``kernels/`` directory and are installed as
``streamt1_engine.kernels``. C++/CUDA sources in ``csrc/`` are built only when
``STREAMT1_BUILD_CSRC=1`` is set, so a plain install never needs a compiler or CUDA.
"""
import glob
import os

from setuptools import find_packages, setup


def _kernel_packages():
    pkgs = ["streamt1_engine.kernels"]
    for sub in find_packages("kernels"):
        pkgs.append("streamt1_engine.kernels." + sub)
    return pkgs


def _optional_extensions():
    if os.environ.get("STREAMT1_BUILD_CSRC") != "1":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    return [CUDAExtension("streamt1_engine._C", sources)], {"build_ext": BuildExtension}


ext_modules, cmdclass = _optional_extensions()

setup(
    packages=find_packages(include=["streamt1_engine", "streamt1_engine.*"]) + _kernel_packages(),
    package_dir={"streamt1_engine.kernels": "kernels"},
    package_data={"streamt1_engine": ["assets/tiny/*", "serving/*.html"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
