"""Full U-Net train step: puseg_jax (JAX/Flax) against the same network in PyTorch (and MONAI).

One step is forward, pixel-wise cross-entropy, backward and an Adam update, on a fixed random
batch that stays on the device. Each framework configuration runs in its own worker process;
the parent drives them in turn, one timed round each, round after round, so every framework
sees the same machine conditions (this matters on a shared CPU) and each worker's peak resident
memory is its framework's alone. Reported: median seconds per step after warm-up, images/s,
achieved GFLOP/s (analytic count of the convolution FLOPs: forward, input and weight gradients)
against the machine's peak measured in the same run (a large matmul in each framework), peak
memory, and the ratio to PyTorch channels_last.

Usage (CPU, from the repository root):
  python benchmarks/bench_train_step.py --shapes demo fundus prostate --impl fast --steps 5
GPU (bf16 for both frameworks): see benchmarks/gpu.sh.

Only numpy, jax, flax, optax, torch (and optionally monai) are imported, so that the script runs
on a machine with none of the project's other dependencies (PYTHONPATH=. for puseg_jax).
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import queue
import resource
import subprocess
import sys
import threading
import time

import numpy as np

SHAPES = {
    # name: (batch, height, width, in_channels, classes, widths)
    "tiny": (2, 16, 16, 3, 2, (4, 8, 16)),  # gpu.sh --cpu: checks that every part runs
    "demo": (16, 64, 64, 3, 2, (8, 16, 32, 64, 128)),
    "fundus": (8, 256, 256, 3, 3, (32, 64, 128, 256, 512)),
    "prostate": (8, 384, 384, 1, 2, (32, 64, 128, 256, 512)),
}
MARK = "@@bench "
LR = 1e-3


# ---------------------------------------------------------------- FLOP count


def unet_train_flops(batch, height, width, in_ch, classes, widths) -> float:
    """Multiply-adds x 2 of all convolutions of one train step (forward + both gradients).

    The first convolution needs no input gradient (the images are not differentiated); norms,
    activations, pooling and the optimizer are left out (they are memory-bound).
    """

    def conv(h, w, cin, cout, k):
        return 2.0 * batch * h * w * cin * cout * k * k

    fwd, first = 0.0, None
    h, w, cin = height, width, in_ch
    for i, c in enumerate(widths):
        if i > 0:
            h, w = h // 2, w // 2
        layer = conv(h, w, cin, c, 3)
        first = layer if first is None else first
        fwd += layer + conv(h, w, c, c, 3)
        cin = c
    for c in reversed(widths[:-1]):
        fwd += conv(h, w, cin, c, 2)  # ConvTranspose 2x2 stride 2, counted on its input grid
        h, w = h * 2, w * 2
        fwd += conv(h, w, 2 * c, c, 3) + conv(h, w, c, c, 3)
        cin = c
    fwd += conv(h, w, cin, classes, 1)
    return 3.0 * fwd - first


# ---------------------------------------------------------------- JAX worker


def shape_of(cfg):
    """(batch, height, width, in_channels, classes, widths) of a worker, batch overridden."""
    batch, height, width, in_ch, classes, widths = SHAPES[cfg["shape"]]
    return (cfg.get("batch") or batch, height, width, in_ch, classes, widths)


def build_jax(cfg):
    """Returns (run_step, block) for the JAX U-Net configuration `cfg`.

    run_step() runs one compiled call (`spc` train steps) and returns (loss, steps).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from puseg_jax.model import conv_ops
    from puseg_jax.model.unet import UNet

    if cfg.get("plan"):
        conv_ops.set_cpu_plan(cfg["plan"])
    if cfg.get("ynn") is not None:
        conv_ops.set_eigen_ynn_fusions(cfg["ynn"])
    if cfg.get("cache"):
        jax.config.update("jax_compilation_cache_dir", cfg["cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    batch, height, width, in_ch, classes, widths = shape_of(cfg)
    devices = jax.devices()[: cfg.get("devices") or 1]
    batch *= len(devices)  # `batch` is per device
    pad_in = max(cfg.get("pad_in") or in_ch, in_ch)
    dtype = jnp.bfloat16 if cfg["dtype"] == "bfloat16" else jnp.float32
    model = UNet(
        num_classes=classes,
        widths=widths,
        conv_impl=cfg["impl"],
        dtype=dtype,
        remat=bool(cfg.get("remat")),
        bn_axis_name="data",
    )
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, height, width, in_ch), np.float32)
    # The input layer at `pad_in` channels: zero channels change no output, only the shapes the
    # convolution libraries see (one input channel is an odd case for them).
    images = np.pad(images, ((0, 0), (0, 0), (0, 0), (0, pad_in - in_ch)))
    labels = rng.integers(0, classes, (batch, height, width)).astype(np.int32)
    spc = cfg.get("spc") or 1
    if spc > 1:  # the same batch for each step of a call: the timing is what matters
        images, labels = np.stack([images] * spc), np.stack([labels] * spc)
    mesh = Mesh(np.asarray(devices), ("data",))
    data_spec = P(None, "data") if spc > 1 else P("data")
    images = jax.device_put(images, NamedSharding(mesh, data_spec))
    labels = jax.device_put(labels, NamedSharding(mesh, data_spec))
    init_model = model.clone(bn_axis_name=None)
    # As steps.create_train_state: XLA:CPU compiles the partitionable threefry of the
    # initialisers several times slower, and one device needs none of it.
    with jax.threefry_partitionable(False):
        variables = jax.jit(lambda x: init_model.init(jax.random.PRNGKey(0), x, train=False))(
            jnp.zeros((1, height, width, pad_in), jnp.float32)
        )
    tx = optax.adam(LR)
    state = {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(variables["params"]),
    }

    def loss_fn(params, batch_stats, x, y):
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean()
        return loss, updates["batch_stats"]

    if cfg.get("remat") == "loss":
        loss_fn = jax.checkpoint(loss_fn, policy=jax.checkpoint_policies.dots_saveable)

    def train_step(state, x, y):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, batch_stats), grads = grad_fn(state["params"], state["batch_stats"], x, y)
        # Data parallel as parallel.strategy='jit' does it: the per-device step inside
        # shard_map, gradients averaged over the devices, BatchNorm over the global batch.
        grads, loss = jax.lax.pmean((grads, loss), "data")
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss

    def train_steps(state, x, y):
        if spc == 1:
            return train_step(state, x, y)
        state, losses = jax.lax.scan(lambda s, xy: train_step(s, *xy), state, (x, y))
        return state, losses[-1]

    mapped = jax.shard_map(
        train_steps,
        mesh=mesh,
        in_specs=(P(), data_spec, data_spec),
        out_specs=(P(), P()),
        check_vma=False,
    )
    step = jax.jit(
        mapped,
        donate_argnums=(0,) if cfg.get("donate", True) else (),
        compiler_options=conv_ops.compiler_options(cfg["impl"]),
    )
    holder = {"state": jax.device_put(state, NamedSharding(mesh, P()))}

    def run_step():
        holder["state"], loss = step(holder["state"], images, labels)
        return loss, spc

    def block(loss):
        return float(jax.block_until_ready(loss))

    return run_step, block


def jax_peak(dtype_name):
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.default_backend() == "cpu" else 8192
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(mm(a))
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / min(times) / 1e9


def jax_memory_bytes():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------- PyTorch worker


def torch_unet(in_ch, classes, widths):
    """The puseg_jax U-Net in PyTorch: same layers, same initial widths, BN momentum 0.1 (=0.9)."""
    import torch
    from torch import nn

    def double_conv(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1),
            nn.ReLU(inplace=True),
        )

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.ModuleList()
            cin = in_ch
            for c in widths[:-1]:
                self.down.append(double_conv(cin, c))
                cin = c
            self.bottom = double_conv(cin, widths[-1])
            cin = widths[-1]
            self.ups, self.up_convs = nn.ModuleList(), nn.ModuleList()
            for c in reversed(widths[:-1]):
                self.ups.append(nn.ConvTranspose2d(cin, c, 2, stride=2))
                self.up_convs.append(double_conv(2 * c, c))
                cin = c
            self.head = nn.Conv2d(cin, classes, 1)

        def forward(self, x):
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = nn.functional.max_pool2d(x, 2)
            x = self.bottom(x)
            for up, block, skip in zip(self.ups, self.up_convs, reversed(skips), strict=True):
                x = block(torch.cat([up(x), skip], 1))
            return self.head(x)

    return UNet()


def build_torch(cfg):
    import torch

    device = torch.device("cuda" if cfg["device"] == "gpu" else "cpu")
    # Let cuDNN pick its algorithms, as XLA autotunes its own on GPU.
    torch.backends.cudnn.benchmark = True
    batch, height, width, in_ch, classes, widths = shape_of(cfg)
    torch.manual_seed(0)
    if cfg["framework"] == "monai":
        from monai.networks.nets import BasicUNet

        model = BasicUNet(
            spatial_dims=2,
            in_channels=in_ch,
            out_channels=classes,
            features=tuple(widths) + (widths[0],),
            act="relu",
            norm="batch",
            bias=False,
        )
    else:
        model = torch_unet(in_ch, classes, widths)
    channels_last = cfg["framework"] != "torch"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    if cfg["framework"].startswith("torch_compile"):
        mode = "max-autotune" if cfg["framework"] == "torch_compile_max" else None
        model = torch.compile(model, mode=mode)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((batch, in_ch, height, width), np.float32))
    images = images.to(device).contiguous(memory_format=memory_format)
    labels = torch.from_numpy(rng.integers(0, classes, (batch, height, width))).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    autocast = cfg["dtype"] == "bfloat16"
    device_type = device.type

    def run_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        return loss, 1

    def block(loss):
        return float(loss.detach())  # synchronises CUDA

    return run_step, block


def torch_peak(dtype_name, device):
    import torch

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    # Without native bf16 units PyTorch's CPU bf16 matmul is ~1000x slower: keep it small.
    n = 8192 if device == "gpu" else (2048 if dtype == torch.float32 else 512)
    # TF32 is off by default: the float32 peak is true float32, as JAX's default precision on GPU
    # is not (it may use TF32); the bf16 peak is the one the bf16 runs compare against.
    a = torch.randn(n, n, device=dev, dtype=dtype)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        float((a @ a)[0, 0])
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / min(times[1:]) / 1e9


# ---------------------------------------------------------------- worker loop


def worker_main(cfg):
    """Serves commands from the parent on stdin: 'peak DTYPE', 'step K', 'mem', 'quit'."""
    if cfg.get("cores"):
        # Before the frameworks start: their thread pools size themselves to the affinity mask.
        os.sched_setaffinity(0, set(range(cfg["cores"])))
    if cfg["framework"] == "jax":
        run_step, block = build_jax(cfg)
        peak = jax_peak
    else:
        import torch

        if cfg["device"] == "cpu":
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        run_step, block = build_torch(cfg)

        def peak(d):
            return torch_peak(d, cfg["device"])

    def reply(obj):
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    t = time.perf_counter()
    loss0 = block(run_step()[0])
    reply({"first_step_s": time.perf_counter() - t, "loss": loss0})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "step":
            # At least K train steps, in whole compiled calls.
            t, steps = time.perf_counter(), 0
            while steps < int(cmd[1]):
                loss, n = run_step()
                steps += n
            loss = block(loss)
            reply({"s": (time.perf_counter() - t) / steps, "loss": loss})
        elif cmd[0] == "peak":
            reply({"gflops": peak(cmd[1])})
        elif cmd[0] == "mem":
            out = {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            if cfg["device"] == "gpu":
                if cfg["framework"] == "jax":
                    out["device_peak_mb"] = (jax_memory_bytes() or 0) / 2**20
                else:
                    import torch

                    out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            reply(out)
        elif cmd[0] == "quit":
            break


class Worker:
    """One configuration in its own process; a reader thread makes every reply wait-able with a
    timeout, so that a worker that hangs or dies costs its row, not the run."""

    def __init__(self, cfg, verbose):
        env = dict(os.environ)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        if cfg["framework"] == "jax":
            if cfg["device"] == "cpu":
                env["JAX_PLATFORMS"] = "cpu"
                if (cfg.get("devices") or 1) > 1:
                    env["XLA_FLAGS"] = (
                        env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={cfg['devices']}"
                    )
            else:
                env.pop("JAX_PLATFORMS", None)
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPU shared by workers
            if cfg.get("xla_flags"):
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + cfg["xla_flags"]).strip()
        self.cfg = cfg
        self.first = None
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if verbose else subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.replies = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK) :]))
        self.replies.put(None)  # end of output: the worker exited

    def read(self, timeout=None):
        try:
            out = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise TimeoutError(f"no answer within {timeout:.0f} s") from None
        if out is None:
            raise RuntimeError(f"died (exit {self.proc.wait()})")
        return out

    def ask(self, command, timeout=None):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
            self.kill()


# ---------------------------------------------------------------- parent


def cpu_model() -> str:
    """The CPU's model name and the flags that matter for these kernels."""
    name, flags = platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    return f"{name} [{' '.join(f for f in wanted if f in flags) or 'no AVX2'}]"


def label(cfg):
    if cfg["framework"] == "jax":
        name = f"JAX impl={cfg['impl']}"
        if cfg.get("dtype_override"):
            name += f" {cfg['dtype']}"
        if not cfg.get("donate", True):
            name += " no-donate"
        if cfg.get("remat"):
            name += " remat" if cfg["remat"] is True else f" remat={cfg['remat']}"
        if (cfg.get("spc") or 1) > 1:
            name += f" {cfg['spc']} steps/call"
        if cfg.get("plan"):
            name += f" plan={cfg['plan']}"
        if cfg.get("ynn") is not None:
            name += f" ynn='{cfg['ynn']}'"
        if cfg.get("pad_in"):
            name += f" input padded to {cfg['pad_in']} ch"
        if cfg.get("xla_flags"):
            name += f" XLA_FLAGS='{cfg['xla_flags']}'"
        if (cfg.get("devices") or 1) > 1:
            name += f" x{cfg['devices']} devices"
    else:
        name = {
            "torch": "PyTorch (NCHW)",
            "torch_cl": "PyTorch channels_last",
            "torch_compile": "PyTorch cl torch.compile",
            "torch_compile_max": "PyTorch cl torch.compile max-autotune",
            "monai": "MONAI BasicUNet (cl)",
        }[cfg["framework"]]
        if cfg.get("dtype_override"):
            name += f" {cfg['dtype']}"
    if cfg.get("batch"):
        name += f" batch {cfg['batch']}"
    return name


def make_cfgs(shape, args):
    """The worker configurations of one shape."""
    common = dict(shape=shape, device=args.device, cores=args.cores)
    cfgs = []
    for fw in args.frameworks:
        if fw == "jax":
            for impl in args.impl:
                for donate in args.donate:
                    cfgs.append(
                        dict(
                            framework="jax",
                            impl=impl,
                            donate=donate,
                            remat=args.remat,
                            spc=args.steps_per_call,
                            dtype=args.dtype,
                            **common,
                        )
                    )
        elif fw == "monai" and importlib.util.find_spec("monai") is None:
            print(f"[{shape}] MONAI not installed: skipped", file=sys.stderr)
        else:
            cfgs.append(dict(framework=fw, dtype=args.dtype, **common))
    for extra in args.jax_config:
        # A JSON object of worker fields (impl, dtype, spc, remat, devices, pad_in, xla_flags,
        # batch, shapes): one more JAX worker per shape it applies to.
        extra = dict(extra)
        shapes = extra.pop("shapes", None)
        if shapes and shape not in shapes:
            continue
        cfg = dict(framework="jax", impl=args.impl[0], dtype=args.dtype, extra=True, **common)
        if "dtype" in extra:
            cfg["dtype_override"] = True
        cfg.update(extra)
        cfgs.append(cfg)
    for extra in args.torch_config:
        extra = dict(extra)
        shapes = extra.pop("shapes", None)
        if shapes and shape not in shapes:
            continue
        cfg = dict(framework="torch_cl", dtype=args.dtype, extra=True, **common)
        if "dtype" in extra:
            cfg["dtype_override"] = True
        cfgs.append(dict(cfg, **extra))
    base = [c for c in cfgs if not c.get("extra") and c["framework"] in args.sweep_frameworks]
    for b in args.batches:
        cfgs += [dict(c, batch=b) for c in base]
    return cfgs


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds if seconds else None

    def left(self):
        return None if self.end is None else self.end - time.monotonic()

    def passed(self):
        return self.end is not None and time.monotonic() > self.end


def start_workers(cfgs, args, deadline, notes):
    """Starts the workers (all at once with --parallel-start) and waits for their first step."""
    workers = []

    def wait_first(w):
        # The start timeout counts from the worker's launch (several may start at once).
        own = args.start_timeout and args.start_timeout - (time.monotonic() - w.started)
        limit = [t for t in (own, deadline.left()) if t]
        try:
            w.first = w.read(max(1.0, min(limit)) if limit else None)
            w.first["startup_s"] = time.monotonic() - w.started
            return True
        except (TimeoutError, RuntimeError) as e:
            notes.append(f"{w.cfg['shape']}: {label(w.cfg)}: first step failed: {e}")
            print(f"[{w.cfg['shape']}] {label(w.cfg)}: {e}", file=sys.stderr, flush=True)
            w.kill()
            return False

    for cfg in cfgs:
        if deadline.passed():
            notes.append(f"{cfg['shape']}: {label(cfg)}: not started (deadline)")
            continue
        print(f"[{cfg['shape']}] starting {label(cfg)}", file=sys.stderr, flush=True)
        w = Worker(cfg, args.verbose)
        if args.parallel_start:
            workers.append(w)
        elif wait_first(w):
            workers.append(w)
    if args.parallel_start:
        workers = [w for w in workers if wait_first(w)]
    return workers


def time_workers(shape, workers, args, deadline, notes, peaks):
    """Warm-up and timed rounds, alternating the workers; returns the rows of `shape`."""
    times = {id(w): [] for w in workers}
    losses = {}
    alive = list(workers)

    def ask(w, command):
        try:
            return w.ask(command, args.round_timeout)
        except (TimeoutError, RuntimeError, BrokenPipeError, OSError) as e:
            notes.append(f"{shape}: {label(w.cfg)}: '{command}' failed: {e}")
            w.kill()
            alive.remove(w)
            return None

    for _ in range(args.warmup):
        for w in list(alive):
            ask(w, f"step {args.steps_per_round}")
    for r in range(args.steps):
        if deadline.passed():
            notes.append(f"{shape}: stopped after {r} timed rounds (deadline)")
            break
        for w in list(alive) if r % 2 == 0 else list(alive)[::-1]:
            out = ask(w, f"step {args.steps_per_round}")
            if out:
                times[id(w)].append(out["s"])
                losses[id(w)] = out["loss"]
        print(
            f"[{shape}] round {r + 1}/{args.steps}: "
            + ", ".join(f"{label(w.cfg)} {times[id(w)][-1]:.3f}s" for w in alive),
            file=sys.stderr,
            flush=True,
        )
    if args.peak:
        for w in list(alive):
            key = "jax" if w.cfg["framework"] == "jax" else "torch"
            if key not in peaks:
                out = {d: ask(w, f"peak {d}") for d in ("float32", "bfloat16")}
                if all(out.values()):
                    peaks[key] = {d: v["gflops"] for d, v in out.items()}
    mems = {id(w): ask(w, "mem") or {} for w in list(alive)}
    for w in alive:
        w.close()
    rows = []
    for w in workers:
        ts = np.asarray(times[id(w)])
        if not len(ts):
            continue
        batch, height, width, in_ch, classes, widths = shape_of(w.cfg)
        devices = w.cfg.get("devices") or 1
        flops = devices * unet_train_flops(batch, height, width, in_ch, classes, widths)
        med = float(np.median(ts))
        rows.append(
            dict(
                shape=shape,
                name=label(w.cfg),
                framework=w.cfg["framework"],
                cfg=w.cfg,
                batch=batch * devices,
                devices=devices,
                rounds=len(ts),
                step_s=med,
                spread=(float(ts.min()), float(ts.max())),
                images_per_s=batch * devices / med,
                gflops=flops / med / 1e9 if w.cfg["framework"] != "monai" else None,
                first_step_s=w.first["first_step_s"],
                loss=losses.get(id(w)),
                **mems.get(id(w), {}),
            )
        )
    return rows


def run_cache_test(shapes, args, deadline, notes):
    """First-step time of the JAX train step with an empty persistent compilation cache, then
    again in a new process with the cache it wrote (a second run of the same job)."""
    import shutil

    rows = []
    for shape in shapes:
        for cfg in make_cfgs(shape, args):
            if cfg["framework"] != "jax" or cfg.get("batch"):
                continue
            cache = os.path.join(args.cache_test, shape)
            shutil.rmtree(cache, ignore_errors=True)
            cfg = dict(cfg, cache=cache)
            firsts = []
            for _ in ("cold", "warm"):
                ws = start_workers([cfg], args, deadline, notes)
                if not ws:
                    break
                firsts.append(ws[0].first)
                ws[0].close()
            if len(firsts) == 2:
                rows.append(dict(shape=shape, name=label(cfg), cold=firsts[0], warm=firsts[1]))
    return rows


def print_table(rows, peaks, args, notes=(), cache_rows=()):
    peak = max((p[args.dtype] for p in peaks.values()), default=None)
    print()
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores; device={args.device}"
        + (f" (workers pinned to {args.cores} core(s))" if args.cores else "")
        + f"; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        f"dtype={args.dtype}; median of up to {args.steps} rounds of {args.steps_per_round} steps "
        f"after {args.warmup} warm-up rounds; "
        + ", ".join(
            f"{k} matmul peak fp32 {v['float32']:.0f} / bf16 {v['bfloat16']:.0f} GFLOP/s"
            for k, v in peaks.items()
        )
    )
    mem_col = "device peak MB" if args.device == "gpu" else "peak RSS MB"
    if rows:
        print()
        print(
            "| shape | implementation | s/step (min-max) | images/s | images/s/device |"
            f" vs PyTorch cl | GFLOP/s | % peak | {mem_col} | first step s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sub = [r for r in rows if r["shape"] == shape]
        for r in sub:
            ref = next(
                (
                    q
                    for q in sub
                    if q["framework"] == "torch_cl"
                    and q["batch"] == r["batch"]
                    and q["cfg"].get("dtype") == r["cfg"].get("dtype")
                ),
                None,
            )
            ratio = f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"
            gf = f"{r['gflops']:.0f}" if r["gflops"] else "-"
            pct = f"{100 * r['gflops'] / peak:.0f}%" if (r["gflops"] and peak) else "-"
            mem = r.get("device_peak_mb") if args.device == "gpu" else r.get("maxrss_mb")
            mem = f"{mem:.0f}" if mem is not None else "-"
            print(
                f"| {shape} | {r['name']} | {r['step_s']:.4f} ({r['spread'][0]:.4f}-"
                f"{r['spread'][1]:.4f}) | {r['images_per_s']:.1f} |"
                f" {r['images_per_s'] / r['devices']:.1f} | {ratio} | {gf} | {pct} | {mem} |"
                f" {r['first_step_s']:.1f} |"
            )
    if rows:
        print("\n'vs PyTorch cl': PyTorch channels_last eager at the same batch and dtype.")
    if cache_rows:
        print(
            "\nFirst train step (its compilation and one run) and the whole start (process,"
            " imports, init, first step) with the persistent compilation cache, empty and then"
            " warm (a new process each time):\n"
        )
        print(
            "| shape | implementation | first step s: cold | warm |"
            " start to first step s: cold | warm |"
        )
        print("|---|---|---|---|---|---|")
        for r in cache_rows:
            c, w = r["cold"], r["warm"]
            print(
                f"| {r['shape']} | {r['name']} | {c['first_step_s']:.1f} |"
                f" {w['first_step_s']:.1f} | {c['startup_s']:.1f} | {w['startup_s']:.1f} |"
            )
    for shape in dict.fromkeys(r["shape"] for r in rows):
        b, h, w, c, k, widths = SHAPES[shape]
        print(
            f"{shape}: {unet_train_flops(b, h, w, c, k, widths) / 1e9:.1f} GFLOP per train step "
            f"at batch {b} (convolutions, analytic)"
        )
    for note in notes:
        print(f"note: {note}")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", default=["demo", "fundus", "prostate"], choices=sorted(SHAPES)
    )
    parser.add_argument("--impl", nargs="+", default=["fast"], choices=["xla", "fast", "auto"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--frameworks",
        nargs="+",
        default=["jax", "torch", "torch_cl", "monai"],
        choices=["jax", "torch", "torch_cl", "torch_compile", "torch_compile_max", "monai"],
    )
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds after the first")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument(
        "--donate", nargs="+", type=int, default=[1], help="JAX state donation: 1, 0 or both"
    )
    parser.add_argument("--remat", action="store_true", help="JAX: UNet(remat=True)")
    parser.add_argument("--steps-per-call", type=int, default=1, help="JAX: steps per jit call")
    parser.add_argument(
        "--jax-config",
        type=json.loads,
        action="append",
        default=[],
        help="one more JAX worker per shape, a JSON object: impl, dtype, spc (steps per call),"
        " remat, devices, pad_in, xla_flags, plan (conv_ops CPU plan), ynn (the fusion types"
        " the 'eigen' plan hands to YNNPACK, conv_ops.set_eigen_ynn_fusions), batch, shapes"
        " (the shapes it runs at)",
    )
    parser.add_argument(
        "--torch-config",
        type=json.loads,
        action="append",
        default=[],
        help="one more PyTorch worker per shape, a JSON object: framework, dtype, batch, shapes",
    )
    parser.add_argument(
        "--batches",
        nargs="*",
        type=int,
        default=[],
        help="batch sweep: each worker of --sweep-frameworks again at these",
    )
    parser.add_argument("--sweep-frameworks", nargs="+", default=["jax", "torch_cl"])
    parser.add_argument(
        "--cores", type=int, default=0, help="pin the workers to the first N cores (0: all)"
    )
    parser.add_argument(
        "--parallel-start",
        action="store_true",
        help="start (compile) all workers at once (GPU: saves minutes; the"
        " first-step times then overlap)",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=0,
        help="seconds a worker may take to its first step (0: no limit)",
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=None,
        help="seconds a worker may take to answer a round",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=0,
        help="stop starting workers and rounds after this many seconds and"
        " report what was measured (0: none)",
    )
    parser.add_argument(
        "--cache-test",
        metavar="DIR",
        help="instead of timing steps: first-step time of each JAX worker with"
        " an empty persistent compilation cache in DIR, then warm",
    )
    parser.add_argument("--no-peak", dest="peak", action="store_false")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--markdown", help="also write the printed tables to this file")
    parser.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    args.donate = [bool(d) for d in args.donate]
    deadline = Deadline(args.deadline)
    notes, all_rows, all_peaks, cache_rows = [], [], {}, []
    out = io.StringIO()

    def report():
        with contextlib.redirect_stdout(out):
            print_table(all_rows, all_peaks, args, notes, cache_rows)
        sys.stdout.write(out.getvalue())
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(out.getvalue())
        if args.json:
            with open(args.json, "w") as f:
                rows = [{k: v for k, v in r.items()} for r in all_rows]
                json.dump(
                    dict(
                        rows=rows,
                        cache=cache_rows,
                        peaks=all_peaks,
                        notes=notes,
                        args=vars(args),
                        machine=cpu_model(),
                    ),
                    f,
                    indent=1,
                    default=str,
                )

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {args.device}", flush=True)
    if args.cache_test:
        cache_rows = run_cache_test(args.shapes, args, deadline, notes)
        report()
        return
    if args.parallel_start:
        started = start_workers(
            [c for shape in args.shapes for c in make_cfgs(shape, args)], args, deadline, notes
        )
    for shape in args.shapes:
        if args.parallel_start:
            workers = [w for w in started if w.cfg["shape"] == shape]
        else:
            workers = start_workers(make_cfgs(shape, args), args, deadline, notes)
        peaks = {}
        all_rows += time_workers(shape, workers, args, deadline, notes, peaks)
        for k, v in peaks.items():
            old = all_peaks.get(k)
            all_peaks[k] = v if old is None else {d: max(v[d], old[d]) for d in v}
        with contextlib.redirect_stdout(sys.stderr):  # progress: this shape's table so far
            print_table([r for r in all_rows if r["shape"] == shape], peaks, args)
    report()


if __name__ == "__main__":
    main()
