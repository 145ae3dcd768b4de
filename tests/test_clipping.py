"""The original's per-replica clipping (config.optim.clip_groups) done per device: the same
numbers as a group-by-group computation for every layout of groups over devices, and a compiled
train step that costs no more FLOPs than clip_groups=1 and moves nothing but the gradient's
all-reduce. On the 8 fake CPU devices of conftest.py."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import config_checks, diffusion, training
from ddpm_jax.configs import tiny
from ddpm_jax.models import unet_from_config

BATCH = 16


def _grad_fn_and_params():
    config = tiny.get_config()
    model = unet_from_config(config.model, config.data.num_channels)
    sched = diffusion.schedule_from_config(config.diffusion)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,), jnp.int32),
                        train=False)["params"]

    def loss_fn(params, x0, t, noise, y, key):
        def model_fn(x, t):  # dropout 0.1: the keys matter
            return model.apply({"params": params}, x, t, train=True, rngs={"dropout": key})

        losses = diffusion.training_losses(sched, model_fn, x0, t, noise)
        return jnp.mean(losses), losses

    return jax.value_and_grad(loss_fn, has_aux=True), params


@pytest.mark.parametrize("devices, groups", [(8, 8), (2, 8), (8, 2)])
def test_per_device_clipping_is_the_group_by_group_computation(devices, groups):
    """G == D, G a multiple of D, D a multiple of G: each group's mean-loss gradient clipped to
    grad_clip, the clipped gradients averaged, computed here one part at a time in float64. A
    group on m devices is m parts with keys fold_in(key_g, j), its gradient their mean."""
    grad_fn, params = _grad_fn_and_params()
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (BATCH, 16, 16, 1)).astype(np.float32)
    t = rng.integers(0, 1000, BATCH).astype(np.int32)
    noise = rng.standard_normal((BATCH, 16, 16, 1)).astype(np.float32)
    dropout_rng = jax.random.key(1)
    clip = 0.05
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    split = NamedSharding(mesh, P("data"))
    fn = jax.jit(functools.partial(training._group_clipped_grads, grad_fn, groups=groups,
                                   grad_clip=clip, mesh=mesh))
    grads, losses, mean_norm = fn(params, tuple(jax.device_put(a, split) for a in (x0, t, noise))
                                  + (None,), dropout_rng)

    grad_fn = jax.jit(grad_fn)  # one compile for every part
    parts = max(1, devices // groups)
    size = BATCH // groups // parts
    group_keys = jax.random.split(dropout_rng, groups)
    expected = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
    norms, all_losses = [], []
    for g in range(groups):
        group_grads = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
        for j in range(parts):
            key = group_keys[g] if parts == 1 else jax.random.fold_in(group_keys[g], j)
            part = slice((g * parts + j) * size, (g * parts + j + 1) * size)
            (_, part_losses), part_grads = grad_fn(params, x0[part], t[part], noise[part], None,
                                                   key)
            group_grads = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64) / parts,
                                       group_grads, part_grads)
            all_losses.append(np.asarray(part_losses))
        norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(group_grads)))
        scale = min(1.0, clip / norm) / groups
        expected = jax.tree.map(lambda e, x, scale=scale: e + x * scale, expected, group_grads)
        norms.append(norm)
    assert max(norms) > clip  # the clipping is exercised
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-9)
    np.testing.assert_allclose(np.asarray(losses), np.concatenate(all_losses), rtol=1e-5)
    np.testing.assert_allclose(float(mean_norm), np.mean(norms), rtol=1e-4)


def _compiled_train_step(groups: int) -> jax.stages.Compiled:
    config = tiny.get_config()  # batch 8: one example per device
    config.optim.clip_groups = groups
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    _, _, init, multi_step = training.make_jitted_training(config, mesh)
    replicated = NamedSharding(mesh, P())

    def placed(tree, sharding):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            tree)

    state = placed(jax.eval_shape(init, jax.random.key(0)), replicated)
    acc = placed(jax.eval_shape(training.zero_metrics), replicated)
    batches = {"image": jax.ShapeDtypeStruct((1, 8, 16, 16, 1), jnp.float32,
                                             sharding=NamedSharding(mesh, P(None, "data")))}
    return multi_step.lower(state, acc, batches).compile()


def test_compiled_train_step_with_groups_adds_no_flops_and_no_collective():
    """clip_groups 8 on 8 devices: FLOPs per device within 5% of clip_groups 1, and the only
    collective is the all-reduce (the batched per-group gradients of a vmap added all-to-alls
    here and all-gathers at CIFAR-10 size)."""
    flops = {}
    for groups in (1, 8):
        compiled = _compiled_train_step(groups)
        hlo = compiled.as_text()
        others = re.findall(r"\s(all-gather|all-to-all|collective-permute|reduce-scatter)"
                            r"(?:-start)?\(", hlo)
        assert not others, (groups, sorted(set(others)))
        assert re.search(r"\sall-reduce(?:-start)?\(", hlo)
        cost = compiled.cost_analysis()
        flops[groups] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert abs(flops[8] / flops[1] - 1) < 0.05, flops


@pytest.mark.parametrize("groups, batch, devices, message", [
    (3, 40, 8, "clip_groups=3 must be >= 1 and divide config.data.batch_size=40"),
    (6, 48, 4, "clip_groups=6 must be 1, a multiple or a divisor of the device count (4)"),
    (4, 48, 6, "With config.data.batch_size=48 these work: 1, 2, 3, 6, 12, 24, 48."),
])
def test_groups_that_do_not_lay_out_over_the_devices_are_refused(groups, batch, devices, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_checks.check_clip_groups(groups, batch, devices)
    for works in (1, 2, devices, 2 * devices):
        config_checks.check_clip_groups(works, 4 * devices, devices)
