"""First stages (bidm_jax.models.autoencoders) and their conversion (export.convert_first_stage).

The reference is diffusers' VQModel and AutoencoderKL (test extra), tiny and with random
weights. Their state dicts are converted in the diffusers layout (saved folders, safetensors and
.bin) and, renamed by the explicit `_COMPVIS_RENAMES` below, in the CompVis layout (a Lightning
``.ckpt`` and a bare first-stage checkpoint). Our encode / decode must give diffusers' outputs.
"""

import dataclasses
import re

import jax
import numpy as np
import pytest

from bidm_jax.export import convert_first_stage as cfs
from bidm_jax.models import autoencoders as ae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

REL_TOL = 1e-5
SIZE = 16

# diffusers name -> CompVis name, applied in order (L = number of levels). The Linear attention
# projections of diffusers are 1x1 Conv2d in CompVis (`_to_compvis` adds the two axes).
_COMPVIS_RENAMES = (
    (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2."),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
    (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m, L: f"up.{L - 1 - int(m[1])}.block.{m[2]}."),
    (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m, L: f"up.{L - 1 - int(m[1])}.upsample."),
    (r"mid_block\.resnets\.(\d)\.", lambda m, L: f"mid.block_{int(m[1]) + 1}."),
    (r"mid_block\.attentions\.0\.", r"mid.attn_1."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.to_out\.0\.", ".proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
)


def _to_compvis(state_dict, levels):
  out = {}
  for name, value in state_dict.items():
    for pattern, repl in _COMPVIS_RENAMES:
      name = re.sub(pattern, repl if isinstance(repl, str) else (lambda m: repl(m, levels)), name)
    if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name):
      value = value[:, :, None, None]
    out[name] = value
  return out


def _diffusers_model(cls, **kwargs):
  """A tiny diffusers model whose every parameter is random (norms and biases too)."""
  torch.manual_seed(0)
  levels = len(kwargs["block_out_channels"])
  model = cls(
      in_channels=3,
      out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * levels,
      up_block_types=("UpDecoderBlock2D",) * levels,
      norm_num_groups=4,
      sample_size=SIZE,
      **kwargs,
  ).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("embedding.weight"):  # well-separated codes: no near ties in the argmin
        p.copy_(torch.randn_like(p))
      elif p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def vq():
  return _diffusers_model(
      diffusers.VQModel,
      block_out_channels=(8, 16),
      layers_per_block=2,
      latent_channels=3,
      num_vq_embeddings=16,
  )


@pytest.fixture(scope="module")
def kl():
  return _diffusers_model(
      diffusers.AutoencoderKL,
      block_out_channels=(8, 16, 16),
      layers_per_block=1,
      latent_channels=4,
      scaling_factor=0.5,
  )


def _numpy_state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _rel_err(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _assert_close(name, ours, ref):
  err = _rel_err(ours, ref)
  print(f"{name}: max relative error {err:.2e}")
  assert err <= REL_TOL, (name, err)


def _assert_same_params(a, b):
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (_, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y)


def _images(seed, n=2):
  return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def test_vq_parity_both_layouts(vq, tmp_path):
  vq.save_pretrained(tmp_path / "vqvae", safe_serialization=True)
  config, params = cfs.load_first_stage(tmp_path)  # the pipeline folder: finds vqvae/
  assert config == ae.FirstStageConfig(
      ch=8, ch_mult=(1, 2), z_channels=3, embed_dim=3, n_embed=16, norm_groups=4, scale_factor=1.0
  )
  compvis = _to_compvis(_numpy_state(vq), levels=2)
  compvis["loss.discriminator.main.0.weight"] = np.ones((4, 3, 4, 4), np.float32)  # skipped
  torch.save({k: torch.from_numpy(v) for k, v in compvis.items()}, tmp_path / "vq.ckpt")
  _, compvis_params = cfs.load_first_stage(tmp_path / "vq.ckpt", config)
  _assert_same_params(params, compvis_params)

  model, variables = ae.VQModel(config), {"params": params}
  x = _images(0)
  with torch.no_grad():
    ref_latents = vq.encode(_nchw(x)).latents
    z = torch.randn(ref_latents.shape, generator=torch.Generator().manual_seed(1))
    ref_images = vq.decode(z).sample
    _, _, (_, _, ref_idx) = vq.quantize(z)
  latents = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, x)
  _assert_close("VQModel encode", latents, _nhwc(ref_latents))
  _, idx = model.apply(variables, _nhwc(z), method="quantized")
  np.testing.assert_array_equal(np.asarray(idx).reshape(-1), ref_idx.numpy().reshape(-1))
  _assert_close(
      "VQModel decode", model.apply(variables, _nhwc(z), method="decode"), _nhwc(ref_images)
  )


def test_kl_parity_both_layouts(kl, tmp_path):
  kl.save_pretrained(tmp_path / "vae", safe_serialization=False)  # diffusion_pytorch_model.bin
  config, params = cfs.load_first_stage(tmp_path / "vae")
  assert config.kind == "kl" and config.scale_factor == 0.5 and config.ch_mult == (1, 2, 2)
  compvis = _to_compvis(_numpy_state(kl), levels=3)
  ckpt = {f"first_stage_model.{k}": torch.from_numpy(v) for k, v in compvis.items()}
  ckpt["model.diffusion_model.conv_in.weight"] = torch.zeros(8, 4, 3, 3)  # another model
  ckpt["scale_factor"] = torch.tensor(0.5)  # the buffer of scale_by_std
  torch.save({"state_dict": ckpt, "global_step": 3}, tmp_path / "ldm.ckpt")
  compvis_config, compvis_params = cfs.load_first_stage(
      tmp_path / "ldm.ckpt",
      dataclasses.replace(config, scale_factor=1.0),
      prefix="state_dict.first_stage_model",
  )
  assert compvis_config == config
  _assert_same_params(params, compvis_params)

  model, variables = ae.AutoencoderKL(config), {"params": params}
  x = _images(2)
  with torch.no_grad():
    posterior = kl.encode(_nchw(x)).latent_dist
    z = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    ref_images = kl.decode(z).sample
  mean, logvar = model.apply(variables, x, method="moments")
  _assert_close("AutoencoderKL mean", mean, _nhwc(posterior.mean))
  _assert_close("AutoencoderKL logvar", logvar, _nhwc(posterior.logvar))
  _assert_close(
      "AutoencoderKL encode",
      model.apply(variables, x, method="encode"),
      0.5 * _nhwc(posterior.mean),
  )
  _assert_close(
      "AutoencoderKL decode",
      model.apply(variables, 0.5 * _nhwc(z), method="decode"),
      _nhwc(ref_images),
  )
  rng = jax.random.PRNGKey(4)
  sample = model.apply(variables, x, rng, method="encode")
  noise = jax.random.normal(rng, mean.shape)
  np.testing.assert_allclose(sample, 0.5 * (mean + np.exp(0.5 * logvar) * noise), rtol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda sd: sd.pop("decoder.conv_in.bias"),
            "missing targets (1): decoder/conv_in/bias (16,) <- decoder.conv_in.bias",
        ),
        (
            lambda sd: sd.update({"encoder.extra.weight": np.ones(2, np.float32)}),
            "unused source tensors (1): encoder.extra.weight (2,)",
        ),
        (
            lambda sd: sd.update({"quant_conv.weight": np.ones((3, 3, 3, 3), np.float32)}),
            "shape mismatches (1): quant_conv/kernel expects (1, 1, 3, 3) <- quant_conv.weight",
        ),
    ],
)
def test_conversion_errors_are_one_line(vq, change, message):
  config = cfs.config_from_diffusers(dict(vq.config))
  state_dict = _numpy_state(vq)
  change(state_dict)
  with pytest.raises(ValueError) as info:
    cfs.convert_state_dict(state_dict, config)
  assert message in str(info.value) and "\n" not in str(info.value)


def test_config_errors(vq, tmp_path):
  with pytest.raises(ValueError, match="norm_type: 'spatial'"):
    cfs.config_from_diffusers({**vq.config, "norm_type": "spatial"})
  torch.save(vq.state_dict(), tmp_path / "vq.pth")
  with pytest.raises(ValueError, match="does not hold the architecture"):
    cfs.load_first_stage(tmp_path / "vq.pth")
  with pytest.raises(ValueError, match="norm_groups=32 does not divide"):
    ae.FirstStageConfig(ch=8)
