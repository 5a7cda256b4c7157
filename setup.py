"""Builds the optional C kernels of the merge engine; everything else is in pyproject.toml.

The extension is ``optional``: where it cannot be compiled (no C compiler) modelfuse
installs without it and the merge methods run their torch code instead (same results,
slower on CPU). The flags keep IEEE float semantics exact (no fast-math, no fused
multiply-adds; not assuming that float operations trap changes no result and lets loops
with selects vectorise), which the kernels need to give the torch path's bytes.
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    FLAGS = ["/O2", "/fp:precise"]
else:
    FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]

setup(
    ext_modules=[
        Extension(
            "modelfuse.merge.methods._ckernels",
            sources=["src/modelfuse/merge/methods/_ckernels.c"],
            extra_compile_args=FLAGS,
            optional=True,
        )
    ]
)
