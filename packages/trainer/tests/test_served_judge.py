"""`engine:verify --server/--plain-server`: running vLLM servers as the judge, without vLLM here.

A fake server speaks the part of vLLM's OpenAI API verify uses (GET /v1/models, /version, /metrics
in Prometheus' text format as vLLM writes it; POST /v1/completions with ``return_token_ids``) and
counts drafts per request as a drafting server would.

* the counters are the difference over exactly verify's requests, summed over a server's engines;
* a server that served other requests meanwhile is refused (its counters are not the draft's alone);
* a server drafting another number of tokens, or none, is refused naming both numbers;
* a server that does not answer is one line naming it;
* verify needs both servers, and prints the two commands that start them.
The real servers are exercised in integration_tests/test_engine.py.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from torchspec.draft_models.errors import UserInputError
from torchspec.trainer.commands import verify
from torchspec.trainer.engine.launch import EngineError
from torchspec.trainer.engine.served import run_served, spec_decode_counters

from trainer_test_helpers import FakeVllmServer

# What vLLM 0.32's PrometheusStatLogger writes for a server of two data-parallel engines, K=2.
METRICS_PAGE = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="target"} 10.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="target"} 5.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
vllm:spec_decode_num_drafts_created{engine="0",model_name="target"} 1.7650e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="target"} 20.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="target"} 10.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="target"} 7.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="target"} 3.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="0"} 5.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="1"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="target",position="0"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="target",position="1"} 1.0
vllm:generation_tokens_total{engine="0",model_name="target"} 64.0
vllm:generation_tokens_total{engine="1",model_name="target"} 36.0
vllm:prompt_tokens_total{engine="0",model_name="target"} 99.0
"""


def test_the_counters_are_summed_over_the_engines_and_read_per_position():
    counters = spec_decode_counters(METRICS_PAGE)
    assert counters == {
        "num_drafts": 15,
        "num_draft_tokens": 30,
        "num_accepted_tokens": 10,
        "accepted_per_position": [7, 3],
        "generation_tokens": 100,
    }
    plain = spec_decode_counters('vllm:generation_tokens_total{engine="0",model_name="t"} 12.0\n')
    assert plain == {"generation_tokens": 12, "accepted_per_position": []}


@pytest.fixture
def fake_servers():
    started = []

    def start(**kwargs):
        started.append(FakeVllmServer(**kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


PROMPTS = [[5, 6, 7], [9], [3, 4]]


def test_the_counts_are_those_of_verifys_requests_only(fake_servers):
    server = fake_servers(num_draft_tokens=2)
    run = run_served(server.url, PROMPTS, 6, num_draft_tokens=2)
    assert run.outputs == [[8, 9, 10, 11, 12, 13], [10, 11, 12, 13, 14, 15], [5, 6, 7, 8, 9, 10]]
    # The server had counted 4 drafts and 1 accepted token before verify came.
    assert (run.num_drafts, run.num_draft_tokens, run.num_accepted_tokens) == (9, 18, 6)
    assert run.accepted_per_position == [6, 0]
    assert run.acceptance_length == pytest.approx(1 + 6 / 9)
    assert run.engine_version == "0.32.0-fake"


def test_a_plain_server_has_no_draft_counts(fake_servers):
    run = run_served(fake_servers(num_draft_tokens=0).url, PROMPTS, 4, num_draft_tokens=0)
    assert run.num_drafts == 0 and run.accepted_per_position == [] and len(run.outputs[0]) == 4


def test_a_server_that_served_someone_else_meanwhile_is_refused(fake_servers):
    server = fake_servers(num_draft_tokens=2, stranger_tokens=1)
    with pytest.raises(EngineError, match=r"generated 21 tokens while verify asked for 18: it served other requests"):
        run_served(server.url, PROMPTS, 6, num_draft_tokens=2)


@pytest.mark.parametrize(
    ("serving", "asked", "words"),
    [
        (3, 2, "drafts 3 tokens per round, not 2: pass --num-draft-tokens 3"),
        (0, 4, "serves no draft, not 4"),
        (2, 0, r"serves a draft \(2 tokens per round\); --plain-server must serve the target alone"),
    ],
)
def test_a_server_drafting_another_length_is_refused(fake_servers, serving, asked, words):
    with pytest.raises(EngineError, match=words):
        run_served(fake_servers(num_draft_tokens=serving).url, PROMPTS, 4, num_draft_tokens=asked)


def test_a_server_that_does_not_answer_is_named():
    probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{probe.server_address[1]}"
    probe.server_close()
    with pytest.raises(EngineError, match=f"the vLLM server {url} does not answer"):
        run_served(url, PROMPTS, 4)


def test_verify_against_servers_compares_them(fake_servers, tmp_path):
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text("{}")
    with_draft, plain = fake_servers(num_draft_tokens=4), fake_servers(num_draft_tokens=0)
    report = verify.verify_draft(
        str(draft),
        str(draft),
        "unused",
        max_new_tokens=5,
        prompts=[[1, 2], [3]],
        evaluator=False,
        server=with_draft.url,
        plain_server=plain.url,
    )
    assert (report.engine_num_drafts, report.engine_num_accepted_tokens) == (2 * 3, 2 * 2)
    assert report.engine_accepted_per_position == [4, 0, 0, 0] and report.engine_version == "0.32.0-fake"
    assert report.engine_output_identical_with_and_without_draft and verify.verdict(report) == []


def test_the_servers_given_reach_verify(monkeypatch, tmp_path):
    seen = {}

    def fake_verify(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(verify, "verify_draft", fake_verify)
    argv = ["--draft", str(tmp_path), "--target", str(tmp_path), "--data", str(tmp_path)]
    with pytest.raises(SystemExit):
        verify.main([*argv, "--server", "http://a:8000", "--plain-server", "http://b:8001"])
    assert seen["server"] == "http://a:8000" and seen["plain_server"] == "http://b:8001"


def test_verify_needs_both_servers(tmp_path):
    with pytest.raises(UserInputError, match="needs both --server .* and --plain-server"):
        verify.verify_draft(
            str(tmp_path), str(tmp_path), "unused", prompts=[[1]], evaluator=False, server="http://127.0.0.1:1"
        )


def test_the_serve_commands_it_prints_serve_the_target_with_and_without_the_draft(tmp_path, capsys):
    draft, target = tmp_path / "draft", tmp_path / "target"
    draft.mkdir()
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "kv_lora_rank": 64}))
    code = verify.main(
        [
            "--draft",
            str(draft),
            "--target",
            str(target),
            "--num-draft-tokens",
            "3",
            "--print-serve-commands",
            "--engine-args",
            '{"tensor_parallel_size": 8}',
        ]
    )
    with_draft, plain = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert "--port 8000" in with_draft and "--port 8001" in plain and "--speculative-config" not in plain
    speculative = with_draft.split("--speculative-config ")[1].split("'")[1]
    assert json.loads(speculative) == {"method": "eagle3", "model": str(draft), "num_speculative_tokens": 3}
    assert "--tensor-parallel-size 8" in with_draft and "--tensor-parallel-size 8" in plain
