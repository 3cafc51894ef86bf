"""Builds ossie's C kernels (csrc/) as ossie._kernels; everything else is in pyproject.toml.

The extension is optional: without a C compiler ossie installs and runs on its pure-torch path.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ["csrc/module.c", "csrc/kernels.c", "csrc/pool.c", "csrc/x86_avx2.c", "csrc/x86_avx2_attention.c",
           "csrc/x86_avx512.c", "csrc/x86_q8_prompts.c", "csrc/neon.c", "csrc/neon_attention.c",
           "csrc/prompt_attention.c"]
# -ffp-contract=off: a * b + c in C stays two roundings unless a kernel fuses it on purpose (SFMA, intrinsics); GCC
# would otherwise fuse where it likes on ARM64, and the NEON kernels could not repeat the scalar ones bit for bit.
FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fvisibility=hidden"]


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler: the torch path still works
            print(f"warning: ossie's C kernels were not built ({e}); using the pure-torch path")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"warning: ossie's C kernels were not built ({e}); using the pure-torch path")


setup(
    ext_modules=[Extension("ossie._kernels", SOURCES,
                           depends=["csrc/kernels.h", "csrc/internal.h", "csrc/x86_avx2.h", "csrc/neon.h"],
                           extra_compile_args=FLAGS, extra_link_args=["-lpthread"])],
    cmdclass={"build_ext": OptionalBuildExt},
)
