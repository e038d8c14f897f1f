"""The latent-diffusion U-Net (bidm_jax.models.ldm_unet) and its conversion (convert_ldm_unet).

The reference is diffusers' UNet2DModel (test extra) in the two LDM layouts, tiny and with
random weights: LDM-4's (conv resampling, added time projection, head channels) and LDM-8's
(res-block resampling, scale-shift norm, one head per block). Their state dicts are converted
from saved folders and, renamed by the explicit `_COMPVIS_RENAMES` below (the fused qkv built by
`_fuse_qkv`), from a CompVis Lightning ``.ckpt`` with an EMA copy. Our eps must be diffusers'.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import check_teacher_fills_table4_student, fill_params, path_str
from test_autoencoders import _assert_close, _assert_same_params, _nchw, _numpy_state

from bidm_jax.bidm import tbs
from bidm_jax.binarize.methods import get_method
from bidm_jax.export import convert_ldm_unet as clu
from bidm_jax.models import ldm_unet
from bidm_jax.models.unet import UNetOutput

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SIZE = 8


def _diffusers_unet(**kwargs):
  """A tiny UNet2DModel whose every parameter is random (norms and biases too)."""
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(
      sample_size=SIZE,
      layers_per_block=1,
      norm_num_groups=4,
      norm_eps=1e-5,
      flip_sin_to_cos=True,
      freq_shift=0,
      downsample_padding=1,
      **kwargs,
  ).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p)) if p.ndim == 1 else p.mul_(1.0 + torch.rand_like(p))
  return model


TINY_LDM4_DIFFUSERS = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
)
"""`_diffusers_unet` arguments of LDM-4's layout; the model equals `ldm_unet.TINY_LDM4`."""


@pytest.fixture(scope="module")
def ldm4():
  return _diffusers_unet(**TINY_LDM4_DIFFUSERS)


@pytest.fixture(scope="module")
def ldm8():
  """LDM-8's layout with one head per attention block (`attention_head_dim` None)."""
  return _diffusers_unet(
      in_channels=4,
      out_channels=4,
      block_out_channels=(16, 32, 32),
      down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
      up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
      attention_head_dim=None,
      resnet_time_scale_shift="scale_shift",
      downsample_type="resnet",
      upsample_type="resnet",
      attn_norm_num_groups=4,
  )


# diffusers name -> CompVis (guided-diffusion) name, applied in order. R = res blocks per level,
# L = levels, A = the levels with attention; input_blocks.0 is conv_in, each encoder level has R
# blocks and a downsample, each decoder level R + 1 blocks, the last of which holds the upsample
# after its attention (index 2) or its res block (index 1).
_COMPVIS_RENAMES = (
    (r"^conv_in\.", lambda m, R, L, A: "input_blocks.0.0."),
    (r"^time_embedding\.linear_(\d)\.", lambda m, R, L, A: f"time_embed.{2 * int(m[1]) - 2}."),
    (
        r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
        lambda m, R, L, A: f"input_blocks.{1 + int(m[1]) * (R + 1) + int(m[3])}."
        f"{0 if m[2] == 'resnets' else 1}.",
    ),
    (
        r"^down_blocks\.(\d+)\.downsamplers\.0\.(conv\.)?",
        lambda m, R, L, A: f"input_blocks.{1 + int(m[1]) * (R + 1) + R}.0."
        + ("op." if m[2] else ""),
    ),
    (r"^mid_block\.resnets\.(\d)\.", lambda m, R, L, A: f"middle_block.{2 * int(m[1])}."),
    (r"^mid_block\.attentions\.0\.", lambda m, R, L, A: "middle_block.1."),
    (
        r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
        lambda m, R, L, A: f"output_blocks.{int(m[1]) * (R + 1) + int(m[3])}."
        f"{0 if m[2] == 'resnets' else 1}.",
    ),
    (
        r"^up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m, R, L, A: f"output_blocks.{int(m[1]) * (R + 1) + R}."
        f"{2 if L - 1 - int(m[1]) in A else 1}.",
    ),
    (r"^conv_norm_out\.", lambda m, R, L, A: "out.0."),
    (r"^conv_out\.", lambda m, R, L, A: "out.2."),
    (r"\.norm1\.", lambda m, R, L, A: ".in_layers.0."),
    (r"\.conv1\.", lambda m, R, L, A: ".in_layers.2."),
    (r"\.time_emb_proj\.", lambda m, R, L, A: ".emb_layers.1."),
    (r"\.norm2\.", lambda m, R, L, A: ".out_layers.0."),
    (r"\.conv2\.", lambda m, R, L, A: ".out_layers.3."),
    (r"\.conv_shortcut\.", lambda m, R, L, A: ".skip_connection."),
    (r"\.group_norm\.", lambda m, R, L, A: ".norm."),
    (r"\.to_out\.0\.", lambda m, R, L, A: ".proj_out."),
)


def _fuse_qkv(q, k, v, heads):
  """guided-diffusion's legacy qkv: per head its q, k, v rows; Conv1d weights get a last axis."""
  rows = lambda a: a.reshape((heads, -1) + a.shape[1:])
  fused = np.stack([rows(q), rows(k), rows(v)], axis=1).reshape((-1,) + q.shape[1:])
  return fused[..., None] if fused.ndim == 2 else fused


def _to_compvis(state_dict, config):
  """The CompVis UNetModel state dict of a diffusers one (for `config`'s architecture)."""
  levels = len(config.channel_mult)
  attention = {i for i in range(levels) if config.has_attention(i)}
  renamed = {}
  for name, value in state_dict.items():
    for pattern, repl in _COMPVIS_RENAMES:
      name = re.sub(pattern, lambda m: repl(m, config.num_res_blocks, levels, attention), name)
    if name.endswith("proj_out.weight"):
      value = value[..., None]
    renamed[name] = value
  out = {}
  for name, value in renamed.items():
    if m := re.fullmatch(r"(.*)\.to_q\.(weight|bias)", name):
      base, leaf = m[1], m[2]
      parts = [renamed[f"{base}.to_{p}.{leaf}"] for p in "qkv"]
      out[f"{base}.qkv.{leaf}"] = _fuse_qkv(*parts, config.heads_of(parts[0].shape[0]))
    elif not re.search(r"\.to_[kv]\.", name):
      out[name] = value
  return out


def _inputs(config, seed=0, n=2):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, SIZE, SIZE, config.in_channels)).astype(np.float32)
  return x, np.array([3, 917][:n], np.int32)


@pytest.mark.parametrize(
    "layout, expected",
    [("ldm4", ldm_unet.TINY_LDM4), ("ldm8", dataclasses.replace(ldm_unet.TINY_LDM8, num_heads=1))],
)
def test_parity_with_diffusers_both_layouts(request, tmp_path, layout, expected):
  reference = request.getfixturevalue(layout)
  reference.save_pretrained(tmp_path / "unet", safe_serialization=layout == "ldm4")
  config, params = clu.load_ldm_unet(tmp_path)  # a pipeline folder: finds unet/
  assert config == expected

  compvis = _to_compvis(_numpy_state(reference), config)
  ckpt = {f"model.diffusion_model.{k}": torch.from_numpy(-v) for k, v in compvis.items()}
  ckpt.update({clu._ema_key(k): torch.from_numpy(v) for k, v in compvis.items()})
  ckpt["model_ema.num_updates"] = torch.tensor(7)
  ckpt["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)  # another model
  torch.save({"state_dict": ckpt, "global_step": 3}, tmp_path / "ldm.ckpt")
  _, ema = clu.load_ldm_unet(tmp_path / "ldm.ckpt", config)
  _assert_same_params(params, ema)
  _, raw = clu.load_ldm_unet(tmp_path / "ldm.ckpt", config, use_ema=False)
  _assert_same_params(jax.tree_util.tree_map(np.negative, params), raw)

  x, t = _inputs(config)
  with torch.no_grad():
    ref = reference(_nchw(x), torch.from_numpy(t).long()).sample.numpy().transpose(0, 2, 3, 1)
  out = jax.jit(ldm_unet.LDMUNet(config).apply)({"params": params}, x, t)
  _assert_close(f"{layout} eps", out.eps, ref)


def _shapes(model, config, batch=2):
  x = jax.ShapeDtypeStruct((batch, SIZE, SIZE, config.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t)


def test_binary_methods_run_and_contain_the_fp_tree():
  """xnor and bidm run; their trees hold the FP tree (the FP model applies to them); TBS's
  cache changes eps and only the last `tbs_connections` features."""
  config = ldm_unet.TINY_LDM4
  fp_model = ldm_unet.LDMUNet(config)
  fp_paths = {
      path_str(p): v.shape
      for p, v in jax.tree_util.tree_flatten_with_path(_shapes(fp_model, config))[0]
  }
  x, t = _inputs(config, seed=1)
  for name in ("xnor", "bidm"):
    model = ldm_unet.LDMUNet(config, method=get_method(name), tbs_connections=3)
    variables = fill_params(_shapes(model, config), seed=2)
    paths = {path_str(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    assert all(paths.get(k) == s for k, s in fp_paths.items()), name
    assert ("params/tbs_table" in paths) == (name == "bidm")
    apply = jax.jit(lambda v, x, t, c, model=model: model.apply(v, x, t, cache=c))
    shapes = jax.eval_shape(model.apply, variables, x, t)
    out = apply(variables, x, t, tbs.empty_cache(shapes.connections))
    assert isinstance(out, UNetOutput) and out.eps.shape == x.shape
    assert np.all(np.isfinite(out.eps)), name
    # 2 encoder blocks and a downsample, the middle, 2 x 2 decoder blocks
    assert len(out.features) == 3 + 1 + 4
    assert len(out.connections) == model.num_connections == (3 if name == "bidm" else 0)
  fp_out = jax.jit(fp_model.apply)(variables, x, t)  # the FP teacher on the student's tree
  assert not np.allclose(fp_out.eps, out.eps, atol=1e-3)
  cache = tbs.TBSCache(tuple(2.0 + c for c in out.connections), jnp.ones((), bool))
  blended = apply(variables, x, t, cache)
  assert not np.allclose(blended.eps, out.eps, atol=1e-4)
  for a, b in zip(blended.features[:-3], out.features[:-3]):
    np.testing.assert_array_equal(a, b)


def test_module_refuses_settings_it_does_not_have():
  """The LDM U-Net's tbs_structure is 'blocks' only and its distill_points one of
  DISTILL_POINTS: anything else is one ValueError when it is applied."""
  config = ldm_unet.TINY_LDM4
  x, t = _inputs(config, seed=1)
  for fields, message in (
      (dict(tbs_structure="release"), "tbs_structure is 'blocks' only, got 'release'"),
      (dict(distill_points="hooks"), "distill_points must be one of"),
  ):
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(ldm_unet.LDMUNet(config, **fields).init, jax.random.PRNGKey(0), x, t)


def test_fp_layers_stay_fp():
  """Paper section 3.1: conv_in, conv_out, the time MLP, the skip convs FP; the rest binary."""
  config = ldm_unet.TINY_LDM4
  model = ldm_unet.LDMUNet(config, method=get_method("bidm"), tbs_connections=2)
  modules = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(_shapes(model, config)["params"])[0]:
    *mod, leaf = path_str(path).split("/")
    modules.setdefault("/".join(mod), set()).add(leaf)
  fp = {
      m
      for m in modules
      if m.split("/")[-1] in ("conv_in", "conv_out", "temb_dense0", "temb_dense1", "nin_shortcut")
  }
  assert all(modules[m] == {"kernel", "bias"} for m in fp)
  assert len(fp) == 4 + 5  # the skips of down_1_block_0 and of the 4 decoder blocks
  binary = [
      m
      for m in modules
      if m.split("/")[-1] in ("q", "k", "v", "proj_out", "conv1", "conv2", "temb_proj")
      or m.endswith("sample")
  ]
  assert len(binary) == 4 * 4 + 8 * 3 + 2  # 4 attention, 8 res blocks, 2 resamples
  assert all("threshold" in modules[m] for m in binary)


def test_presets_match_the_paper():
  """LDM-4's FP parameters are Table 4's 1045.4 MB at 32 bits (274.1M parameters)."""
  count = lambda c: sum(int(np.prod(s)) for s in clu.target_shapes(c).values())
  assert count(ldm_unet.LDM4) == 274_056_163
  assert round(count(ldm_unet.LDM4) * 4 / 2**20, 1) == 1045.4
  assert count(ldm_unet.LDM8) == 294_966_916
  ldm4 = {
      "_class_name": "UNet2DModel",
      "block_out_channels": [224, 448, 672, 896],
      "down_block_types": ["DownBlock2D"] + 3 * ["AttnDownBlock2D"],
      "up_block_types": 3 * ["AttnUpBlock2D"] + ["UpBlock2D"],
      "attention_head_dim": 32,
      "layers_per_block": 2,
      "flip_sin_to_cos": True,
      "freq_shift": 0,
      "norm_eps": 1e-5,
      "downsample_padding": 1,
      "in_channels": 3,
      "out_channels": 3,
      "sample_size": 64,
  }
  assert clu.config_from_diffusers(ldm4) == ldm_unet.LDM4


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda sd: sd.pop("conv_out.bias"),
            "missing targets (1): conv_out/bias (3,) <- conv_out.bias",
        ),
        (
            lambda sd: sd.update({"extra.weight": np.ones(2, np.float32)}),
            "unused source tensors (1): extra.weight (2,)",
        ),
        (
            lambda sd: sd.update({"conv_in.weight": np.ones((16, 3, 1, 1), np.float32)}),
            "shape mismatches (1): conv_in/kernel expects (3, 3, 3, 16) <- conv_in.weight",
        ),
    ],
)
def test_conversion_errors_are_one_line(ldm4, change, message):
  state_dict = _numpy_state(ldm4)
  change(state_dict)
  with pytest.raises(ValueError) as info:
    clu.convert_state_dict(state_dict, ldm_unet.TINY_LDM4)
  assert message in str(info.value) and "\n" not in str(info.value)


def test_converted_checkpoint_fills_binary_skip_convs(ldm4):
  """A converted FP LDM checkpoint initialises a student of the paper's Table 4 layout: the
  skip convs, now binary, get its weights; no real 1x1 shortcut is left unfilled."""
  config = ldm_unet.TINY_LDM4
  fp = clu.convert_state_dict(_numpy_state(ldm4), config)
  method = get_method("bidm", width_shortcut="none", binary_skip_conv=True)
  student = ldm_unet.LDMUNet(config, method=method, tbs_connections=2)
  check_teacher_fills_table4_student(student, (1, SIZE, SIZE, config.in_channels), fp)


def test_config_errors(ldm8, tmp_path):
  config = dict(ldm8.config)
  with pytest.raises(ValueError, match="attn_norm_num_groups: None, expected 4"):
    clu.config_from_diffusers({**config, "attn_norm_num_groups": None})
  with pytest.raises(ValueError, match="freq_shift: 1"):
    clu.config_from_diffusers({**config, "freq_shift": 1})
  torch.save(ldm8.state_dict(), tmp_path / "unet.pth")
  with pytest.raises(ValueError, match="does not hold the architecture"):
    clu.load_ldm_unet(tmp_path / "unet.pth")
  with pytest.raises(ValueError, match="set num_heads or num_head_channels"):
    ldm_unet.LDMUNetConfig(num_head_channels=-1)
