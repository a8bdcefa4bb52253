"""Build the Cython hot path (kernels/*.pyx) into scheduler._native.

Sources live in kernels/ so the tree shows where the compiled code is; the built
modules land inside the scheduler package so `import scheduler._native.<name>` works
from an installed wheel and from an editable install alike.
"""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

KERNELS = Path("kernels")

extensions = [
    Extension(
        f"scheduler._native.{pyx.stem}",
        [str(pyx)],
        extra_compile_args=["-O3"],
    )
    for pyx in sorted(KERNELS.glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
