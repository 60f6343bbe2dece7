"""target.backend=fleet without vLLM: fake states servers speaking the part of vLLM's OpenAI API the
fleet uses (GET /v1/models, POST /v1/completions answering with ``kv_transfer_params``, the states
written as the project's connector writes them).

* requests spread over the servers; a dead or failing server's requests go to the others;
* no server answering stops the rank with one line after ``target.engine_timeout_s``;
* states of other tokens, or of another shape, stop training with one line naming the server;
* a server of other layers is refused before step 1;
* the target's output is the batch's states, the last layer through the final norm.
The real servers are exercised in integration_tests/test_fleet.py.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from torchspec.trainer.config import ConfigError, load_config
from torchspec.trainer.engine.fleet import ServerFleet, serve_command, served_model_name
from torchspec.trainer.engine.launch import EngineError
from torchspec.trainer.targets.fleet import FleetTarget

from trainer_test_helpers import save_tiny_qwen3

HIDDEN = 64  # tiny_qwen3's hidden size
LAYERS = [1, 2, 3, 4]  # three aux layers, then the last layer (vLLM ids)


def fake_states(token_ids: list[int], layers: int, hidden: int) -> torch.Tensor:
    """Distinct, reproducible states per token, layer and channel."""
    ids = torch.tensor(token_ids, dtype=torch.float32)[:, None, None]
    layer = torch.arange(layers, dtype=torch.float32)[None, :, None]
    channel = torch.arange(hidden, dtype=torch.float32)[None, None, :]
    return torch.sin(ids * 0.37 + layer * 1.3 + channel * 0.11)


class FakeServer:
    """One states server on localhost; ``mode`` changes what it does to requests."""

    def __init__(self, states_dir: Path, layers=LAYERS, hidden: int = HIDDEN, mode: str = "ok"):
        self.states_dir, self.layers, self.hidden, self.mode = states_dir, layers, hidden, mode
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": served_model_name(server.layers)}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                if server.mode == "fail":
                    return self._send(500, {"error": "engine dead"})
                tokens = list(request["prompt"])
                states = fake_states(tokens, len(server.layers), server.hidden)
                if server.mode == "wrong-tokens":
                    tokens = [t + 1 for t in tokens]
                if server.mode == "wrong-shape":
                    states = states[:, :2].contiguous()
                path = server.states_dir / f"{server.port}-{server.requests}.safetensors"
                if server.mode != "dies-before-writing":
                    save_file({"hidden_states": states, "token_ids": torch.tensor(tokens)}, str(path))
                self._send(
                    200,
                    {
                        "choices": [{"prompt_token_ids": tokens}],
                        "kv_transfer_params": {"hidden_states_path": str(path)},
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def states_dir(tmp_path):
    path = tmp_path / "states"
    path.mkdir()
    return path


@pytest.fixture
def servers(states_dir):
    started = []

    def start(**kwargs):
        server = FakeServer(states_dir, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _dead_url() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there any more
    return f"http://127.0.0.1:{port}"


def test_requests_spread_over_the_servers(servers):
    first, second = servers(), servers()
    fleet = ServerFleet([first.url, second.url], LAYERS, timeout_s=30)
    replies = [fleet.submit([5, 6, 7 + i]) for i in range(24)]
    assert {reply.result().server for reply in replies} == {first.url, second.url}
    assert first.requests + second.requests == 24 and min(first.requests, second.requests) >= 4
    fleet.close()


def test_a_dead_or_failing_server_loses_no_request(servers):
    failing, healthy = servers(mode="fail"), servers()
    fleet = ServerFleet([_dead_url(), failing.url, healthy.url], LAYERS, timeout_s=30)
    replies = [fleet.submit([1, 2, 3 + i]).result() for i in range(6)]
    assert {reply.server for reply in replies} == {healthy.url}
    assert healthy.requests == 6
    fleet.close()


def test_no_server_answering_is_one_line_after_the_timeout(servers):
    failing = servers(mode="fail")
    fleet = ServerFleet([_dead_url(), failing.url], LAYERS, timeout_s=1.5)
    with pytest.raises(EngineError, match="no states server answered for 2 s .*HTTP 500.*restart the servers") as err:
        fleet.submit([1, 2, 3]).result()
    assert "\n" not in str(err.value) and failing.url in str(err.value)
    fleet.close()


def test_a_server_of_other_layers_is_refused_before_training(servers):
    other = servers(layers=[2, 3, 4, 4])
    fleet = ServerFleet([other.url], LAYERS)
    with pytest.raises(
        EngineError, match=rf"{other.url} serves the target layers \[2, 3, 4, 4\], not .*\[1, 2, 3, 4\]"
    ):
        fleet.check_servers()
    fleet.close()


def _target(tmp_path, urls):
    from transformers import AutoModelForCausalLM

    path = save_tiny_qwen3(tmp_path / "target", num_layers=4)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():  # a final norm of weight 1 would hide a norm applied without its weight
        model.model.norm.weight.copy_(1 + 0.5 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(path)
    return path, FleetTarget.connect(
        path, [1, 2, 3], torch.float32, "cpu", servers=urls, timeout_s=30, request_timeout_s=10
    )


def test_the_target_reads_each_sample_states_and_applies_the_final_norm(tmp_path, servers, states_dir):
    from transformers import AutoModelForCausalLM

    first, second = servers(), servers()
    path, target = _target(tmp_path, [first.url, second.url])
    input_ids = torch.tensor([[4, 9, 2, 7, 1], [3, 8, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    target.prefetch(input_ids, mask)
    out = target(input_ids, mask)
    norm = AutoModelForCausalLM.from_pretrained(str(path)).model.norm
    for row, length in enumerate([5, 3]):
        states = fake_states(input_ids[row, :length].tolist(), 4, HIDDEN)
        assert torch.equal(out.aux_hidden_states[row, :length], states[:, :3].flatten(1))
        expected = (
            norm.weight * states[:, 3] * torch.rsqrt(states[:, 3].pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        )
        torch.testing.assert_close(out.final_hidden[row, :length], expected, rtol=1e-6, atol=1e-6)
    assert not list(states_dir.iterdir()), "the states files are released after use"
    target.close()


def test_a_server_that_answers_but_never_writes_the_states_is_asked_again_elsewhere(tmp_path, servers):
    dying, healthy = servers(mode="dies-before-writing"), servers()
    _, target = _target(tmp_path, [dying.url, healthy.url])
    input_ids = torch.tensor([[4, 9, 2], [5, 1, 3]])
    out = target(input_ids, torch.ones_like(input_ids))
    for row in range(2):
        expected = fake_states(input_ids[row].tolist(), 4, HIDDEN)[:, :3].flatten(1)
        assert torch.equal(out.aux_hidden_states[row], expected)
    assert dying.requests >= 1 and healthy.requests >= 2
    target.close()


@pytest.mark.parametrize(
    ("mode", "words"), [("wrong-tokens", "states of other tokens"), ("wrong-shape", "expected shape")]
)
def test_states_that_do_not_match_their_request_stop_training(tmp_path, servers, mode, words):
    bad = servers(mode=mode)
    _, target = _target(tmp_path, [bad.url])
    with pytest.raises(EngineError, match=words) as err:
        target(torch.tensor([[4, 9, 2]]), torch.ones(1, 3, dtype=torch.long))
    assert bad.url in str(err.value) and "\n" not in str(err.value)
    target.close()


def test_a_fleet_without_servers_is_a_config_error(tmp_path):
    config = load_config(None, ["target.backend=fleet"])  # loads: the shipped recipes leave servers to the command line
    with pytest.raises(ConfigError, match="target.backend is fleet but target.servers is empty"):
        FleetTarget.connect(
            tmp_path, None, torch.float32, "cpu", servers=config.target.servers, timeout_s=1, request_timeout_s=1
        )


def test_the_serve_command_names_the_layers_the_states_folder_and_the_cpu_rope_fix(tmp_path):
    mla = tmp_path / "mla"
    mla.mkdir()
    (mla / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "kv_lora_rank": 64}))
    command = serve_command(mla, [1, 3, 4, 6], tmp_path / "states", port=8123, dtype="float32", on_cpu=True)
    text = " ".join(command)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert served_model_name([1, 3, 4, 6]) in command and "--port 8123" in text
    speculative = json.loads(command[command.index("--speculative-config") + 1])
    assert speculative["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4, 6]
    transfer = json.loads(command[command.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector_extra_config"]["shared_storage_path"] == str(tmp_path / "states")
    assert json.loads(command[command.index("--compilation-config") + 1]) == {"custom_ops": ["-rotary_embedding"]}
    assert "--enforce-eager" in command
    gpu = serve_command(mla, [1, 3, 4, 6], tmp_path / "states", engine_args={"tensor_parallel_size": 8})
    assert "--compilation-config" not in gpu and gpu[gpu.index("--tensor-parallel-size") + 1] == "8"


def test_the_mooncake_serve_command_publishes_to_the_store_and_needs_no_states_folder(tmp_path):
    store = {"master_server_address": "10.0.0.5:50051", "protocol": "rdma", "device_name": "mlx5_0"}
    command = serve_command(tmp_path, [1, 3, 4, 6], None, transport="mooncake", mooncake=store)
    transfer = json.loads(command[command.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == "HostMooncakeHiddenStatesConnector"
    assert transfer["kv_connector_module_path"] == "torchspec.trainer.engine.mooncake_connector"
    assert transfer["kv_connector_extra_config"] == {"mooncake": store}
    config = load_config(
        None,
        ["target.backend=fleet", "target.transport=mooncake", "target.mooncake={master_server_address: 'h:1'}"],
    )
    from torchspec.trainer.targets.fleet_servers import serve_command_for

    config.model.target_model_path = str(save_tiny_qwen3(tmp_path / "target"))
    assert "HostMooncakeHiddenStatesConnector" in " ".join(serve_command_for(config))  # no states_dir asked for


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["target.transport=mooncake"], "target.transport=mooncake applies to target.backend=fleet, not transformers"),
        (
            ["target.backend=fleet", "target.transport=mooncake", "target.mooncake={master: 'h:1'}"],
            r"target.mooncake has unknown keys \['master'\]; the store takes master_server_address",
        ),
    ],
)
def test_mooncake_transport_mistakes_are_one_line(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides)


def test_a_reply_whose_server_failed_or_died_since_is_known(tmp_path, servers):
    """What lets a rank stop waiting for states a dead server will never hand over (a Mooncake
    object, a file whose writer died) instead of waiting out target.request_timeout_s."""
    first, second = servers(), servers()
    fleet = ServerFleet([first.url, second.url], LAYERS, timeout_s=30, request_timeout_s=10)
    reply = fleet.submit([4, 9, 2]).result()
    assert not fleet.failed_since(reply)
    fleet.set_aside(reply.server, "answered without writing its states file")  # counts as a failure
    assert fleet.failed_since(reply)
    later = fleet.submit([4, 9, 2]).result()
    other = next(s for s in (first, second) if s.url == later.server)
    assert not fleet.failed_since(later)
    other.stop()  # gone without any request failing yet: it does not answer
    assert fleet.failed_since(later)
    fleet.close()
