import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from torchspec.converter.safetensors_stream import TensorSpec, write_safetensors


def test_streamed_file_reads_back_with_the_safetensors_library(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64) - 2,
        "d": torch.tensor([True, False, True]),
        "e": torch.randn(2, 1).half(),
    }
    specs = [TensorSpec(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()]
    write_safetensors(tmp_path / "x.safetensors", specs, metadata={"format": "pt"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_a_tensor_that_does_not_match_its_header_is_refused(tmp_path):
    spec = TensorSpec("a", (2, 2), torch.float32, lambda: torch.zeros(3))
    with pytest.raises(ValueError, match="header says"):
        write_safetensors(tmp_path / "x.safetensors", [spec])
