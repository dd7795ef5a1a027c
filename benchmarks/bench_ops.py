"""Per-op profile of the U-Net train step: JAX against PyTorch (oneDNN), op by op, on the CPU.

Every op of one train step of the U-Net at a paper shape is timed on its own, in each
framework: the 3x3 convolutions' forward, input gradient and weight gradient, BatchNorm + ReLU
(forward and backward), the 2x2 max-pool and the 2x2 up-convolution (forward and backward).
The totals per kind (each op weighted by how often the U-Net runs it) say where a step's time
goes and which kind of op loses against oneDNN.

As in bench_train_step.py, each framework runs in its own worker process and the parent asks
them in turn, round after round (order reversed every other round), for one timing of every op
(the minimum of `--reps` calls); the table reports the median over rounds.

JAX variants (`--variants`, several allowed, each its own worker):
  xla        XLA's convolution, its own autodiff gradients (plain Flax)
  fast       conv_ops 'fast' with this CPU's plan (`conv_ops.cpu_plan()`) and its compiler options
  fast@PLAN  'fast' with the plan forced: im2col | eigen (conv_ops.CPU_PLANS)
  NAME+OPT   any variant plus XLA compiler options, e.g. `fast+xla_cpu_use_onednn=true`

  python benchmarks/bench_ops.py --shape fundus --variants fast --rounds 3
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import SHAPES, cpu_model  # noqa: E402

MARK = "@@ops "


def unet_ops(shape: str) -> list[dict]:
    """The ops of one train step of the U-Net at `shape`, with how often each runs."""
    batch, height, width, in_ch, _, widths = SHAPES[shape]
    ops: dict[tuple, dict] = {}

    def add(kind, **dims):
        key = (kind,) + tuple(sorted(dims.items()))
        if key in ops:
            ops[key]["count"] += 1
        else:
            ops[key] = dict(kind=kind, count=1, **dims)

    h, cin = height, in_ch
    for i, c in enumerate(widths):
        if i > 0:
            add("pool", n=batch, h=h, c=cin)  # the pool's input
            h //= 2
        add("conv", n=batch, h=h, cin=cin, cout=c, first=i == 0)
        add("conv", n=batch, h=h, cin=c, cout=c, first=False)
        add("bn_relu", n=batch, h=h, c=c)
        add("bn_relu", n=batch, h=h, c=c)
        cin = c
    for c in reversed(widths[:-1]):
        add("upconv", n=batch, h=h, cin=cin, cout=c)
        h *= 2
        add("conv", n=batch, h=h, cin=2 * c, cout=c, first=False)
        add("conv", n=batch, h=h, cin=c, cout=c, first=False)
        add("bn_relu", n=batch, h=h, c=c)
        add("bn_relu", n=batch, h=h, c=c)
        cin = c
    return list(ops.values())


def op_name(op: dict) -> str:
    if op["kind"] in ("conv", "upconv"):
        return f"{op['kind']} {op['h']}x{op['h']} {op['cin']}->{op['cout']}"
    return f"{op['kind']} {op['h']}x{op['h']}x{op['c']}"


def phases(op: dict) -> list[str]:
    if op["kind"] == "conv":
        return ["fwd", "dw"] if op["first"] else ["fwd", "dx", "dw"]
    return ["fwd+bwd"]


# ---------------------------------------------------------------- JAX


def jax_ops(variant: str):
    """{(op name, phase): callable that runs it once and blocks} for a JAX variant."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from puseg_jax.model import conv_ops

    name, *opts = variant.split("+")
    base, _, plan = name.partition("@")
    if plan:
        conv_ops.set_cpu_plan(plan)
    options = dict(conv_ops.compiler_options(base) or {})
    for o in opts:
        k, v = o.split("=", 1)
        options[k] = {"true": True, "false": False}.get(v, v)

    def jit(f):
        return jax.jit(f, compiler_options=options or None)

    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    def conv_fns(op):
        n, h, cin, cout = op["n"], op["h"], op["cin"], op["cout"]
        x, k, g = arr(n, h, h, cin), arr(3, 3, cin, cout) * 0.05, arr(n, h, h, cout)
        conv = conv_ops._conv_same if base == "xla" else conv_ops.conv3x3_fast
        fwd = jit(conv)
        dx = jit(lambda x, k, g: jax.vjp(lambda x_: conv(x_, k), x)[1](g)[0])
        dw = jit(lambda x, k, g: jax.vjp(lambda k_: conv(x, k_), k)[1](g)[0])
        return {
            "fwd": lambda: fwd(x, k),
            "dx": lambda: dx(x, k, g),
            "dw": lambda: dw(x, k, g),
        }

    def bn_relu_fn(op):
        n, h, c = op["n"], op["h"], op["c"]
        x, g = arr(n, h, h, c), arr(n, h, h, c)
        bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
        variables = bn.init(jax.random.key(0), x)

        def f(x, params):
            y, _ = bn.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                mutable=["batch_stats"],
            )
            return nn.relu(y)

        run = jit(lambda x, p, g: jax.vjp(f, x, p)[1](g))
        return {"fwd+bwd": lambda: run(x, variables["params"], g)}

    def pool_fn(op):
        n, h, c = op["n"], op["h"], op["c"]
        x, g = arr(n, h, h, c), arr(n, h // 2, h // 2, c)
        impl = "xla" if base == "xla" else "fast"
        run = jit(lambda x, g: jax.vjp(lambda x_: conv_ops.max_pool2x2(x_, impl), x)[1](g))
        return {"fwd+bwd": lambda: run(x, g)}

    def upconv_fn(op):
        n, h, cin, cout = op["n"], op["h"], op["cin"], op["cout"]
        x, k, g = arr(n, h, h, cin), arr(2, 2, cin, cout) * 0.05, arr(n, 2 * h, 2 * h, cout)
        if base == "xla":

            def up(x, k):
                return jax.lax.conv_transpose(x, k, (2, 2), "SAME")
        else:
            up = conv_ops.upconv2x2_fast
        run = jit(lambda x, k, g: jax.vjp(up, x, k)[1](g))
        return {"fwd+bwd": lambda: run(x, k, g)}

    makers = {"conv": conv_fns, "bn_relu": bn_relu_fn, "pool": pool_fn, "upconv": upconv_fn}

    def block(out):
        jax.block_until_ready(out)

    return makers, block


# ---------------------------------------------------------------- PyTorch


def torch_ops(variant: str):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cl = torch.channels_last
    gen = torch.Generator().manual_seed(0)

    def arr(*shape):
        return torch.randn(*shape, generator=gen).contiguous(memory_format=cl)

    def conv_fns(op):
        n, h, cin, cout = op["n"], op["h"], op["cin"], op["cout"]
        x, g = arr(n, cin, h, h), arr(n, cout, h, h)
        k = (arr(cout, cin, 3, 3) * 0.05).contiguous(memory_format=cl)

        def backward(mask):
            return torch.ops.aten.convolution_backward(
                g, x, k, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
            )

        return {
            "fwd": lambda: F.conv2d(x, k, padding=1),
            "dx": lambda: backward([True, False, False]),
            "dw": lambda: backward([False, True, False]),
        }

    def bn_relu_fn(op):
        n, h, c = op["n"], op["h"], op["c"]
        x, g = arr(n, c, h, h).requires_grad_(), arr(n, c, h, h)
        weight = torch.ones(c, requires_grad=True)
        bias = torch.zeros(c, requires_grad=True)
        mean, var = torch.zeros(c), torch.ones(c)

        def run():
            y = F.relu(F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5))
            return torch.autograd.grad(y, (x, weight, bias), g)

        return {"fwd+bwd": run}

    def pool_fn(op):
        n, h, c = op["n"], op["h"], op["c"]
        x, g = arr(n, c, h, h).requires_grad_(), arr(n, c, h // 2, h // 2)

        def run():
            return torch.autograd.grad(F.max_pool2d(x, 2), x, g)

        return {"fwd+bwd": run}

    def upconv_fn(op):
        n, h, cin, cout = op["n"], op["h"], op["cin"], op["cout"]
        x, g = arr(n, cin, h, h).requires_grad_(), arr(n, cout, 2 * h, 2 * h)
        k = (torch.randn(cin, cout, 2, 2, generator=gen) * 0.05).requires_grad_()
        b = torch.zeros(cout, requires_grad=True)

        def run():
            return torch.autograd.grad(F.conv_transpose2d(x, k, b, stride=2), (x, k, b), g)

        return {"fwd+bwd": run}

    makers = {"conv": conv_fns, "bn_relu": bn_relu_fn, "pool": pool_fn, "upconv": upconv_fn}
    return makers, lambda out: None


# ---------------------------------------------------------------- worker and parent


def worker_main(cfg):
    if cfg.get("cores"):
        # Before the frameworks start: their thread pools size themselves to the affinity mask.
        os.sched_setaffinity(0, set(range(cfg["cores"])))
    makers, block = (jax_ops if cfg["framework"] == "jax" else torch_ops)(cfg["variant"])
    runs = {}
    for op in unet_ops(cfg["shape"]):
        fns = makers[op["kind"]](op)
        for phase in phases(op):
            runs[(op_name(op), phase)] = fns[phase]
    t = time.perf_counter()
    for fn in runs.values():
        block(fn())  # compile / allocate
    sys.stdout.write(MARK + json.dumps({"setup_s": time.perf_counter() - t}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip() != "round":
            break
        out = {}
        for (name, phase), fn in runs.items():
            best, cpu = float("inf"), float("inf")
            for _ in range(cfg["reps"]):
                t, c = time.perf_counter(), time.process_time()
                block(fn())
                best = min(best, time.perf_counter() - t)
                cpu = min(cpu, time.process_time() - c)
            out[f"{name}|{phase}"] = best
            out[f"{name}|{phase}|cpu"] = cpu
        sys.stdout.write(MARK + json.dumps(out) + "\n")
        sys.stdout.flush()


def start_worker(cfg, verbose):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None if verbose else subprocess.DEVNULL,
        text=True,
        env=env,
    )
    return proc


def read(proc):
    for line in proc.stdout:
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"worker died (exit {proc.wait()})")


def print_totals(op_keys, med, counts, names, per_op):
    """Markdown table of the per-kind totals (ms per train step) and, if asked, every op."""

    def category(key):
        name, phase = key.split("|")[:2]
        kind = name.split()[0]
        return f"conv {phase}" if kind == "conv" else kind

    def count(key):
        return counts[key.split("|")[0]]

    print("| op kind | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    totals = [0.0] * len(names)
    for cat in dict.fromkeys(category(k) for k in op_keys):
        cells = []
        for j, m in enumerate(med):
            s = sum(m[k] * count(k) for k in op_keys if category(k) == cat)
            totals[j] += s
            cells.append(f"{1000 * s:.0f}")
        print(f"| {cat} | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(f"**{1000 * t:.0f}**" for t in totals) + " |")
    if per_op:
        print("\n| op (count) | phase | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for k in op_keys:
            name, phase = k.split("|")[:2]
            cells = " | ".join(f"{1000 * m[k]:.1f}" for m in med)
            print(f"| {name} (x{count(k)}) | {phase} | {cells} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="fundus", choices=sorted(SHAPES))
    parser.add_argument("--variants", nargs="+", default=["fast"], help="JAX variants")
    parser.add_argument("--no-torch", dest="torch", action="store_false")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2, help="calls per op per round (min)")
    parser.add_argument(
        "--cores",
        type=int,
        default=0,
        help="pin every worker to the first N cores (1: single-thread comparison, robust on a"
        " shared machine: compare the cpu table); 0 = all",
    )
    parser.add_argument("--per-op", action="store_true", help="print every op, not just totals")
    parser.add_argument("--json", help="also write the medians to this file")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    cfgs = [dict(framework="jax", variant=v) for v in args.variants]
    if args.torch:
        cfgs.append(dict(framework="torch", variant="channels_last"))
    names = [f"JAX {c['variant']}" if c["framework"] == "jax" else "PyTorch cl" for c in cfgs]
    procs = []
    for cfg, name in zip(cfgs, names, strict=True):
        cfg.update(shape=args.shape, reps=args.reps, cores=args.cores)
        print(f"starting {name}", file=sys.stderr, flush=True)
        proc = start_worker(cfg, args.verbose)
        read(proc)
        procs.append(proc)
    results = [[] for _ in procs]
    for r in range(args.rounds):
        order = range(len(procs)) if r % 2 == 0 else reversed(range(len(procs)))
        for i in order:
            procs[i].stdin.write("round\n")
            procs[i].stdin.flush()
            results[i].append(read(procs[i]))
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    for p in procs:
        p.stdin.write("quit\n")
        p.stdin.close()
        p.wait()
    keys = list(results[0][0])
    med = [{k: float(np.median([rd[k] for rd in res])) for k in keys} for res in results]
    counts = {op_name(op): op["count"] for op in unet_ops(args.shape)}
    load = os.getloadavg()
    print(
        f"\nmachine: {cpu_model()}, {os.cpu_count()} cores; shape {args.shape}; median of "
        f"{args.rounds} rounds (min of {args.reps} calls); cores {args.cores or 'all'}; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    for clock in ("wall", "cpu"):
        op_keys = [k for k in keys if k.endswith("|cpu") == (clock == "cpu")]
        print(
            f"\n{clock} ms"
            + (" (process CPU time: all threads' core-seconds)" if clock == "cpu" else "")
        )
        print_totals(op_keys, med, counts, names, args.per_op)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(names=names, medians=med, counts=counts, args=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()
