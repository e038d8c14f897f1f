"""Round trips of bidm_jax.io.torch_files against files written by torch and by hand."""

import json
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from bidm_jax.io.torch_files import load_torch_state_dict


def _write_safetensors(path, tensors, metadata=None):
  """Minimal safetensors writer: u64 header length, JSON header, raw little-endian data."""
  names = {
      np.dtype(np.float32): "F32",
      np.dtype(np.float16): "F16",
      np.dtype(np.float64): "F64",
      np.dtype(ml_dtypes.bfloat16): "BF16",
      np.dtype(np.int64): "I64",
      np.dtype(np.int32): "I32",
      np.dtype(np.uint8): "U8",
      np.dtype(np.bool_): "BOOL",
  }
  header, chunks, offset = {}, [], 0
  if metadata:
    header["__metadata__"] = metadata
  for name, arr in tensors.items():
    raw = np.ascontiguousarray(arr).tobytes()
    header[name] = {
        "dtype": names[arr.dtype],
        "shape": list(arr.shape),
        "data_offsets": [offset, offset + len(raw)],
    }
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def _sample_arrays():
  rng = np.random.default_rng(0)
  return {
      "f32": rng.standard_normal((3, 4)).astype(np.float32),
      "f16": rng.standard_normal((5,)).astype(np.float16),
      "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
      "f64": rng.standard_normal((2, 2)),
      "i64": np.arange(7, dtype=np.int64) - 3,
      "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
      "u8": np.arange(250, 256, dtype=np.uint8),
      "bool": np.array([True, False, True]),
  }


def _torch_tensors(torch):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = {}
  for name, a in _sample_arrays().items():
    if a.dtype == ml_dtypes.bfloat16:
      tensors[name] = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    else:
      tensors[name] = torch.from_numpy(a.copy())
  tensors.update(
      {
          "transposed": base.t(),
          "sliced": base[1:3, 2:5],
          "strided": base[:, ::2],
          "scalar": torch.tensor(2.5),
          "empty": torch.zeros(0, 3),
          "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
          "int16": torch.tensor([-3, 4], dtype=torch.int16),
      }
  )
  return tensors


def _to_numpy(t):
  import torch

  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.numpy()


def _assert_same(got, expected):
  assert got.shape == expected.shape
  assert got.dtype == expected.dtype
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_round_trip(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  tensors = _torch_tensors(torch)
  checkpoint = {
      "state_dict": {**tensors, "param": torch.nn.Parameter(torch.ones(2, 2))},
      "epoch": 3,
      "hparams": {"lr": 1e-3, "name": "x"},
      "optimizer": {"state": {0: {"exp_avg": torch.full((2,), 0.5)}}, "param_groups": []},
  }
  path = tmp_path / "ckpt.pt"
  torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
  got = load_torch_state_dict(path)
  expected = {f"state_dict.{k}": _to_numpy(v) for k, v in tensors.items()}
  expected["state_dict.param"] = np.ones((2, 2), np.float32)
  expected["optimizer.state.0.exp_avg"] = np.full((2,), 0.5, np.float32)
  assert list(got) == list(expected)
  for k in expected:
    _assert_same(got[k], expected[k])


def _tiny_module(torch):
  nn = torch.nn

  class Tiny(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv = nn.Conv2d(3, 4, 3, bias=False)
      self.bn = nn.BatchNorm2d(4)
      self.head = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
      self.register_buffer("scale", torch.tensor([0.5, 2.0]))

    def forward(self, x):
      y = self.bn(self.conv(x)).mean(dim=(2, 3), keepdim=True)
      return self.head(y) * self.scale

  torch.manual_seed(0)
  model = Tiny().eval()
  with torch.no_grad():
    model.bn.running_mean.uniform_()
    model.bn.running_var.uniform_(0.5, 2.0)
  return model


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_torchscript_round_trip(tmp_path, mode):
  torch = pytest.importorskip("torch")
  model = _tiny_module(torch)
  if mode == "script":
    scripted = torch.jit.script(model)
  else:
    scripted = torch.jit.trace(model, torch.zeros(1, 3, 5, 5))
  path = tmp_path / f"{mode}.pt"
  scripted.save(str(path))
  got = load_torch_state_dict(path)
  expected = {k: v.numpy() for k, v in model.state_dict().items()}
  assert set(got) == set(expected)
  for k in expected:
    _assert_same(got[k], expected[k])


def test_whole_module_pickle(tmp_path):
  torch = pytest.importorskip("torch")
  model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
  path = tmp_path / "module.pt"
  torch.save(model, path)
  got = load_torch_state_dict(path)
  expected = {k: v.numpy() for k, v in model.state_dict().items()}
  assert set(got) == set(expected)
  for k in expected:
    _assert_same(got[k], expected[k])


def test_safetensors_round_trip(tmp_path):
  arrays = _sample_arrays()
  path = tmp_path / "w.safetensors"
  _write_safetensors(path, arrays, metadata={"format": "pt"})
  got = load_torch_state_dict(path)
  assert list(got) == list(arrays)
  for k in arrays:
    _assert_same(got[k], arrays[k])


def test_safetensors_matches_torch_bits(tmp_path):
  torch = pytest.importorskip("torch")
  t = torch.randn(4, 5).to(torch.bfloat16)
  path = tmp_path / "w.safetensors"
  _write_safetensors(path, {"w": _to_numpy(t)})
  np.testing.assert_array_equal(
      load_torch_state_dict(path)["w"].astype(np.float32), t.float().numpy()
  )


def _truncate(path, fraction=0.5):
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * fraction)])


def test_truncated_safetensors(tmp_path):
  path = tmp_path / "w.safetensors"
  _write_safetensors(path, _sample_arrays())
  _truncate(path, 0.9)
  with pytest.raises(ValueError, match="w.safetensors"):
    load_torch_state_dict(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_torch_file(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  path = tmp_path / "ckpt.pt"
  torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=zip_format)
  _truncate(path)
  with pytest.raises(ValueError, match="ckpt.pt"):
    load_torch_state_dict(path)


def test_foreign_files(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("hello, this is not a checkpoint\n" * 20)
  plain_zip = tmp_path / "other.zip"
  with zipfile.ZipFile(plain_zip, "w") as zf:
    zf.writestr("readme.txt", "hi")
  npz = tmp_path / "arrays.npz"
  np.savez(npz, a=np.ones(3))
  plain_pickle = tmp_path / "obj.pkl"
  plain_pickle.write_bytes(b"\x80\x02}q\x00.")
  for path in (text, plain_zip, npz, plain_pickle):
    with pytest.raises(ValueError, match=path.name):
      load_torch_state_dict(path)
  with pytest.raises(FileNotFoundError):
    load_torch_state_dict(tmp_path / "missing.pt")
