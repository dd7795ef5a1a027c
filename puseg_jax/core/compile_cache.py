"""JAX's persistent compilation cache, on by default (`config.compile_cache_dir='auto'`).

A run's first train step compiles for seconds to tens of seconds; a second run of the same
config (the next seed, a resumed queue, `python -m puseg_jax.evaluate` on the same model)
loads the compiled programs from the cache instead (benchmarks/README.md, "Where a run's
time goes").
"""

import hashlib
import os
import platform

import jax
from jax.experimental.compilation_cache import compilation_cache


def default_compile_cache_dir() -> str:
    """The cache folder of `compile_cache_dir='auto'`: one per jax version and machine.

    `~/.cache/puseg_jax/jax_compilation_cache/<jax version>-<fingerprint>` ($XDG_CACHE_HOME
    when set), the fingerprint a hash of the CPU model and flags: a home folder shared by
    machines of several CPU kinds never offers one kind's executables to another (JAX would
    reject them and compile again, with an error line per program).
    """
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [x for x in f if x.startswith(("model name", "flags"))]
        cpu += "".join(sorted(set(lines)))
    except OSError:
        cpu += platform.processor()
    fingerprint = hashlib.sha1(cpu.encode()).hexdigest()[:12]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(
        root, "puseg_jax", "jax_compilation_cache", f"{jax.__version__}-{fingerprint}"
    )


def use_compile_cache(cache_dir: str) -> None:
    """Turns on JAX's persistent compilation cache in `cache_dir`: a second run of the same
    program loads its compiled steps instead of compiling them.

    Args:
      cache_dir: the cache directory (created if missing); 'auto': $JAX_COMPILATION_CACHE_DIR
        when set, else `default_compile_cache_dir()`; '': JAX's own setting (off unless the
        environment sets it).
    """
    if cache_dir == "auto":
        if jax.config.jax_compilation_cache_dir:  # set by the environment or by the caller
            return
        cache_dir = default_compile_cache_dir()
    if not cache_dir or jax.config.jax_compilation_cache_dir == cache_dir:
        return
    os.makedirs(cache_dir, exist_ok=True)
    compilation_cache.set_cache_dir(cache_dir)
    # JAX decides once per process whether the cache is used, at the first compilation: make it
    # decide again, so that the setting also holds in a process that compiled before (a notebook).
    compilation_cache.reset_cache()
