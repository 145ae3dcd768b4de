"""ddpm_jax against diffusers' UNet2DModel + DDPMScheduler: training and sampling images/s of the
same network on the same device, in one run.

    python benchmarks/diffusers_side_by_side.py                      # CIFAR-10 model, batch 128
    python benchmarks/diffusers_side_by_side.py --batch=16 --config.optim.clip_groups=1
    python benchmarks/diffusers_side_by_side.py --tiny --skip_compile   # seconds: CI's smoke test

The diffusers model is the UNet2DModel of the config's architecture (the inverse of
``ddpm_jax.convert``'s mapping, checked by converting it back), with a DDPMScheduler of the config's
schedule and sampler variance; the two must have the same parameter count.

Training, per image: t ~ U{0..T-1}, ε ~ N(0, I), x_t, the ε-prediction MSE (L_simple), its
gradient, global-norm clipping at config.optim.grad_clip, one Adam step with linear warm-up, and
the EMA of the parameters. ddpm_jax runs exactly the trainer's jitted, sharded dispatch
(``training.make_jitted_training``, K = config.train.steps_per_dispatch steps, its own
config.optim.clip_groups clipping; diffusers' clips the whole batch's gradient, as diffusers'
training examples do) on random batches already on the device, as train_throughput.py does.
Sampling: ancestral DDPM steps, each one network call and one sampler step per image: ddpm_jax's
``generation.make_generate_fn`` (the jitted scan that ``python -m ddpm_jax.sample`` runs) over
--sample_steps respaced steps, against diffusers' DDPMPipeline loop (``unet(x, t)``, then
``scheduler.step``) over as many. Sampling figures are images × steps / s.

Variants: ddpm_jax jitted in float32 and bfloat16 (config.model.dtype); diffusers in PyTorch
eager and ``torch.compile``, float32 and bfloat16 autocast (bfloat16 only where it runs: a CUDA
device that supports it, or a CPU where it does not fail). PyTorch runs on the device JAX runs on
(CUDA for JAX's GPU backend). On the CPU, JAX splits the cores into per-core devices as the
trainer does and PyTorch gets as many threads as there are cores. Each variant's first call
(compilation included) is timed alone; after --warmup more calls, the variants take turns for
--repeats rounds of --calls calls each, and the table gives each one's median rate over the rounds
(and their range): on a shared host, turns spread any disturbance over all variants alike.

Needs torch and diffusers (the [parity] extra) unless --frameworks=ddpm_jax.
"""

from __future__ import annotations

import os

# Before JAX starts: JAX takes 75% of a GPU's memory up front by default; leave PyTorch its share.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpm_jax import config_checks, configs, generation, parallel, sampler_spec, training  # noqa: E402
from ddpm_jax.models import unet_from_config  # noqa: E402

import diffusers_equivalent  # noqa: E402  (beside this script)
import synthetic  # noqa: E402  (beside this script)

FRAMEWORKS = ("ddpm_jax", "diffusers")
DTYPES = ("float32", "bfloat16")
TINY = {"config": "tiny", "batch": 8, "sample_steps": 2, "calls": 1, "repeats": 2, "warmup": 0}

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(configs.DIRECTORY / "cifar10.py"),
    "A shipped config's name (cifar10) or a config file's path; --config.field=value overrides.")
_BATCH = flags.DEFINE_integer("batch", 128, "Training batch (sets config.data.batch_size).")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", None, "Sampling batch (default: --batch).")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 4, "Denoising steps per sampling call.")
_CALLS = flags.DEFINE_integer("calls", 2, "Calls per timing (a training call is one dispatch).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timings per variant; the table gives the median.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after each variant's first one.")
_FRAMEWORKS = flags.DEFINE_list("frameworks", list(FRAMEWORKS), f"Subset of {FRAMEWORKS}.")
_DTYPES = flags.DEFINE_list("dtypes", list(DTYPES), f"Subset of {DTYPES}.")
_SKIP_COMPILE = flags.DEFINE_bool(
    "skip_compile", False, "Leave out the torch.compile variants (slow to compile on a CPU).")
_EXCLUDE = flags.DEFINE_list(
    "exclude", [], "Variants to leave out, each named by some of framework:mode:dtype, e.g. "
    "ddpm_jax:bfloat16 (XLA:CPU compiles it very slowly) or diffusers:compile:bfloat16.")
_TINY = flags.DEFINE_bool(
    "tiny", False, "A CPU-sized smoke test (CI): "
    + ", ".join(f"--{k}={v}" for k, v in TINY.items()) + " (flags given explicitly still win).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", -1, "CPU backend only: JAX devices to split the CPU into, as ddpm_jax.train "
    "does (-1 one per core, 0 JAX's default).")


# ----------------------------------------------------------------------------------------------
# Variants: a training call and a sampling call, each complete (synchronised) when it returns.
# ----------------------------------------------------------------------------------------------
@dataclass
class Variant:
    framework: str
    mode: str  # "jit" (ddpm_jax), "eager" or "compile" (PyTorch)
    dtype: str
    train_images: int = 0  # images one training call trains on
    sample_images: int = 0  # images × steps of one sampling call
    first_call_s: dict[str, float] = field(default_factory=dict)  # task -> s
    rates: dict[str, list[float]] = field(default_factory=dict)  # task -> images/s per timing
    failed: dict[str, str] = field(default_factory=dict)  # task -> why


@dataclass
class Task:
    """One variant's callable for one task (train or sample), built on first use."""

    variant: Variant
    build: Callable[[], Callable[[], None]]
    call: Callable[[], None] | None = None


def _jax_tasks(config: ml_collections.ConfigDict, dtypes: list[str], sample_batch: int,
               sample_steps: int) -> list[tuple[Variant, Callable, Callable]]:
    """(variant, build_train, build_sample) per dtype. The variants share one TrainState (the
    dispatch donates it: each call's output is the next call's input, whichever dtype runs)."""
    mesh = parallel.make_data_mesh()
    rng = jax.random.key(0)
    shared: dict[str, Any] = {}
    out = []
    for dtype in dtypes:
        cfg = config.copy_and_resolve_references()
        cfg.model.dtype = dtype
        model, _, init, multi_step = training.make_jitted_training(cfg, mesh)
        k = cfg.train.steps_per_dispatch
        variant = Variant("ddpm_jax", "jit", dtype, train_images=k * cfg.data.batch_size,
                          sample_images=sample_batch * sample_steps)

        def build_train(multi_step=multi_step, init=init, cfg=cfg) -> Callable[[], None]:
            if "state" not in shared:
                shared["state"] = init(rng)
                shared["acc"] = jax.device_put(training.zero_metrics(), NamedSharding(mesh, P()))
                shared["batches"] = synthetic.train_batches(cfg, mesh, rng)
            compiled = multi_step.lower(shared["state"], shared["acc"], shared["batches"]).compile()

            def call() -> None:
                shared["state"], shared["acc"] = compiled(shared["state"], shared["acc"],
                                                          shared["batches"])
                jax.block_until_ready((shared["state"], shared["acc"]))

            return call

        def build_sample(model=model, init=init, cfg=cfg) -> Callable[[], None]:
            if "state" not in shared:
                shared["state"] = init(rng)
            spec = sampler_spec.from_config(
                cfg, dict(sampler="ddpm", num_steps=sample_steps, guidance=0.0))
            generate = generation.make_generate_fn(model, cfg, mesh, spec, batch_size=sample_batch)
            chunk = np.int32(0)
            compiled = generate.lower(shared["state"].ema_params, rng, chunk).compile()

            def call() -> None:
                jax.block_until_ready(compiled(shared["state"].ema_params, rng, chunk))

            return call

        out.append((variant, build_train, build_sample))
    return out


def _torch_device(torch: Any) -> str:
    """PyTorch's device for JAX's backend: the same GPU, or the CPU."""
    backend = jax.default_backend()
    if backend == "gpu":
        if not torch.cuda.is_available():
            raise ImportError("JAX runs on a GPU but this torch has no CUDA: install a CUDA torch "
                              "or run with --frameworks=ddpm_jax.")
        return "cuda"
    if backend != "cpu":
        raise ImportError(f"JAX's backend is {backend!r}; PyTorch cannot run there. Run with "
                          "--frameworks=ddpm_jax.")
    return "cpu"


def _torch_tasks(config: ml_collections.ConfigDict, dtypes: list[str], modes: list[str],
                 sample_batch: int, sample_steps: int, modules: tuple[Any, Any],
                 ) -> tuple[list[tuple[Variant, Callable, Callable]], int]:
    """(variant, build_train, build_sample) per mode and dtype, and the model's parameter count.
    The variants share one model, optimizer and EMA (torch.compile wraps the same module)."""
    torch, diffusers = modules
    device = _torch_device(torch)
    net = diffusers.UNet2DModel(**diffusers_equivalent.unet_config(config)).to(device)
    scheduler = diffusers.DDPMScheduler(**diffusers_equivalent.scheduler_config(config))
    optim = config.optim
    params = list(net.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps)
    warmup = optim.warmup_steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(step / warmup, 1.0) if warmup > 0 else 1.0)
    batch, size, channels = (config.data.batch_size, config.data.image_size,
                             config.data.num_channels)
    generator = torch.Generator(device).manual_seed(0)
    x0 = torch.rand((batch, channels, size, size), generator=generator, device=device) * 2 - 1
    decay, clip = config.train.ema_decay, optim.grad_clip
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def runs_bf16() -> bool:
        return device == "cpu" or torch.cuda.is_bf16_supported()

    out = []
    for mode in modes:
        for dtype in dtypes:
            variant = Variant("diffusers", mode, dtype, train_images=batch,
                              sample_images=sample_batch * sample_steps)
            if dtype == "bfloat16" and not runs_bf16():
                variant.failed = dict.fromkeys(("train", "sample"),
                                               f"bfloat16 unsupported on {device}")
            autocast = dict(device_type=device, dtype=torch.bfloat16,
                            enabled=dtype == "bfloat16")

            def build_train(mode=mode, autocast=autocast) -> Callable[[], None]:
                model = torch.compile(net) if mode == "compile" else net

                def call() -> None:
                    net.train()
                    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,),
                                      generator=generator, device=device)
                    noise = torch.randn(x0.shape, generator=generator, device=device)
                    x_t = scheduler.add_noise(x0, noise, t)
                    with torch.autocast(**autocast):
                        eps = model(x_t, t).sample
                    loss = torch.nn.functional.mse_loss(eps.float(), noise)
                    loss.backward()
                    if clip and clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, clip)
                    opt.step()
                    lr_schedule.step()
                    opt.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, params, 1.0 - decay)
                    sync()

                return call

            def build_sample(mode=mode, autocast=autocast) -> Callable[[], None]:
                model = torch.compile(net) if mode == "compile" else net
                scheduler.set_timesteps(sample_steps, device=device)
                shape = (sample_batch, channels, size, size)

                @torch.inference_mode()
                def call() -> None:  # DDPMPipeline.__call__'s loop
                    net.eval()
                    x = torch.randn(shape, generator=generator, device=device)
                    for t in scheduler.timesteps:
                        with torch.autocast(**autocast):
                            eps = model(x, t).sample
                        x = scheduler.step(eps.float(), t, x, generator=generator).prev_sample
                    sync()

                return call

            out.append((variant, build_train, build_sample))
    return out, sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------------
# Timing and the report.
# ----------------------------------------------------------------------------------------------
def _measure(tasks: list[Task], name: str, images: Callable[[Variant], int], calls: int,
             repeats: int, warmup: int, fallible: Callable[[Variant], bool]) -> None:
    """Builds and first-calls each task (timed alone), warms it up, then times all of them in
    turns: ``repeats`` rounds of ``calls`` calls each. A fallible variant's failure is recorded,
    anything else raises."""
    live = []
    for task in tasks:
        v = task.variant
        if name in v.failed:
            continue
        start = time.perf_counter()
        try:
            task.call = task.build()
            task.call()
        except Exception as e:  # noqa: BLE001  reported in the table
            if not fallible(v):
                raise
            v.failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
            print(f"  {v.framework} {v.mode} {v.dtype} {name}: failed: {v.failed[name]}",
                  flush=True)
            continue
        v.first_call_s[name] = time.perf_counter() - start
        for _ in range(warmup):
            task.call()
        print(f"  {v.framework} {v.mode} {v.dtype} {name}: first call "
              f"{v.first_call_s[name]:.1f} s", flush=True)
        live.append(task)
    for _ in range(repeats):
        for task in live:
            start = time.perf_counter()
            for _ in range(calls):
                task.call()
            elapsed = time.perf_counter() - start
            task.variant.rates.setdefault(name, []).append(
                calls * images(task.variant) / elapsed)


def _table(variants: list[Variant], name: str, unit: str) -> list[str]:
    lines = [f"| task | framework | mode | dtype | first call s | {unit} (median) | range |",
             "|---|---|---|---|---|---|---|"]
    for v in variants:
        if name in v.failed:
            lines.append(f"| {name} | {v.framework} | {v.mode} | {v.dtype} | | skipped: "
                         f"{v.failed[name]} | |")
        elif name in v.rates:
            r = v.rates[name]
            lines.append(f"| {name} | {v.framework} | {v.mode} | {v.dtype} | "
                         f"{v.first_call_s[name]:.1f} | {statistics.median(r):.2f} | "
                         f"{min(r):.2f}-{max(r):.2f} |")
    return lines


def _ratio(variants: list[Variant], name: str) -> str:
    def best(framework: str) -> tuple[float, Variant] | None:
        rated = [(statistics.median(v.rates[name]), v) for v in variants
                 if v.framework == framework and name in v.rates]
        return max(rated, key=lambda r: r[0]) if rated else None

    ours, theirs = best("ddpm_jax"), best("diffusers")
    if ours is None or theirs is None:
        return f"ratio {name}: n/a (needs a ddpm_jax and a diffusers figure)"
    (a, va), (b, vb) = ours, theirs
    return (f"ratio {name}: {a / b:.2f}x (ddpm_jax best {a:.2f}, {va.mode} {va.dtype}; "
            f"diffusers best {b:.2f}, {vb.mode} {vb.dtype})")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _device_name() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        names = [line.split(":", 1)[1].strip() for line in
                 Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
        kind = names[0] if names else platform.processor() or "CPU"
        return f"{kind}, {os.cpu_count()} cores; JAX: {jax.device_count()} CPU device(s)"
    return f"{jax.device_count()} x {d.device_kind} ({d.platform})"


def _matches(v: Variant, pattern: str) -> bool:
    """Whether every ':'-separated part of ``pattern`` names v's framework, mode or dtype."""
    return all(part in (v.framework, v.mode, v.dtype) for part in pattern.split(":"))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a shipped config's name resolved to its file and --tiny's defaults."""
    tiny = any(a in ("--tiny", "--tiny=true", "--tiny=True") for a in argv)
    given = {a.split("=", 1)[0].lstrip("-") for a in argv[1:]}
    if tiny:
        argv = argv[:1] + [f"--{k}={v}" for k, v in TINY.items() if k not in given] + argv[1:]
    resolved = []
    for arg in argv:
        if arg.startswith("--config="):
            arg = "--config=" + configs.resolve(arg.split("=", 1)[1])
        resolved.append(arg)
    return flags.FLAGS(resolved)


def _torch_modules() -> tuple[Any, Any]:
    try:
        import diffusers
        import torch
    except ImportError as e:
        raise ImportError(
            f"The diffusers side needs torch and diffusers (the [parity] extra: pip install -e "
            f"'.[parity]'), missing here ({e}). Or time ddpm_jax alone: --frameworks=ddpm_jax."
        ) from None
    return torch, diffusers


def main(argv: list[str]) -> None:
    del argv
    frameworks, dtypes = _FRAMEWORKS.value, _DTYPES.value
    for given, allowed, flag in ((frameworks, FRAMEWORKS, "frameworks"),
                                 (dtypes, DTYPES, "dtypes")):
        if not given or set(given) - set(allowed):
            raise app.UsageError(f"--{flag}={','.join(given)}: choose from {','.join(allowed)}.")
    names = set(FRAMEWORKS) | set(DTYPES) | {"jit", "eager", "compile"}
    for pattern in _EXCLUDE.value:
        if set(pattern.split(":")) - names:
            raise app.UsageError(f"--exclude={pattern}: name variants by {sorted(names)}.")
    config = _CONFIG.value
    config.data.batch_size = _BATCH.value
    sample_batch = _SAMPLE_BATCH.value or _BATCH.value
    sample_steps = _SAMPLE_STEPS.value
    if not 0 < sample_steps < config.diffusion.num_timesteps:
        raise app.UsageError(f"--sample_steps={sample_steps}: 1 to "
                             f"{config.diffusion.num_timesteps - 1}.")
    modules = _torch_modules() if "diffusers" in frameworks else None
    if modules:
        diffusers_equivalent.unet_config(config)  # refuses what diffusers cannot express, early
    parallel.split_cpu_into_devices(config.data.batch_size, _CPU_DEVICES.value)
    config_checks.check_config(config, "train", device_count=jax.device_count())  # the trainer's
    load_before = os.getloadavg()

    entries = []  # (variant, build_train, build_sample)
    if "ddpm_jax" in frameworks:
        entries += _jax_tasks(config, dtypes, sample_batch, sample_steps)
    jax_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
        lambda: training.create_train_state(config, unet_from_config(
            config.model, config.data.num_channels), training.make_optimizer(config.optim),
            jax.random.key(0))).params))
    threads = ""
    if modules:
        torch = modules[0]
        if jax.default_backend() == "cpu":
            torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(
                os, "sched_getaffinity") else os.cpu_count())
        modes = ["eager"] + ([] if _SKIP_COMPILE.value else ["compile"])
        torch_entries, torch_params = _torch_tasks(config, dtypes, modes, sample_batch,
                                                   sample_steps, modules)
        if torch_params != jax_params:
            raise ValueError(f"Not the same network: diffusers' UNet2DModel has {torch_params:,} "
                             f"parameters, ddpm_jax's UNet {jax_params:,}.")
        entries += torch_entries
        threads = f"torch intra-op threads {torch.get_num_threads()}"

    config_name = config_flags.get_config_filename(flags.FLAGS["config"])
    print(f"device:     {_device_name()}"
          + (f"; torch on {_torch_device(modules[0])}" if modules else ""))
    print("versions:   " + ", ".join(
        [f"python {platform.python_version()}"]
        + [f"{p} {_version(p)}" for p in ("jax", "jaxlib", "flax", "optax")]
        + ([f"{p} {_version(p)}" for p in ("torch", "diffusers")] if modules else [])))
    print(f"threads:    JAX {jax.device_count()} {jax.default_backend()} device(s)"
          + (f"; {threads}" if threads else "") + f" (of {os.cpu_count()} cores)")
    print(f"config:     {Path(config_name).name} ({jax_params / 1e6:.2f}M params, batch "
          f"{config.data.batch_size}, {config.data.image_size}x{config.data.image_size}x"
          f"{config.data.num_channels}, dropout {config.model.dropout}, clip_groups "
          f"{config.optim.get('clip_groups', 1)}, {config.train.steps_per_dispatch} step(s) per "
          f"dispatch); sampling batch {sample_batch}, {sample_steps} ancestral steps per call")
    print(f"timing:     {_REPEATS.value} rounds of {_CALLS.value} call(s) per variant, in turns, "
          f"after the first call and {_WARMUP.value} warm-up call(s)"
          + (f"; left out: {', '.join(_EXCLUDE.value)}" if _EXCLUDE.value else ""), flush=True)

    entries = [e for e in entries if not any(_matches(e[0], x) for x in _EXCLUDE.value)]
    variants = [v for v, _, _ in entries]

    def fallible(v: Variant) -> bool:  # bf16 and torch.compile may not run everywhere
        return v.framework == "diffusers" and (v.mode == "compile" or v.dtype == "bfloat16")

    tasks_units = (("train", 1, "images/s"), ("sample", 2, "images x steps/s"))
    for name, index, unit in tasks_units:
        tasks = [Task(e[0], e[index]) for e in entries]
        images = (lambda v: v.train_images) if name == "train" else (lambda v: v.sample_images)
        _measure(tasks, name, images, _CALLS.value, _REPEATS.value, _WARMUP.value, fallible)
        for task in tasks:
            task.call = None  # frees compiled graphs before the next task
        print("\n" + "\n".join(_table(variants, name, unit)) + "\n", flush=True)  # as it ends
    load_after = os.getloadavg()
    print(f"load:       {load_before[0]:.2f} before, {load_after[0]:.2f} after (1-min average; "
          "other processes on a shared host slow every variant alike only approximately)")
    for name, _, _ in tasks_units:
        print(_ratio(variants, name))
    sys.stdout.flush()


def _main_reporting_user_errors(argv: list[str]) -> None:
    """main, with a missing package or a config diffusers cannot express as one line."""
    try:
        main(argv)
    except (ImportError, ValueError) as e:
        if os.environ.get("DDPM_JAX_TRACEBACK"):
            raise
        sys.stdout.flush()
        sys.exit(f"{Path(__file__).name}: error: {e}")


if __name__ == "__main__":
    app.run(_main_reporting_user_errors, flags_parser=_parse_flags)
