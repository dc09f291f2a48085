"""cffi build script: compiles the native runtime (native/*.c, native/x86/*.c,
native/virtio/*.c) into
`native._vmm`. The cdef is the marked region of native/include/flotilla.h."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "include" / "flotilla.h"


def _cdef() -> str:
    text = HEADER.read_text()
    start = text.index("/* cdef-begin */") + len("/* cdef-begin */")
    return text[start : text.index("/* cdef-end */")]


def _sources() -> list[str]:
    # Paths relative to the project root, where setuptools runs the build.
    root = HERE.parent
    files = sorted(HERE.glob("*.c")) + sorted((HERE / "x86").glob("*.c"))
    files += sorted((HERE / "virtio").glob("*.c"))
    return [str(p.relative_to(root)) for p in files if p.name != "_vmm.c"]


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "native._vmm",
    '#include "include/flotilla.h"',
    sources=_sources(),
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
