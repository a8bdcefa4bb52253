"""Build the Cython hot path (kernels/*.pyx) and the native ext_proc transport
(kernels/extproc/*.cc) into scheduler._native.

Sources live in kernels/ so the tree shows where the compiled code is; the built
modules land inside the scheduler package so `import scheduler._native.<name>` works
from an installed wheel and from an editable install alike.

The native ext_proc transport needs gRPC C++, protobuf and simdjson (Debian:
libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev libsimdjson-dev pkg-config). It is
built when pkg-config finds them and skipped (with a message) when not: kvsched then serves
ext_proc with its Python transport. KVSCHED_NATIVE_EXTPROC=1 makes a missing library an
error (the container image and CI), =0 skips the build.
"""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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


def _pkg_config(*args: str) -> list[str]:
    return subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True).stdout.split()


def native_extproc() -> list[Extension]:
    """scheduler._native.extproc, or nothing when its libraries are missing (and not required)."""
    wanted = os.environ.get("KVSCHED_NATIVE_EXTPROC", "auto")
    if wanted == "0":
        print("kvsched: native ext_proc transport not built (KVSCHED_NATIVE_EXTPROC=0)", file=sys.stderr)
        return []
    packages = ("grpc++", "protobuf", "simdjson")
    tools = {name: shutil.which(name) for name in ("pkg-config", "protoc", "grpc_cpp_plugin")}
    missing = [name for name, path in tools.items() if path is None]
    if not missing:
        missing = [p for p in packages if subprocess.run(["pkg-config", "--exists", p]).returncode != 0]
    if missing:
        message = (
            f"kvsched: native ext_proc transport not built: {', '.join(missing)} not found "
            "(apt-get install libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev libsimdjson-dev "
            "pkg-config); ext_proc is served by the Python transport"
        )
        if wanted == "1":
            raise SystemExit(message)
        print(message, file=sys.stderr)
        return []
    sys.path.insert(0, str(KERNELS / "extproc"))
    try:
        import gen_protos
    finally:
        sys.path.pop(0)
    generated = Path("build") / "extproc_protos"
    protos = gen_protos.generate(generated, str(tools["protoc"]), str(tools["grpc_cpp_plugin"]))
    version = _pkg_config("--modversion", "grpc++")[0]
    print(f"kvsched: building the native ext_proc transport (grpc++ {version})", file=sys.stderr)
    flags = _pkg_config("--cflags", *packages)
    return [
        Extension(
            "scheduler._native.extproc",
            sorted(str(path) for path in (KERNELS / "extproc").glob("*.cc")) + [str(p) for p in protos],
            include_dirs=[str(generated), str(KERNELS / "extproc")],
            # -g0: debug info adds about a quarter to the compile time (exchange.cc: 6.7-7.2 s of
            # CPU with -g, 5.3-5.7 s without) for a module nobody steps through in a debugger.
            extra_compile_args=["-std=c++17", "-O2", "-g0", *flags],
            extra_link_args=_pkg_config("--libs", *packages),
            language="c++",
        )
    ]


class ParallelBuildExt(build_ext):
    """build_ext with every compiler process it can run at once: one per CPU (or ``-j N``).

    setuptools compiles an extension's sources one after another, and its own ``-j`` only
    builds whole extensions side by side: the native transport alone is 16 C++ files (6 of
    its own, 10 generated from Envoy's protos). Here each extension's sources compile side
    by side as well. Each job is its own compiler process, so threads are enough to drive
    them. On a 2-core machine a whole build (`build_ext --force`) takes 86-95 s instead of 149.
    """

    def build_extensions(self) -> None:
        # -j N asks for N compilers; otherwise (or -j with no number) one per CPU.
        requested = self.parallel
        explicit = isinstance(requested, int) and not isinstance(requested, bool) and requested > 0
        jobs = requested if explicit else (os.cpu_count() or 1)
        # Extensions side by side too (setuptools' own pool), so that the single-source Cython
        # modules compile beside the transport's files.
        self.parallel = jobs
        compiler = self.compiler
        serial_compile = compiler.compile

        def compile_side_by_side(
            sources,
            output_dir=None,
            macros=None,
            include_dirs=None,
            debug=0,
            extra_preargs=None,
            extra_postargs=None,
            depends=None,
        ):
            if jobs < 2 or len(sources) < 2:
                return serial_compile(
                    sources, output_dir, macros, include_dirs, debug, extra_preargs, extra_postargs, depends
                )
            macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
                output_dir, macros, include_dirs, sources, depends, extra_postargs
            )
            cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)

            def compile_one(obj):
                source, extension = build[obj]
                compiler._compile(obj, source, extension, cc_args, extra_postargs, pp_opts)

            with ThreadPoolExecutor(jobs) as pool:
                # list(): a failed compile raises here, as the serial loop would.
                list(pool.map(compile_one, [obj for obj in objects if obj in build]))
            return objects

        # Only where compile() is the base class's loop over _compile() (Unix compilers); a
        # compiler with a compile() of its own (MSVC) keeps it.
        base = next((c for c in type(compiler).__mro__ if "_setup_compile" in vars(c)), None)
        if base is not None and type(compiler).compile is vars(base).get("compile"):
            compiler.compile = compile_side_by_side
        super().build_extensions()


compile_protos()

extensions = [
    Extension(
        f"scheduler._native.{pyx.stem}",
        [str(pyx)],
        # The C the .pyx files include (promscan.h, scrapeloop.h): a change rebuilds them.
        depends=[str(header) for header in sorted(KERNELS.glob("*.h"))],
        extra_compile_args=["-O3"],
    )
    for pyx in sorted(KERNELS.glob("*.pyx"))
]

setup(
    cmdclass={"build_ext": ParallelBuildExt},
    ext_modules=native_extproc()
    + cythonize(
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
