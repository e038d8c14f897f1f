"""PyTorch DDPM checkpoints -> our Flax U-Net (bidm_jax.export.convert_ddpm).

The reference is an independent implementation, diffusers' UNet2DModel, configured as
google/ddpm-cifar10-32 (and a narrow copy of it to keep CPU time small) with random weights.
Its weights are saved in the diffusers layout (safetensors and .bin) and, renamed here by hand,
in the ddim / pytorch_diffusion layout; each conversion must give the noise prediction of the
torch model.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import check_teacher_fills_table4_student

from bidm_jax import builders
from bidm_jax.binarize.methods import get_method
from bidm_jax.export import convert_ddpm
from bidm_jax.training import checkpoint as ckpt_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

REL_TOL = 1e-4

# google/ddpm-cifar10-32's config.json as published (diffusers 0.0.4).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CIFAR10_KWARGS = dict(
    ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16], dropout=0.1, out_ch=3
)

# The same architecture, narrow: 3 levels of 32/64/64 channels at 16x16, attention at 8x8.
SMALL_CONFIG = dict(
    CIFAR10_CONFIG,
    block_out_channels=[32, 64, 64],
    sample_size=16,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)
SMALL_KWARGS = dict(
    ch=32, ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[8], dropout=0.0, out_ch=3
)
SMALL_SIZE = 16


def _diffusers_unet(config, seed):
  kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**kwargs).eval()
  with torch.no_grad():  # GroupNorm scales/offsets and biases away from 1 / 0: all count
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  return model


def _inputs(size, batch, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
  t = np.concatenate([[0, 999], rng.integers(0, 1000, max(batch - 2, 0))])[:batch]
  return x, t.astype(np.int64)


def _torch_eps(model, x, t):
  with torch.no_grad():
    return model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()


_APPLY = {}


def _our_eps(params, kwargs, x, t):
  key = json.dumps(kwargs, sort_keys=True)
  if key not in _APPLY:
    model = builders.unet_from_description(kwargs)
    _APPLY[key] = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t).eps)
  eps = _APPLY[key](params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32))
  return np.asarray(eps).transpose(0, 3, 1, 2)


def _rel_err(ours, ref):
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _assert_same_tree(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _ddim_key(key, levels):
  """diffusers UNet2DModel name -> ddim / pytorch_diffusion Model name (written independently
  of the converter, from the two repositories' module trees)."""
  fixed = {
      "time_embedding.linear_1": "temb.dense.0",
      "time_embedding.linear_2": "temb.dense.1",
      "conv_norm_out": "norm_out",
  }
  for a, b in fixed.items():
    if key.startswith(a + "."):
      return b + key[len(a) :]
  fields = {
      "time_emb_proj": "temb_proj",
      "conv_shortcut": "nin_shortcut",
      "group_norm": "norm",
      "to_q": "q",
      "to_k": "k",
      "to_v": "v",
      "to_out.0": "proj_out",
  }

  def field(rest):
    for a, b in fields.items():
      if rest.startswith(a + "."):
        return b + rest[len(a) :]
    return rest

  m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
  if m:
    side, i, kind, j, rest = m.groups()
    level = int(i) if side == "down" else levels - 1 - int(i)
    return f"{side}.{level}.{'block' if kind == 'resnets' else 'attn'}.{j}.{field(rest)}"
  m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(.+)", key)
  if m:
    side, i, _, rest = m.groups()
    level = int(i) if side == "down" else levels - 1 - int(i)
    return f"{side}.{level}.{side}sample.conv.{rest}"
  m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
  if m:
    kind, n, rest = m.groups()
    return f"mid.{'block' if kind == 'resnets' else 'attn'}_{int(n) + 1}.{field(rest)}"
  return key


def _to_ddim(state_dict, levels):
  out = {}
  for k, v in state_dict.items():
    name = _ddim_key(k, levels)
    if re.search(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", name):
      v = v.reshape(*v.shape, 1, 1)  # ddim's attention projections are 1x1 convs
    out[name] = v
  return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """The narrow diffusers model, its outputs, and its weights saved in both diffusers forms."""
  model = _diffusers_unet(SMALL_CONFIG, seed=0)
  root = tmp_path_factory.mktemp("small")
  model.save_pretrained(root / "safetensors", safe_serialization=True)
  model.save_pretrained(root / "bin", safe_serialization=False)
  x, t = _inputs(SMALL_SIZE, 4, seed=1)
  state = {k: v.detach().clone() for k, v in model.state_dict().items()}
  return dict(
      model=model,
      root=root,
      x=x,
      t=t,
      ref=_torch_eps(model, x, t),
      state=state,
      numpy={k: v.numpy() for k, v in state.items()},
  )


def _listing(path):
  return sorted(os.listdir(path))


def test_diffusers_folders_convert_to_the_same_noise_prediction(small, tmp_path):
  safe_dir, bin_dir = small["root"] / "safetensors", small["root"] / "bin"
  assert (safe_dir / "diffusion_pytorch_model.safetensors").exists()
  assert (bin_dir / "diffusion_pytorch_model.bin").exists()
  # A folder (config.json checked), and the .bin file given by itself.
  convert_ddpm.convert_checkpoint(safe_dir, tmp_path / "a", SMALL_KWARGS, image_size=SMALL_SIZE)
  convert_ddpm.convert_checkpoint(
      bin_dir / "diffusion_pytorch_model.bin",
      tmp_path / "b",
      SMALL_KWARGS,
      image_size=SMALL_SIZE,
      layout="diffusers",
  )
  pa, meta = ckpt_lib.load_params(tmp_path / "a", SMALL_KWARGS)
  pb, _ = ckpt_lib.load_params(tmp_path / "b", SMALL_KWARGS)
  assert meta["model"] == SMALL_KWARGS
  assert set(meta["model"]) == set(builders.ARCHITECTURE)
  _assert_same_tree(pa, pb)
  err = _rel_err(_our_eps(pa, SMALL_KWARGS, small["x"], small["t"]), small["ref"])
  print(f"small diffusers model: max relative error {err:.2e}")
  assert err < REL_TOL


def test_old_diffusers_attention_names(small):
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for k, v in small["numpy"].items():
    for a, b in renames.items():
      k = k.replace(f".{a}.", f".{b}.")
    old[k] = v
  assert any(".proj_attn." in k for k in old)
  new = convert_ddpm.convert_state_dict(small["numpy"], None, SMALL_KWARGS, image_size=SMALL_SIZE)
  _assert_same_tree(
      convert_ddpm.convert_state_dict(old, None, SMALL_KWARGS, image_size=SMALL_SIZE), new
  )


def test_converted_checkpoint_fills_binary_skip_convs(small):
  """A converted FP checkpoint initialises a student of the paper's Table 4 layout: the skip
  convs, now binary, get the checkpoint's weights; no real 1x1 shortcut is left unfilled."""
  fp = convert_ddpm.convert_state_dict(small["numpy"], None, SMALL_KWARGS, image_size=SMALL_SIZE)
  method = get_method("bidm", width_shortcut="none", binary_skip_conv=True)
  student = builders.unet_from_description(SMALL_KWARGS, method=method, tbs_connections=2)
  check_teacher_fills_table4_student(student, (1, SMALL_SIZE, SMALL_SIZE, 3), fp)


def test_ddim_layout_training_checkpoint_takes_the_ema_weights(small, tmp_path):
  levels = len(SMALL_KWARGS["ch_mult"])
  ema = _to_ddim(small["state"], levels)
  assert "temb.dense.0.weight" in ema and "up.2.upsample.conv.weight" in ema
  assert ema["down.1.attn.0.q.weight"].ndim == 4
  raw = {f"module.{k}": v + 0.5 for k, v in ema.items()}  # DataParallel names, other values
  optimizer = {
      "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(32, 3, 3, 3)}},
      "param_groups": [{"lr": 2e-4, "params": [0]}],
  }
  path = tmp_path / "ckpt.pth"
  torch.save([raw, optimizer, 12, 3400, ema], path)  # the ddim repo's [model, opt, e, s, ema]

  convert_ddpm.convert_checkpoint(path, tmp_path / "ema", SMALL_KWARGS, image_size=SMALL_SIZE)
  params, _ = ckpt_lib.load_params(tmp_path / "ema", SMALL_KWARGS)
  err = _rel_err(_our_eps(params, SMALL_KWARGS, small["x"], small["t"]), small["ref"])
  print(f"small model, ddim layout: max relative error {err:.2e}")
  assert err < REL_TOL
  _assert_same_tree(
      params,
      convert_ddpm.convert_state_dict(
          small["numpy"], "diffusers", SMALL_KWARGS, image_size=SMALL_SIZE
      ),
  )

  # use_ema=False takes the model entry; a bare DataParallel state dict works too.
  plain = convert_ddpm.convert_state_dict(
      {k: v.numpy() for k, v in raw.items()}, "ddim", SMALL_KWARGS, image_size=SMALL_SIZE
  )
  convert_ddpm.convert_checkpoint(
      path, tmp_path / "raw", SMALL_KWARGS, image_size=SMALL_SIZE, use_ema=False
  )
  _assert_same_tree(ckpt_lib.load_params(tmp_path / "raw", SMALL_KWARGS)[0], plain)
  np.testing.assert_allclose(plain["conv_in"]["bias"], params["conv_in"]["bias"] + 0.5, rtol=1e-6)

  # pytorch_diffusion's model-790000.ckpt: a bare state dict, torch < 1.6 (legacy) format.
  legacy = tmp_path / "model-790000.ckpt"
  torch.save(ema, legacy, _use_new_zipfile_serialization=False)
  convert_ddpm.convert_checkpoint(legacy, tmp_path / "legacy", SMALL_KWARGS, image_size=SMALL_SIZE)
  _assert_same_tree(ckpt_lib.load_params(tmp_path / "legacy", SMALL_KWARGS)[0], params)


def test_full_size_google_ddpm_cifar10_32(tmp_path):
  model = _diffusers_unet(CIFAR10_CONFIG, seed=2)
  convert_ddpm.check_diffusers_config(CIFAR10_CONFIG, CIFAR10_KWARGS)
  convert_ddpm.check_diffusers_config(dict(model.config), CIFAR10_KWARGS)  # all of its fields
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params = convert_ddpm.convert_state_dict(state, None, CIFAR10_KWARGS)
  n = sum(v.size for v in jax.tree_util.tree_leaves(params))
  assert n == sum(v.size for v in state.values()) == 35_746_307
  x, t = _inputs(32, 2, seed=3)
  err = _rel_err(_our_eps(params, CIFAR10_KWARGS, x, t), _torch_eps(model, x, t))
  print(f"google/ddpm-cifar10-32 architecture: max relative error {err:.2e}")
  assert err < REL_TOL


def _assert_nothing_written(parent, before, out):
  assert not out.exists()
  assert _listing(parent) == before


def test_truncated_file_fails_and_writes_nothing(small, tmp_path):
  for name in (
      "safetensors/diffusion_pytorch_model.safetensors",
      "bin/diffusion_pytorch_model.bin",
  ):
    data = (small["root"] / name).read_bytes()
    bad = tmp_path / "src" / name
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(data[: len(data) // 2])
    before = _listing(tmp_path)
    with pytest.raises(ValueError, match="truncated|corrupt|does not fit|ends early"):
      convert_ddpm.convert_checkpoint(bad, tmp_path / "out", SMALL_KWARGS, image_size=SMALL_SIZE)
    _assert_nothing_written(tmp_path, before, tmp_path / "out")


def test_foreign_checkpoint_fails_and_writes_nothing(tmp_path):
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Linear(8, 10))
  torch.save(net.state_dict(), tmp_path / "classifier.pth")
  before = _listing(tmp_path)
  with pytest.raises(ValueError, match="no DDPM U-Net"):
    convert_ddpm.convert_checkpoint(tmp_path / "classifier.pth", tmp_path / "out")
  _assert_nothing_written(tmp_path, before, tmp_path / "out")
  (tmp_path / "notes.pth").write_text("not a checkpoint")
  with pytest.raises(ValueError, match="cannot read the checkpoint"):
    convert_ddpm.convert_checkpoint(tmp_path / "notes.pth", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_mismatches_are_all_listed_and_nothing_is_written(small, tmp_path):
  state = dict(small["numpy"])
  del state["down_blocks.1.attentions.0.to_k.bias"]
  state["mid_block.extra.weight"] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError) as info:
    convert_ddpm.convert_state_dict(state, None, SMALL_KWARGS, image_size=SMALL_SIZE)
  msg = str(info.value)
  assert "targets missing" in msg and "down_1_attn_0/k/bias" in msg
  assert "down_blocks.1.attentions.0.to_k.bias" in msg
  assert "unused source tensors (1)" in msg and "mid_block.extra.weight" in msg

  # Another width: every tensor of the checkpoint has the wrong shape, and it says so.
  wide = dict(SMALL_KWARGS, ch=64)
  with pytest.raises(ValueError, match=r"shape mismatches") as info:
    convert_ddpm.convert_state_dict(small["numpy"], None, wide, image_size=SMALL_SIZE)
  assert "conv_in/kernel expects (3, 3, 3, 64) <- conv_in.weight (32, 3, 3, 3)" in str(info.value)
  # No attention at 8x8 in the target: the checkpoint's attention tensors are left over.
  with pytest.raises(ValueError, match=r"unused source tensors \(50\)"):
    convert_ddpm.convert_state_dict(
        small["numpy"], None, dict(SMALL_KWARGS, attn_resolutions=[]), image_size=SMALL_SIZE
    )

  src = tmp_path / "unet.bin"  # alone: no config.json beside it to catch the width first
  src.write_bytes((small["root"] / "bin" / "diffusion_pytorch_model.bin").read_bytes())
  before = _listing(tmp_path)
  with pytest.raises(ValueError, match="shape mismatches"):
    convert_ddpm.convert_checkpoint(src, tmp_path / "out", wide, image_size=SMALL_SIZE)
  _assert_nothing_written(tmp_path, before, tmp_path / "out")
  with pytest.raises(ValueError, match="block_out_channels"):  # with it, the config says so
    convert_ddpm.convert_checkpoint(
        small["root"] / "bin", tmp_path / "out", wide, image_size=SMALL_SIZE
    )
  _assert_nothing_written(tmp_path, before, tmp_path / "out")


def test_config_json_of_another_architecture_is_refused(small, tmp_path):
  folder = tmp_path / "model"
  folder.mkdir()
  (folder / "diffusion_pytorch_model.safetensors").write_bytes(
      (small["root"] / "safetensors" / "diffusion_pytorch_model.safetensors").read_bytes()
  )
  config = json.loads((small["root"] / "safetensors" / "config.json").read_text())
  config.update(flip_sin_to_cos=True, attention_head_dim=8, downsample_padding=1)
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError) as info:
    convert_ddpm.convert_checkpoint(folder, tmp_path / "out", SMALL_KWARGS, image_size=SMALL_SIZE)
  for field in ("flip_sin_to_cos", "attention_head_dim", "downsample_padding"):
    assert field in str(info.value)
  assert not (tmp_path / "out").exists()


def test_output_folder_rules(small, tmp_path):
  src = small["root"] / "safetensors"
  out = tmp_path / "work"
  out.mkdir()
  (out / "log.txt").write_text("kept")
  convert_ddpm.convert_checkpoint(src, out, SMALL_KWARGS, image_size=SMALL_SIZE)
  assert _listing(out) == ["log.txt", "model.json", "params"]
  assert [p for p in os.listdir(tmp_path) if p != "work"] == []  # no temporary folder left
  with pytest.raises(ckpt_lib.CheckpointError, match="already holds"):
    convert_ddpm.convert_checkpoint(src, out, SMALL_KWARGS, image_size=SMALL_SIZE)
  with pytest.raises(ValueError, match="unknown field"):
    convert_ddpm.convert_checkpoint(src, tmp_path / "x", dict(SMALL_KWARGS, width=3))
  with pytest.raises(ValueError, match="layout"):
    convert_ddpm.convert_state_dict(small["numpy"], "keras", SMALL_KWARGS, image_size=SMALL_SIZE)


def test_ema_copy_is_preferred_over_the_raw_model(small):
  both = {}
  for k, v in small["numpy"].items():
    both[f"model.{k}"] = v + 1.0
    both[f"ema.{k}"] = v
  ref = convert_ddpm.convert_state_dict(small["numpy"], None, SMALL_KWARGS, image_size=SMALL_SIZE)
  _assert_same_tree(
      convert_ddpm.convert_state_dict(both, None, SMALL_KWARGS, image_size=SMALL_SIZE), ref
  )
  raw = convert_ddpm.convert_state_dict(
      both, None, SMALL_KWARGS, image_size=SMALL_SIZE, use_ema=False
  )
  np.testing.assert_allclose(raw["conv_out"]["bias"], ref["conv_out"]["bias"] + 1.0, rtol=1e-6)
