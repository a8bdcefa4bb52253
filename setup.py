"""Build the Cython hot path (kernels/*.pyx) into scheduler._native.

Sources live in kernels/ so the tree shows where the compiled code is; the built
modules land inside the scheduler package so `import scheduler._native.<name>` works
from an installed wheel and from an editable install alike.
"""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

KERNELS = Path("kernels")
PROTOS = Path("proto")
PROTO_PACKAGE = "scheduler/_proto"


def compile_protos() -> None:
    """Generate scheduler/_proto from proto/**/*.proto (kvsched's own gRPC API).

    Runs on every setup.py invocation (wheel, editable install, build_ext --inplace) so the
    generated modules exist before setuptools lists the packages. The virtual include path
    makes the generated stubs import each other as scheduler._proto.*.
    """
    protos = sorted(PROTOS.glob("**/*.proto"))
    if not protos:
        return
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = [f"{PROTO_PACKAGE}/{proto.relative_to(PROTOS).as_posix()}" for proto in protos]
    args = [
        "grpc_tools.protoc",
        f"-I{well_known}",
        f"-I{PROTO_PACKAGE}={PROTOS}",
        "--python_out=.",
        "--pyi_out=.",
        "--grpc_python_out=.",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(sources)}")
    for source in sources:
        package = Path(source).parent
        while True:
            (package / "__init__.py").touch()
            if package == Path(PROTO_PACKAGE):
                break
            package = package.parent


compile_protos()

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
