"""Builds vitkern._C, the fused CPU kernels in csrc/, with torch's cpp_extension (ninja when present).

Set VITKERN_NO_EXT=1 to skip the extension (the package then runs on its 'reference' backend) and
VITKERN_PORTABLE=1 to build without -march=native.
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("VITKERN_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # no torch in the build environment: install without the extension
        CppExtension = None
    if CppExtension is not None:
        # The C++ standard is left to torch (C++17 up to 2.13, C++20 from 2.14).
        cxx = ["-O3", "-fopenmp", "-DNDEBUG"]
        if os.environ.get("VITKERN_PORTABLE") != "1":
            cxx.append("-march=native")
        ext_modules = [CppExtension("vitkern._C", sorted(glob.glob("csrc/*.cpp")),
                                    extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]

        class OptionalBuildExt(BuildExtension):
            """A failed compile (no compiler, say) installs the package without the extension."""

            def run(self):
                try:
                    super().run()
                except Exception as e:  # noqa: BLE001 - any build failure leaves the reference backend
                    print(f"vitkern: building the C++ extension failed ({e}); installing without it")

        cmdclass = {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}

setup(
    name="vitkern",
    packages=find_packages(include=["vitkern", "vitkern.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
