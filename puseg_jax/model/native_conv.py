"""Native 3x3 convolution kernels for the CPU, compiled on this machine.

Two XLA FFI handlers in `native/`, each beating what XLA:CPU runs for the same sum on the
layers the 'native' plan gives them (benchmarks/README.md, "The 'native' plan"):

  * `conv3x3_weight_grad` (`native/conv3x3_weight_grad.cc`): the weight gradient as a direct
    sum. XLA computes it as a convolution whose "kernel" is the whole image, about 3x oneDNN's
    time at large images with few channels, and no formulation XLA can compile does better; on a
    2-core AMD EPYC Zen 4 this takes 50 ms against XLA's 164 at 8x256x256 32 -> 32.
  * `conv3x3` and `conv3x3_input_grad` (`native/conv3x3_winograd.cc`): the convolution and its
    input gradient by Winograd's F(2x2, 3x3), 16 multiplications for each 2x2 block of outputs
    where the direct sum takes 36: 121 ms against Eigen's 172 at 8x384x384 32 -> 32.

Both are compiled into one library on first use with the machine's C++ compiler ($CXX, else
g++, c++ or clang++; `-O3 -march=native`, against the FFI headers jaxlib ships) into a cache
folder ($PUSEG_NATIVE_CACHE, else $XDG_CACHE_HOME/puseg_jax/native or
~/.cache/puseg_jax/native), one library per source, compiler, jaxlib version and CPU model, so
a home folder shared by machines of different kinds never loads another's build. Nothing is
downloaded. Without a compiler, with a failed build or with $PUSEG_NATIVE=0 they are
unavailable (`available()` is False and `unavailable_reason()` says why) and conv_ops keeps
XLA's convolutions.

This module imports only the standard library and jax.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCES = tuple(
    Path(__file__).resolve().parent / "native" / name
    for name in ("conv3x3_weight_grad.cc", "conv3x3_winograd.cc")
)
TARGET = "puseg_conv3x3_weight_grad"
WINOGRAD_TARGET = "puseg_conv3x3_winograd"
# The channel counts the Winograd convolution takes: multiples of the widest vector it uses.
WINOGRAD_CHANNEL_MULTIPLE = 16
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_state: dict = {}  # 'ok' (bool), 'reason' (str), 'library' (the loaded ctypes.CDLL)


def _cpu_model() -> str:
    """Model name and flags of the first CPU in /proc/cpuinfo ('' where unreadable)."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    lines.append(line.strip())
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return "\n".join(lines)


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    for name in ("g++", "c++", "clang++"):
        if path := shutil.which(name):
            return path
    return None


def _cache_dir() -> Path:
    if os.environ.get("PUSEG_NATIVE_CACHE"):
        return Path(os.environ["PUSEG_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "puseg_jax" / "native"


def library_path(compiler: str) -> Path:
    """Where the build of this source, compiler, jaxlib and CPU model lives."""
    key = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES), compiler.encode(), " ".join(_FLAGS).encode()):
        key.update(part)
    key.update(jax.__version__.encode())
    key.update(_cpu_model().encode())
    return _cache_dir() / f"conv3x3-{key.hexdigest()[:16]}.so"


def _build(compiler: str, out: Path) -> None:
    """Compiles SOURCES into `out` (atomically: concurrent processes never load half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = Path(tmp) / out.name
        command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o"]
        result = subprocess.run(
            [*command, str(partial), "-lpthread"], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, out)


def _load() -> None:
    if os.environ.get("PUSEG_NATIVE", "1") == "0":
        _state.update(ok=False, reason="disabled by PUSEG_NATIVE=0")
        return
    compiler = _compiler()
    if compiler is None:
        _state.update(ok=False, reason="no C++ compiler ($CXX, g++, c++ or clang++) on PATH")
        return
    path = library_path(compiler)
    try:
        if not path.is_file():
            _build(compiler, path)
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.Conv3x3Dw), platform="cpu")
        jax.ffi.register_ffi_target(
            WINOGRAD_TARGET, jax.ffi.pycapsule(library.Conv3x3Winograd), platform="cpu"
        )
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _state.update(ok=False, reason=f"build or load failed: {e}")
        return
    _state.update(ok=True, reason="", library=library, path=str(path))


def available() -> bool:
    """Whether the native weight gradient can run here (building it on the first call)."""
    with _lock:
        if not _state:
            _load()
        return _state["ok"]


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    available()
    return _state["reason"]


def conv3x3_weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """dW[i, j, c, k] = sum_{n,h,w} xpad[n, h + i, w + j, c] * g[n, h, w, k], float32, on the CPU.

    The same sum as `conv_ops.conv3x3_weight_grad` and XLA's own weight gradient of a 3x3 'SAME'
    stride-1 NHWC convolution (HWIO result), in another order of summation.

    Args:
      x: the convolution's input, [N, H, W, C] float32.
      g: the cotangent of its output, [N, H, W, K] float32.

    Returns:
      [3, 3, C, K] float32.
    """
    if not available():
        raise RuntimeError(f"the native weight gradient is unavailable: {unavailable_reason()}")
    if x.dtype != jnp.float32 or g.dtype != jnp.float32:
        raise TypeError(f"float32 only, got {x.dtype} and {g.dtype}")
    if x.ndim != 4 or g.shape[:3] != x.shape[:3]:
        raise ValueError(f"expected [N, H, W, C] and [N, H, W, K], got {x.shape} and {g.shape}")
    out = jax.ShapeDtypeStruct((3, 3, x.shape[-1], g.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, g)


# F(2x2, 3x3)'s kernel transform (Lavin and Gray, 2016): U = G W G^T for each (c, k).
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_kernel(kernel: jax.Array) -> jax.Array:
    """[3, 3, C, K] HWIO kernel -> [16, C, K], U[4a + b] = sum_ij G[a, i] G[b, j] W[i, j]."""
    g = jnp.asarray(_G, jnp.float32)
    u = jnp.einsum("ai,bj,ijck->abck", g, g, kernel.astype(jnp.float32))
    return u.reshape(16, *kernel.shape[2:])


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """y[n, h, w, k] = sum_{i,j,c} xpad[n, h + i, w + j, c] * W[i, j, c, k], float32, on the CPU.

    XLA's 3x3 'SAME' stride-1 NHWC/HWIO convolution, computed by Winograd's F(2x2, 3x3) in
    `native/conv3x3_winograd.cc`: 16 multiplications for each 2x2 block of outputs where the
    direct sum takes 36, at the price of a few additions and float32 rounding of the order of
    the direct sum's (the tests bound it).

    Args:
      x: [N, H, W, C] float32, C a multiple of WINOGRAD_CHANNEL_MULTIPLE.
      kernel: [3, 3, C, K] float32, K a multiple of WINOGRAD_CHANNEL_MULTIPLE.

    Returns:
      [N, H, W, K] float32.
    """
    if not available():
        raise RuntimeError(f"the native convolution is unavailable: {unavailable_reason()}")
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise TypeError(f"float32 only, got {x.dtype} and {kernel.dtype}")
    if x.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[-1]):
        raise ValueError(f"expected [N, H, W, C] and [3, 3, C, K], got {x.shape}, {kernel.shape}")
    if x.shape[-1] % WINOGRAD_CHANNEL_MULTIPLE or kernel.shape[-1] % WINOGRAD_CHANNEL_MULTIPLE:
        raise ValueError(
            f"channels must be multiples of {WINOGRAD_CHANNEL_MULTIPLE}, got {kernel.shape[2:]}"
        )
    out = jax.ShapeDtypeStruct((*x.shape[:3], kernel.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(WINOGRAD_TARGET, out, vmap_method="sequential")(
        x, winograd_kernel(kernel)
    )


def conv3x3_input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
    """The input gradient of `conv3x3` (and of XLA's convolution): the convolution of the output
    cotangent g [N, H, W, K] with the kernel turned by 180 degrees, C and K swapped."""
    return conv3x3(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
