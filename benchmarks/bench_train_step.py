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
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

SHAPES = {
    # name: (batch, height, width, in_channels, classes, widths)
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


def build_jax(cfg):
    """Returns (step, state, batch, block) for the JAX U-Net configuration `cfg`."""
    import jax
    import jax.numpy as jnp
    import optax

    from puseg_jax.models import UNet

    batch, height, width, in_ch, classes, widths = SHAPES[cfg["shape"]]
    dtype = jnp.bfloat16 if cfg["dtype"] == "bfloat16" else jnp.float32
    model = UNet(num_classes=classes, widths=widths, conv_impl=cfg["impl"], dtype=dtype)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, height, width, in_ch), np.float32))
    labels = jnp.asarray(rng.integers(0, classes, (batch, height, width)), jnp.int32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
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

    if cfg.get("remat"):
        loss_fn = jax.checkpoint(loss_fn, policy=jax.checkpoint_policies.dots_saveable)

    def train_step(state, x, y):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, batch_stats), grads = grad_fn(state["params"], state["batch_stats"], x, y)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss

    step = jax.jit(train_step, donate_argnums=(0,) if cfg.get("donate", True) else ())
    holder = {"state": state}

    def run_step():
        holder["state"], loss = step(holder["state"], images, labels)
        return loss

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
    batch, height, width, in_ch, classes, widths = SHAPES[cfg["shape"]]
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
    channels_last = cfg["framework"] in ("torch_cl", "monai")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
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
        return loss

    def block(loss):
        return float(loss.detach())  # synchronises CUDA

    return run_step, block


def torch_peak(dtype_name, device):
    import torch

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    # Without native bf16 units PyTorch's CPU bf16 matmul is ~1000x slower: keep it small.
    n = 8192 if device == "gpu" else (2048 if dtype == torch.float32 else 512)
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
    if cfg["framework"] == "jax":
        run_step, block = build_jax(cfg)
        peak = jax_peak
    else:
        import torch

        if cfg["device"] == "cpu":
            torch.set_num_threads(os.cpu_count())
        run_step, block = build_torch(cfg)

        def peak(d):
            return torch_peak(d, cfg["device"])

    def reply(obj):
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    t = time.perf_counter()
    loss0 = block(run_step())
    reply({"first_step_s": time.perf_counter() - t, "loss": loss0})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "step":
            t = time.perf_counter()
            for _ in range(int(cmd[1])):
                loss = run_step()
            loss = block(loss)
            reply({"s": (time.perf_counter() - t) / int(cmd[1]), "loss": loss})
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
    def __init__(self, cfg, verbose):
        env = dict(os.environ)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        if cfg["framework"] == "jax":
            if cfg["device"] == "cpu":
                env["JAX_PLATFORMS"] = "cpu"
            else:
                env.pop("JAX_PLATFORMS", None)
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPU shared by workers
        self.cfg = cfg
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if verbose else subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.first = self.read()

    def read(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        raise RuntimeError(f"worker {self.cfg} died (exit {self.proc.wait()})")

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


# ---------------------------------------------------------------- parent


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def label(cfg):
    if cfg["framework"] == "jax":
        name = f"JAX impl={cfg['impl']}"
        if not cfg.get("donate", True):
            name += " no-donate"
        if cfg.get("remat"):
            name += " remat"
        return name
    return {
        "torch": "PyTorch (NCHW)",
        "torch_cl": "PyTorch channels_last",
        "monai": "MONAI BasicUNet (cl)",
    }[cfg["framework"]]


def run_shape(shape, args):
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
                            shape=shape,
                            dtype=args.dtype,
                            device=args.device,
                        )
                    )
        else:
            cfgs.append(dict(framework=fw, shape=shape, dtype=args.dtype, device=args.device))
    workers = []
    for cfg in cfgs:
        if cfg["framework"] == "monai":
            try:
                import monai  # noqa: F401
            except ImportError:
                print(f"[{shape}] MONAI not installed: skipped", file=sys.stderr)
                continue
        print(f"[{shape}] starting {label(cfg)}", file=sys.stderr, flush=True)
        workers.append(Worker(cfg, args.verbose))
    for _ in range(args.warmup):
        for w in workers:
            w.ask(f"step {args.steps_per_round}")
    times = {id(w): [] for w in workers}
    losses = {}
    for r in range(args.steps):
        for w in workers if r % 2 == 0 else workers[::-1]:
            out = w.ask(f"step {args.steps_per_round}")
            times[id(w)].append(out["s"])
            losses[id(w)] = out["loss"]
        print(
            f"[{shape}] round {r + 1}/{args.steps}: "
            + ", ".join(f"{label(w.cfg)} {times[id(w)][-1]:.2f}s" for w in workers),
            file=sys.stderr,
            flush=True,
        )
    peaks = {}
    if args.peak:
        for w in workers:
            key = "jax" if w.cfg["framework"] == "jax" else "torch"
            if key not in peaks:
                peaks[key] = {d: w.ask(f"peak {d}")["gflops"] for d in ("float32", "bfloat16")}
    mems = {id(w): w.ask("mem") for w in workers}
    for w in workers:
        w.close()
    batch, height, width, in_ch, classes, widths = SHAPES[shape]
    flops = unet_train_flops(batch, height, width, in_ch, classes, widths)
    rows = []
    for w in workers:
        ts = np.asarray(times[id(w)])
        med = float(np.median(ts))
        rows.append(
            dict(
                shape=shape,
                name=label(w.cfg),
                framework=w.cfg["framework"],
                step_s=med,
                spread=(float(ts.min()), float(ts.max())),
                images_per_s=batch / med,
                gflops=flops / med / 1e9 if w.cfg["framework"] != "monai" else None,
                first_step_s=w.first["first_step_s"],
                loss=losses[id(w)],
                **mems[id(w)],
            )
        )
    return rows, peaks, flops


def print_table(rows, peaks, flops_by_shape, args):
    peak = max((p[args.dtype] for p in peaks.values()), default=None)
    print()
    print(
        f"device={args.device} dtype={args.dtype} steps={args.steps} (median; after "
        f"{args.warmup} warm-up) x{args.steps_per_round} per round; "
        + ", ".join(
            f"{k} matmul peak fp32 {v['float32']:.0f} / bf16 {v['bfloat16']:.1f} GFLOP/s"
            for k, v in peaks.items()
        )
    )
    mem_col = "device peak MB" if args.device == "gpu" else "peak RSS MB"
    print()
    print(
        "| shape | implementation | s/step (min-max) | images/s | vs PyTorch cl | GFLOP/s |"
        f" % peak | {mem_col} | first step s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sub = [r for r in rows if r["shape"] == shape]
        ref = next((r for r in sub if r["framework"] == "torch_cl"), None)
        for r in sub:
            ratio = f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"
            gf = f"{r['gflops']:.0f}" if r["gflops"] else "-"
            pct = f"{100 * r['gflops'] / peak:.0f}%" if (r["gflops"] and peak) else "-"
            mem = r.get("device_peak_mb") if args.device == "gpu" else r["maxrss_mb"]
            print(
                f"| {shape} | {r['name']} | {r['step_s']:.3f} ({r['spread'][0]:.3f}-"
                f"{r['spread'][1]:.3f}) | {r['images_per_s']:.1f} | {ratio} | {gf} | {pct} |"
                f" {mem:.0f} | {r['first_step_s']:.1f} |"
            )
    print()
    for shape, fl in flops_by_shape.items():
        print(f"{shape}: {fl / 1e9:.1f} GFLOP per train step (convolutions, analytic)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["demo", "fundus", "prostate"])
    parser.add_argument("--impl", nargs="+", default=["fast"], choices=["xla", "fast", "auto"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--frameworks",
        nargs="+",
        default=["jax", "torch", "torch_cl", "monai"],
        choices=["jax", "torch", "torch_cl", "monai"],
    )
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds after the first")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument(
        "--donate", nargs="+", type=int, default=[1], help="JAX state donation: 1, 0 or both"
    )
    parser.add_argument("--remat", action="store_true", help="JAX: jax.checkpoint the loss")
    parser.add_argument("--no-peak", dest="peak", action="store_false")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    args.donate = [bool(d) for d in args.donate]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {args.device}")
    all_rows, all_peaks, flops_by_shape = [], {}, {}
    for shape in args.shapes:
        rows, peaks, flops = run_shape(shape, args)
        all_rows += rows
        flops_by_shape[shape] = flops
        for k, v in peaks.items():
            old = all_peaks.get(k)
            all_peaks[k] = v if old is None else {d: max(v[d], old[d]) for d in v}
        print_table(rows, peaks, {shape: flops}, args)
        sys.stdout.flush()
    if len(args.shapes) > 1:
        print("\nAll shapes:")
        print_table(all_rows, all_peaks, flops_by_shape, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=all_rows, peaks=all_peaks, args=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()
