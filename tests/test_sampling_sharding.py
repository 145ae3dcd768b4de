"""Sampling on a mesh of 8 (fake CPU) devices: the compiled sampling loop moves no data between
devices, guided or not, and a batch the devices do not divide is padded, never replicated, giving
the samples (and features) an unpadded run of the same keys gives. (Bits/dim with a padded
batch: tests/test_evaluate.py.)"""

import functools
import importlib

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from ddpm_jax import generation, parallel, program_costs
from ddpm_jax.metrics import features
from ddpm_jax.models import unet_from_config
from test_sample_cli import SIZE, random_params, spec, tiny_config

def sampling_loop(text: str) -> tuple[str, dict[str, int]]:
    """(while instruction, collectives per kind in its body and what it calls) of the one loop
    that runs the network, by the compile report's HLO parser (``program_costs.collectives``)."""
    loop = program_costs.collectives(text)["loops"][0]  # the loop with the most network ops
    assert loop["network_ops"] > 0
    whiles = [line for line in text.splitlines() if " while(" in line]
    return "\n".join(whiles), loop["counts"]


def guided_config():
    config = tiny_config(num_classes=3)
    config.data.class_conditional = True
    config.model.p_uncond = 0.1
    return config


@functools.cache
def guided_model():
    config = guided_config()
    return config, unet_from_config(config.model, 1), random_params(config)


@functools.cache
def compiled_generate(batch_size, guidance, interval, num_devices=8):
    """make_generate_fn of the guided tiny model, compiled for the first ``num_devices``."""
    config, model, params = guided_model()
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
    fn = generation.make_generate_fn(
        model, config, mesh, spec(config, guidance=guidance, guidance_interval=interval),
        batch_size=batch_size,
    )
    return fn.lower(params, jax.random.key(0), np.int32(0)).compile()


@pytest.mark.parametrize("batch_size, guidance, interval", [
    (8, 0.0, None),  # unguided
    (16, 2.0, None),  # guided: [x_t; x_t] along the split batch axis moved rows between devices
    (8, 2.0, (500, 999)),  # the interval's lax.cond
    (12, 2.0, None),  # padded to 16
])
def test_the_sampling_loop_moves_no_data_between_devices(batch_size, guidance, interval):
    op, counts = sampling_loop(compiled_generate(batch_size, guidance, interval).as_text())
    assert not any(counts.values()), counts
    # Each device carries its own rows of the chain: B padded to a multiple of 8, split 8 ways.
    rows = parallel.padded_batch_size(batch_size, 8) // 8
    assert f"f32[{rows},{SIZE},{SIZE},1]" in op


def test_the_check_finds_collectives_in_a_loop_body():
    """The parser sees a collective when there is one: a scan whose step averages over devices."""
    mesh = parallel.make_data_mesh()
    x = jax.device_put(np.ones((8, 4, 4), np.float32),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))

    def scan(x):
        def step(c, _):
            kernel = np.ones((4, 4, 1), np.float32)
            return jax.lax.conv_general_dilated(c, kernel, (1,), "SAME") + c.mean(), None
        return jax.lax.scan(step, x, None, length=3)[0]

    _, counts = sampling_loop(jax.jit(scan).lower(x).compile().as_text())
    assert counts["all-reduce"] > 0


def test_a_padded_batch_draws_the_samples_of_an_unpadded_run():
    """12 guided images with random labels on 8 devices (padded to 16) == the same 12 on 4
    devices (no padding)."""
    _, _, params = guided_model()
    padded, unpadded = (
        [np.asarray(a) for a in compiled_generate(12, 2.0, None, n)(
            params, jax.random.key(3), np.int32(1))]
        for n in (8, 4)
    )
    assert padded[0].shape == (12, SIZE, SIZE, 1) and padded[1].shape == (12,)
    np.testing.assert_array_equal(padded[1], unpadded[1])
    np.testing.assert_array_equal(padded[0], unpadded[0])
    assert len({x.tobytes() for x in padded[0]}) == 12 and len(set(padded[1])) > 1


def test_generate_samples_pads_a_batch_the_devices_do_not_divide(tmp_path):
    """--batch_size=6 on 8 devices: chunks of 6, each drawn as 8, with the trajectory film."""
    config = tiny_config()
    path = generation.generate_samples(random_params(config), config, tmp_path,
                                       spec(config, num_steps=2), num_samples=9, batch_size=6,
                                       seed=0, trajectory=True)
    with np.load(path) as f:
        assert f["arr_0"].shape == (9, SIZE, SIZE, 1)
    with np.load(tmp_path / "samples_00001.npz") as f:
        assert f["arr_0"].shape == (6, SIZE, SIZE, 1)
    assert (tmp_path / "trajectory_x_t.png").exists()


def test_feature_extractor_pads_a_batch_the_devices_do_not_divide():
    def fn(images):
        return {"sum": images.astype(np.float32).sum(axis=(1, 2, 3))}

    extractor = features.FeatureExtractor(fn, parallel.make_data_mesh(), batch_size=12)
    images = np.random.default_rng(0).integers(0, 256, (12, 3, 3, 1), dtype=np.uint8)
    for n in (12, 5):
        np.testing.assert_array_equal(extractor(images[:n])["sum"], images[:n].sum(axis=(1, 2, 3)))
    with pytest.raises(ValueError, match="13 images for a feature batch of 12"):
        extractor(np.zeros((13, 3, 3, 1), np.uint8))


@pytest.mark.parametrize("name", ["cifar10", "celebahq256", "lsun_bedroom256", "lsun_church256",
                                  "mnist", "tiny"])
def test_accelerator_configs_sampling_batches_divide_8_devices(name):
    """Padding costs work: the sampling batches of the configs meant for accelerators split evenly
    over 8 chips. (mnist5k, the CPU default, keeps its recorded 100-image chunks and grid.)"""
    config = importlib.import_module(f"ddpm_jax.configs.{name}").get_config()
    assert config.eval.batch_size % 8 == 0 and config.sample.num_images % 8 == 0


def test_trainer_refuses_empty_sampling_batches_by_name():
    from ddpm_jax import config_checks, evaluation
    from ddpm_jax.configs import tiny

    config = tiny.get_config()
    config.sample.num_images = 0
    with pytest.raises(ValueError, match="config.sample.num_images=0 is not an integer >= 1"):
        config_checks.check_config(config, "train")
    config = tiny.get_config()
    config.eval.every_steps, config.eval.batch_size = 4, 0
    with pytest.raises(ValueError, match="config.eval.batch_size=0 is not an integer >= 1"):
        config_checks.check_config(config, "train")
    config.eval.batch_size = 7  # any positive batch: padded on 8 devices
    assert evaluation.training_eval_settings(config) is not None
