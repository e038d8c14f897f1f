"""Latent diffusion from the command line: configs, FP training on latents a random-weight
first stage encodes (with their mirrors, into a latent cache), BiDM QAT from it (reading the
cache), sampling to decoded images and the packed export on a tiny LDM-4 model over a generated 32x32 image folder,
and one-line config errors."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax import main
from bidm_jax.bidm import tbs
from bidm_jax.export import convert_first_stage as cfs
from bidm_jax.export import convert_ldm_unet as clu
from bidm_jax.export import packed as ex
from bidm_jax.layers import packed as pk
from bidm_jax.models import autoencoders as ae
from bidm_jax.models.ldm_unet import LDMUNet
from bidm_jax.training import checkpoint as ckpt_lib

CONFIGS = ("configs/lsun_bedrooms_ldm4.py", "configs/ffhq_ldm4.py", "configs/lsun_churches_ldm8.py")


def _images(root, n=8, size=32):
  """n random RGB PNGs of size x size under root/train/a."""
  folder = root / "train" / "a"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(folder / f"{i}.png")
  return str(root)


def _first_stage(folder, preset, seed=1):
  """A random-weight first stage of `preset`, written as --mode=convert writes one."""
  config = ae.PRESETS[preset]
  x = jnp.zeros((1, config.factor, config.factor, 3))
  params = ae.make_first_stage(config).init(jax.random.PRNGKey(seed), x)["params"]
  cfs.write_converted(folder, config, params)
  return str(folder)


def _tiny(spec, data_dir, first_stage=""):
  """The :tiny variant of `spec` on the image folder data_dir, one device."""
  config = config_lib.load_config_file(spec + ":tiny")
  config.data.update(source="folder", data_dir=data_dir, name="")
  config.first_stage.source = first_stage
  config.mesh.data = 1
  return config


@pytest.mark.parametrize("spec", CONFIGS)
def test_configs_build_the_ldm_unet(spec):
  for variant in ("", ":tiny"):
    config = config_lib.load_config_file(spec + variant)
    config_lib.validate(config)
    model = builders.make_model(config, config_lib.method_from_config(config))
    assert isinstance(model, LDMUNet)
    assert builders.describe_unet(model) == builders.model_description(config)
    rebuilt = builders.unet_from_description(builders.model_description(config))
    assert rebuilt.config == model.config
  assert (config.training.learning_rate, config.training.batch_size) == (2e-5, 4)


def test_ddpm_description_unchanged():
  config = config_lib.default_config()
  assert builders.model_description(config) == dict(
      ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16], dropout=0.1, out_ch=3
  )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.family", "vit", "config.model.family: 'vit' is not one of"),
        ("model.ldm.norm_groups", 5, "config.model.ldm: LDMUNetConfig: norm_groups=5"),
        ("model.ldm.out_channels", 4, "config.model.ldm.out_channels:"),
        ("model.ldm.image_size", 16, "config.data.image_size: the LDM U-Net diffuses (16, 16, 3)"),
        ("first_stage.preset", "vq_f9", "config.first_stage.preset: 'vq_f9' is not one of"),
        ("model.family", "ddpm", "config.first_stage.source: a first stage feeds the LDM"),
    ],
)
def test_bad_ldm_fields_are_one_line_errors(tmp_path, field, value, message):
  config = _tiny(CONFIGS[0], str(tmp_path))
  group, _, name = field.rpartition(".")
  config[group][name] = value
  with pytest.raises(ValueError) as e:
    config_lib.validate(config)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bad_first_stage_sources_are_one_line_errors(tmp_path):
  data_dir = _images(tmp_path / "images")
  cases = [
      ("", "config.first_stage.source: the model diffuses 'tiny_vq_f4' latents"),
      (str(tmp_path / "none"), "config.first_stage.source: "),
      (_first_stage(tmp_path / "kl", "tiny_kl_f8"), "config.first_stage.source: "),
  ]
  for source, message in cases:
    config = _tiny(CONFIGS[0], data_dir, source)
    config.binarization.method = "fp"
    with pytest.raises(ValueError) as e:
      main.run(config, str(tmp_path / "run"), "train")
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_fp_training_then_bidm_qat_then_sampling(tmp_path, monkeypatch):
  calls = []
  latent_encoder = builders.latent_encoder

  def counted(config, first_stage):
    encode = latent_encoder(config, first_stage)
    return lambda images, index: calls.append(index) or encode(images, index)

  monkeypatch.setattr(builders, "latent_encoder", counted)
  data_dir = _images(tmp_path / "images")
  first_stage = _first_stage(tmp_path / "vq", "tiny_vq_f4")
  cache = str(tmp_path / "latents")
  fp = _tiny(CONFIGS[0], data_dir, first_stage)
  fp.binarization.method = "fp"
  fp.training.update(steps=2, log_every=1)
  fp.data.latent_cache = cache  # encoded here, with the mirrors (LSUN flips), read by the QAT
  main.run(fp, str(tmp_path / "fp"), "train")
  assert calls == [0, 1]  # one batch of 8 images, then their mirrors
  qat = _tiny(CONFIGS[0], data_dir, first_stage)
  qat.training.teacher = str(tmp_path / "fp")
  qat.training.update(steps=2, log_every=1)
  qat.data.latent_cache = cache
  main.run(qat, str(tmp_path / "qat"), "train")
  assert calls == [0, 1]
  _check_latent_cache(qat, cache)
  os.rename(first_stage, tmp_path / "vq_before")  # another autoencoder at the same path
  _first_stage(tmp_path / "vq", "tiny_vq_f4", seed=2)
  builders._read_first_stage.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"^data.latent_cache: .* first_stage.params is '"):
    main.run(qat, str(tmp_path / "other"), "train")
  stats = main.run(qat, str(tmp_path / "qat"), "sample")
  assert stats["num_samples"] == qat.sampling.num_samples
  with np.load(os.path.join(tmp_path, "qat", "samples.npz")) as f:
    simulated = f["images"].astype(int)
  assert simulated.shape == (4, 32, 32, 3)

  # The packed export of the QAT model, sampled with the packed engine and decoded: the
  # simulated engine's images, up to late sign flips within float rounding (test_packed.py).
  qat.sampling.checkpoint = str(tmp_path / "qat")
  info = main.run(qat, str(tmp_path / "export"), "export")
  assert info["file_ratio"] > 1
  qat.sampling.update(engine="packed", checkpoint=str(tmp_path / "export"))
  main.run(qat, str(tmp_path / "packed"), "sample")
  with np.load(os.path.join(tmp_path, "packed", "samples.npz")) as f:
    packed = f["images"].astype(int)
  assert packed.shape == simulated.shape
  assert np.mean(packed == simulated) > 0.9 and np.mean(np.abs(packed - simulated)) < 1.0
  qat.tbs.buckets = 50  # an export is checked against the config's TBS settings
  with pytest.raises(ckpt_lib.CheckpointError, match="tbs_buckets: export 100 vs config 50"):
    main.run(qat, str(tmp_path / "other"), "sample")


def test_packed_export_of_the_ldm_unet_equals_simulated(tmp_path):
  """Every binary layer of the LDM U-Net (res blocks, attention q/k/v/proj_out, resamplers)
  exports as packed bits; the export's eps equals the simulated model's on a first denoising
  step and on the next one with its TBS cache."""
  config = _tiny(CONFIGS[0], str(tmp_path))
  model = builders.make_model(config, config_lib.method_from_config(config))
  shape = builders.image_shape(config, 2)
  params = builders.init_params(model, config, jax.random.PRNGKey(0))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = treedef.unflatten(
      [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  )  # thresholds, k and TBS coefficients away from their initial values
  info = ex.write_export(tmp_path / ex.EXPORT_FILE, model, params, shape[1:])
  tree, desc = ex.read_export(tmp_path / ex.EXPORT_FILE)
  assert desc["model"]["family"] == "ldm" and desc["tbs"]["tbs_structure"] == "blocks"
  assert any("attn" in name for name in desc["layers"]) and info["ratio"] > 1
  x = jax.random.normal(jax.random.PRNGKey(2), shape)
  t = jnp.array([10, 500])
  empty = tbs.empty_cache(jax.eval_shape(model.apply, {"params": params}, x, t).connections)
  simulated = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, cache=c))
  packed = jax.jit(lambda p, x, t, c: pk.apply(model, p, x, t, cache=c))
  first, first_packed = simulated(params, x, t, empty), packed(tree, x, t, empty)
  _assert_close(first_packed.eps, first.eps)
  cache = tbs.TBSCache(tuple(first.connections), jnp.ones((), bool))
  packed_cache = tbs.TBSCache(tuple(first_packed.connections), jnp.ones((), bool))
  second = simulated(params, x, t - 1, cache)
  _assert_close(packed(tree, x, t - 1, packed_cache).eps, second.eps)
  assert np.max(np.abs(np.asarray(second.eps) - np.asarray(first.eps))) > 1e-3  # cache acts


def _assert_close(packed, simulated):
  packed, simulated = np.asarray(packed), np.asarray(simulated)
  scale = float(np.max(np.abs(simulated)))
  np.testing.assert_allclose(packed, simulated, rtol=1e-5, atol=1e-5 * scale)


def _check_latent_cache(config, cache):
  """The cache holds the first stage's latents of the images and of their mirrors."""
  first_stage = builders.load_first_stage(config, builders.make_mesh(config))
  images = np.stack(
      [
          np.asarray(Image.open(p), np.float32) / 127.5 - 1
          for p in sorted(glob.glob(f"{config.data.data_dir}/train/a/*.png"))
      ]
  )
  encode = jax.jit(
      lambda x: first_stage.module.apply({"params": first_stage.params}, x, method="encode")
  )
  for name, x in (("latents", images), ("mirrors", images[:, :, ::-1])):
    stored = np.load(os.path.join(cache, f"shard-00000-of-00001.{name}.npy"))
    np.testing.assert_allclose(stored, encode(x), atol=1e-5)


def test_convert_a_diffusers_pipeline_to_a_teacher_and_first_stage(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  from test_autoencoders import _diffusers_model  # pylint: disable=import-outside-toplevel
  from test_ldm_unet import TINY_LDM4_DIFFUSERS, _diffusers_unet  # pylint: disable=import-outside-toplevel

  pipe = tmp_path / "pipe"
  _diffusers_unet(**TINY_LDM4_DIFFUSERS).save_pretrained(pipe / "unet")
  _diffusers_model(
      diffusers.VQModel,
      block_out_channels=(8, 16, 32),
      layers_per_block=1,
      latent_channels=3,
      num_vq_embeddings=16,
  ).save_pretrained(pipe / "vqvae")
  config = _tiny(CONFIGS[0], _images(tmp_path / "images"))
  config.convert.source = str(pipe)
  out = main.run(config, str(tmp_path / "teacher"), "convert")
  config.training.teacher = out["to"]
  config.first_stage.source = out["first_stage"]
  mesh = builders.make_mesh(config)
  _, teacher = builders.load_teacher(config, mesh)
  expected = clu.load_ldm_unet(pipe)[1]
  assert jax.tree_util.tree_all(
      jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), teacher, expected)
  )
  first_stage = builders.load_first_stage(config, mesh)
  assert first_stage.config == cfs.load_first_stage(pipe)[0]
  with pytest.raises(ckpt_lib.CheckpointError):  # never over an existing teacher
    main.run(config, str(tmp_path / "teacher"), "convert")
  config.model.ldm.model_channels = 8
  config.model.ldm.norm_groups = 4
  with pytest.raises(ValueError) as e:
    main.run(config, str(tmp_path / "other"), "convert")
  assert "\n" not in str(e.value) and not (tmp_path / "other").exists()


def test_release_distillation_points_add_conv_in(tmp_path):
  """distill.points='release' on the LDM U-Net distils conv_in's output and then every timestep
  block's (the authors' LDM code hooks all of them); 'blocks' the blocks only. The CIFAR
  release's TBS structure is refused in one line: the LDM release's is 'blocks'."""
  config = _tiny(CONFIGS[0], str(tmp_path))
  config.distill.points = "release"
  config_lib.validate(config)
  model = builders.make_model(config, config_lib.method_from_config(config))
  x = jax.random.normal(jax.random.PRNGKey(0), builders.image_shape(config, 2))
  params = builders.init_params(model, config, jax.random.PRNGKey(1))
  out = jax.jit(lambda p, x: model.apply({"params": p}, x, jnp.array([3, 700])))(params, x)
  assert len(out.distill) == len(out.features) + 1
  assert out.distill[0].shape == (*x.shape[:3], model.config.model_channels)
  for a, b in zip(out.distill[1:], out.features):
    np.testing.assert_array_equal(a, b)
  blocks = model.clone(distill_points="blocks").apply({"params": params}, x, jnp.array([3, 700]))
  assert len(blocks.distill) == len(blocks.features)
  with pytest.raises(ValueError, match="distill_points must be one of"):
    model.clone(distill_points="all").apply({"params": params}, x, jnp.array([3, 700]))
  config.tbs.structure = "release"
  with pytest.raises(ValueError) as e:
    config_lib.validate(config)
  assert str(e.value).startswith("config.tbs.structure: the LDM U-Net has only 'blocks'")
