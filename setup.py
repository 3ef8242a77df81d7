"""Packaging glue that pyproject.toml cannot express.

The Triton kernels' op packages live in the top-level ``kernels/`` directory (no ``__init__.py``, so it never
shadows Hugging Face's ``kernels``) and are installed as subpackages of ``streamt1_engine.kernels``. C++/CUDA sources in ``csrc/`` are built only when
``STREAMT1_BUILD_CSRC=1`` is set, so a plain install never needs a compiler or CUDA.
"""
import glob
import os

from setuptools import find_packages, setup


def _kernel_op_dirs():
    """``streamt1_engine.kernels.<op>`` -> ``kernels/<op>`` for every op package (nested ones follow)."""
    return {"streamt1_engine.kernels." + sub: "kernels/" + sub.replace(".", "/") for sub in find_packages("kernels")}


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
    packages=find_packages(include=["streamt1_engine", "streamt1_engine.*"]) + list(_kernel_op_dirs()),
    package_dir=_kernel_op_dirs(),
    package_data={"streamt1_engine": ["assets/tiny/*", "serving/*.html"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
