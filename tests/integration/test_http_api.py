"""The HTTP/JSON API against a real server: the same answers as gRPC over the same servicers, live status as
Server-Sent Events, downloads, problem JSON with the gRPC code's status and the field, the body cap, /metrics,
health and readiness, tokens and roles, TLS, and HTTP_PORT's start-up rules."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from rl_service.infra.auth_tokens import Role, new_token, token_line
from rl_service.transport.http.messages import message_to_json
from rl_service.transport.server_factory import build_server
from rl_service_proto.v1 import policy_pb2, policy_pb2_grpc
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle, make_settings, start_server
from tests.support.certs import make_test_pki

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start_server(tmp_path_factory.mktemp("http"), http_enabled=True, max_message_bytes=64 * 1024)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def http(server: ServerHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.running.http_port}", timeout=60) as client:
        yield client


def sse(client: httpx.Client, path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every event of a Server-Sent Events stream, read to its end."""
    events: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", path) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


@pytest.fixture(scope="module")
def trained(server: ServerHandle, http: httpx.Client) -> dict[str, Any]:
    """A CartPole PPO run started over HTTP, followed to its end over SSE."""
    reply = http.post("/v1/runs", json={"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 1024,
                                        "experiment_id": "http-api", "seed": 7, "hyperparameters": FAST_PPO})
    assert reply.status_code == 201, reply.text
    run_id = reply.json()["run_id"]
    assert reply.headers["location"] == f"/v1/runs/{run_id}"
    return {"run_id": run_id, "events": sse(http, f"/v1/runs/{run_id}/events")}


def assert_problem(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["code"] == code and body["detail"] and body["title"]
    assert body.get("field") == field
    return body


# ------------------------------------------------------------------------------------------ runs


def test_events_follow_the_run_as_watch_training_does_and_end_with_its_final_status(
        server: ServerHandle, http: httpx.Client, trained: dict[str, Any]) -> None:
    events = trained["events"]
    names = [name for name, _ in events]
    assert names[-1] == "end" and set(names[:-1]) == {"status"} and len(names) >= 3
    statuses = [data for name, data in events if name == "status"]
    done = [s["timesteps_done"] for s in statuses]
    assert done == sorted(done) and statuses[-1]["state"] == "SUCCEEDED" and statuses[-1]["is_done"]
    final = server.status(trained["run_id"])
    assert statuses[-1] == message_to_json(final)  # the gRPC status, field for field (int64 as numbers)
    assert http.get(f"/v1/runs/{trained['run_id']}").json() == message_to_json(final)


def test_list_filters_by_experiment_and_state(http: httpx.Client, trained: dict[str, Any]) -> None:
    mine = http.get("/v1/runs", params={"experiment_id": "http-api", "state": "SUCCEEDED"}).json()["runs"]
    assert [r["run_id"] for r in mine] == [trained["run_id"]]
    assert http.get("/v1/runs", params={"experiment_id": "http-api", "state": "FAILED"}).json() == {"runs": []}
    assert_problem(http.get("/v1/runs", params={"state": "BORED"}), 400, "INVALID_ARGUMENT", "state")


def test_history_pages_and_act_answer_as_grpc_does(server: ServerHandle, http: httpx.Client,
                                                   trained: dict[str, Any]) -> None:
    run_id = trained["run_id"]
    page = http.get(f"/v1/runs/{run_id}/history", params={"offset": 2, "limit": 3}).json()
    grpc_page = server.stub.GetRunHistory(pb.RunHistoryRequest(run_id=run_id, offset=2, limit=3), timeout=10)
    assert page == message_to_json(grpc_page) and len(page["episodes"]) == 3 and page["offset"] == 2
    observation = [0.01, -0.02, 0.03, 0.04]
    act = http.post(f"/v1/runs/{run_id}/act", json={"observation": observation, "deterministic": True}).json()
    grpc_act = server.stub.Act(pb.ActRequest(run_id=run_id, observation=observation, deterministic=True), timeout=10)
    assert act["action"] == list(grpc_act.action) and act["model_timesteps"] == 1024
    batch = http.post(f"/v1/runs/{run_id}/act-batch",
                      json={"observations": observation * 3, "deterministic": True}).json()
    assert batch["count"] == 3 and batch["actions"] == act["action"] * 3


def test_export_is_a_download_that_loads(http: httpx.Client, trained: dict[str, Any]) -> None:
    response = http.get(f"/v1/runs/{trained['run_id']}/export", params={"format": "torchscript"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == f'attachment; filename="{trained["run_id"]}.pt"'
    assert response.headers["x-model-timesteps"] == "1024"
    program = torch.jit.load(io.BytesIO(response.content))
    assert program(torch.zeros(1, 4, dtype=torch.float32)).shape[0] == 1
    assert_problem(http.get(f"/v1/runs/{trained['run_id']}/export", params={"format": "gif"}),
                   400, "INVALID_ARGUMENT", "format")


def test_stop_and_resume(server: ServerHandle, http: httpx.Client) -> None:
    run_id = http.post("/v1/runs", json={"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 10_000_000,
                                         "hyperparameters": FAST_PPO}).json()["run_id"]
    server.wait_until(run_id, lambda s: s.timesteps_done > 0)
    stopped = http.post(f"/v1/runs/{run_id}/stop")
    assert stopped.status_code == 200 and stopped.json()["stop_requested"]
    server.wait_until(run_id, lambda s: s.state == pb.CANCELLED, timeout=120)
    resumed = http.post(f"/v1/runs/{run_id}/resume", json={})
    assert resumed.status_code == 200 and resumed.json()["state"] in ("PENDING", "RUNNING")
    assert resumed.json()["attempt"] == 2
    # Resuming an active run is FAILED_PRECONDITION: 400 by the code's mapping, and the code in the body.
    assert_problem(http.post(f"/v1/runs/{run_id}/resume"), 400, "FAILED_PRECONDITION")
    http.post(f"/v1/runs/{run_id}/stop")
    server.wait_until(run_id, lambda s: s.is_done, timeout=120)
    assert http.delete(f"/v1/runs/{run_id}").json() == {"run_id": run_id}
    assert_problem(http.get(f"/v1/runs/{run_id}"), 404, "NOT_FOUND")


# ------------------------------------------------------------------------------------------ errors


def test_a_bad_hyperparameter_is_400_naming_the_field_grpc_names(server: ServerHandle, http: httpx.Client) -> None:
    body = {"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 1000, "hyperparameters": {"n_steps": "x"}}
    problem = assert_problem(http.post("/v1/runs", json=body), 400, "INVALID_ARGUMENT", "hyperparameters.n_steps")
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.StartTraining(pb.StartTrainingRequest(algorithm="PPO", env_id="CartPole-v1", total_timesteps=1000,
                                                          hyperparameters={"n_steps": "x"}), timeout=10)
    status = rpc_status.from_call(caught.value)
    assert status is not None and problem["detail"] == status.message == caught.value.details()
    assert "hyperparameters.n_steps" in str(status.details[0].value)


@pytest.mark.parametrize(("body", "field"), [
    ({"env_id": "CartPole-v1", "total_timesteps": 10}, "algorithm"),
    ({"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": "many"}, "total_timesteps"),
    ({"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 2**70}, "total_timesteps"),
    ({"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 10, "colour": "red"}, "colour"),
    ({"algorithm": "PPO", "env_id": "Nope-v0", "total_timesteps": 10}, "env_id"),
    ({"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 0}, "total_timesteps"),
])
def test_bodies_that_cannot_start_a_run_are_400_naming_their_field(http: httpx.Client, body: dict[str, Any],
                                                                   field: str) -> None:
    assert_problem(http.post("/v1/runs", json=body), 400, "INVALID_ARGUMENT", field)


def test_a_body_that_is_not_json_is_400_naming_the_body(http: httpx.Client) -> None:
    problem = assert_problem(http.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"}),
                             400, "INVALID_ARGUMENT", "body")
    assert problem["detail"].startswith("body: ")


def test_unknown_routes_methods_and_runs_are_problem_json(http: httpx.Client) -> None:
    assert_problem(http.get("/v1/nothing"), 404, "NOT_FOUND")
    assert_problem(http.put("/v1/runs"), 405, "UNKNOWN")
    assert_problem(http.get("/v1/runs/run-000000000000/events"), 404, "NOT_FOUND")
    assert_problem(http.post("/v1/runs/run-000000000000/stop"), 404, "NOT_FOUND")


def test_a_body_over_the_cap_is_413_before_it_is_parsed(http: httpx.Client) -> None:
    huge = {"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 10, "experiment_id": "x" * 70_000}
    assert_problem(http.post("/v1/runs", json=huge), 413, "RESOURCE_EXHAUSTED", "body")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"algorithm": "PPO", "experiment_id": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'
    assert_problem(http.post("/v1/runs", content=chunks(), headers={"content-type": "application/json"}),
                   413, "RESOURCE_EXHAUSTED", "body")


# ------------------------------------------------------------------------------------------ the rest


def test_algorithms_are_the_registry_with_types_defaults_and_ranges(server: ServerHandle,
                                                                    http: httpx.Client) -> None:
    body = http.get("/v1/algorithms").json()
    grpc_reply = server.stub.ListAlgorithms(pb.ListAlgorithmsRequest(), timeout=10)
    assert body == message_to_json(grpc_reply)
    ppo = next(a for a in body["algorithms"] if a["name"] == "PPO")
    n_steps = next(p for p in ppo["hyperparameters"] if p["name"] == "n_steps")
    assert n_steps | {"help": ""} == {"name": "n_steps", "kind": "int", "default_value": "2048", "low": 1.0,
                                      "high": 1_000_000.0, "low_exclusive": False, "schedule": False,
                                      "accepts_none": False, "choices": [], "words": [], "help": "",
                                      "accepted": "int in [1, 1e+06]"}
    activation = next(p for p in ppo["hyperparameters"] if p["name"] == "activation_fn")
    assert activation["choices"] == ["tanh", "relu"] and activation["low"] is None
    assert {a["name"] for a in body["algorithms"]} >= {"PPO", "A2C", "DQN", "SAC", "MaskablePPO", "REINFORCE"}


def test_policies_list_get_batch_and_model_download(server: ServerHandle, http: httpx.Client) -> None:
    stub = policy_pb2_grpc.PolicyServiceStub(server.channel)
    stub.CreatePolicy(policy_pb2.CreatePolicyRequest(
        policy_id="http-pol", spec=policy_pb2.PolicySpec(observation_shape=[4], discrete_n=2)), timeout=30)
    assert "http-pol" in [p["policy_id"] for p in http.get("/v1/policies").json()["policies"]]
    assert http.get("/v1/policies/http-pol").json()["version"] == 0
    rng = np.random.default_rng(0)
    batch = {"states": rng.normal(size=40).tolist(), "actions": [0, 1] * 5, "rewards": [1.0] * 10,
             "dones": [False] * 9 + [True]}
    result = http.post("/v1/policies/http-pol/batches", json=batch)
    assert result.status_code == 200 and result.json()["updated"] and result.json()["version"] == 1
    model = http.get("/v1/policies/http-pol/model")
    assert model.headers["content-disposition"] == 'attachment; filename="http-pol-v1.pt"'
    assert torch.jit.load(io.BytesIO(model.content)) is not None
    assert_problem(http.post("/v1/policies/http-pol/batches", json={**batch, "dones": [True]}),
                   400, "INVALID_ARGUMENT", "dones")
    assert_problem(http.get("/v1/policies/none-such"), 404, "NOT_FOUND")


def test_create_set_weights_log_prob_checkpoints_and_delete_over_http(server: ServerHandle,
                                                                      http: httpx.Client) -> None:
    spec = {"observation_shape": [4], "discrete_n": 2, "seed": 3, "hyperparameters": {"net_arch": "16"}}
    created = http.post("/v1/policies", json={"policy_id": "http-new", "spec": spec})
    assert created.status_code == 201 and created.headers["location"] == "/v1/policies/http-new", created.text
    info = created.json()
    assert info["created"] is True and info["version"] == 0 and info["spec"]["discrete_n"] == 2
    assert info["spec"]["hyperparameters"]["net_arch"] == "16" and info["spec"]["seed"] == 3
    again = http.post("/v1/policies", json={"policy_id": "http-new", "spec": spec})
    assert again.status_code == 200 and again.json()["created"] is False, "CreatePolicy is idempotent"
    assert_problem(http.post("/v1/policies", json={"policy_id": "http-new", "spec": {**spec, "discrete_n": 3}}),
                   409, "ALREADY_EXISTS")
    box = http.post("/v1/policies", json={"policy_id": "http-box", "spec": {
        "observation_shape": [3], "box": {"shape": [1], "low": [-2.0], "high": [2.0]}, "algorithm": "ppo"}})
    assert box.status_code == 201 and box.json()["spec"]["box"]["shape"] == [1], box.text
    assert_problem(http.post("/v1/policies", json={"policy_id": "http-both", "spec": {
        **spec, "box": {"shape": [1]}}}), 400, "INVALID_ARGUMENT", "spec.box")
    assert_problem(http.post("/v1/policies", json={"policy_id": "http-b64", "spec": spec,
                                                   "initial_weights": "not base64!"}),
                   400, "INVALID_ARGUMENT", "initial_weights")
    assert http.get("/v1/policies/http-b64").status_code == 404, "a refused create leaves no policy"

    # Weights downloaded from one policy and set on a twin: the twin then gives the same log-probabilities.
    assert http.post("/v1/policies", json={"policy_id": "http-twin", "spec": {**spec, "seed": 4}}).status_code == 201
    weights = http.get("/v1/policies/http-new/model", params={"format": "safetensors"}).content
    states, actions = [0.1, -0.2, 0.3, 0.0, 0.5, 0.1, -0.1, 0.2], [0.0, 1.0]
    before = http.post("/v1/policies/http-twin/log-prob", json={"states": states, "actions": actions}).json()
    twin_weights = base64.b64encode(http.get("/v1/policies/http-twin/model", params={"format": "safetensors"})
                                    .content).decode()
    original = http.post("/v1/policies/http-new/log-prob", json={"states": states, "actions": actions}).json()
    assert before["log_probs"] != original["log_probs"], "different seeds, different weights"
    body = {"safetensors": base64.b64encode(weights).decode(), "expected_version": 0}
    set_reply = http.put("/v1/policies/http-twin/weights", json=body)
    assert set_reply.status_code == 200 and set_reply.json()["version"] == 1, set_reply.text
    after = http.post("/v1/policies/http-twin/log-prob", json={"states": states, "actions": actions}).json()
    assert after["version"] == 1 and after["log_probs"] == pytest.approx(original["log_probs"], abs=1e-6)
    assert_problem(http.put("/v1/policies/http-twin/weights", json=body), 409, "ABORTED")  # now at version 1
    assert_problem(http.put("/v1/policies/http-twin/weights", json={"safetensors": base64.b64encode(
        b"not safetensors").decode()}), 400, "INVALID_ARGUMENT", "safetensors")
    assert_problem(http.post("/v1/policies/http-twin/log-prob", json={
        "states": states, "actions": actions, "version": 1, "checkpoint": "c1"}), 400, "INVALID_ARGUMENT",
        "checkpoint")

    saved = http.post("/v1/policies/http-twin/checkpoints", json={"name": "c1"})
    assert saved.status_code == 201 and saved.json()["name"] == "c1" and saved.json()["version"] == 1, saved.text
    assert [c["name"] for c in http.get("/v1/policies/http-twin/checkpoints").json()["checkpoints"]] == ["c1"]
    at_c1 = http.post("/v1/policies/http-twin/log-prob", json={"states": states, "actions": actions,
                                                               "checkpoint": "c1"}).json()
    assert at_c1["log_probs"] == after["log_probs"]
    restored = http.put("/v1/policies/http-twin/weights", json={"safetensors": twin_weights})
    assert restored.status_code == 200 and restored.json()["version"] == 2
    assert http.post("/v1/policies/http-twin/log-prob", json={"states": states, "actions": actions}).json()[
        "log_probs"] == before["log_probs"]
    loaded = http.post("/v1/policies/http-twin/checkpoints/c1/load")
    assert loaded.status_code == 200 and loaded.json()["version"] == 1, "back to the checkpoint's version"
    assert http.post("/v1/policies/http-twin/log-prob", json={"states": states, "actions": actions}).json()[
        "log_probs"] == after["log_probs"], "the checkpoint's weights are back"
    assert_problem(http.post("/v1/policies/http-twin/checkpoints/none-such/load"), 404, "NOT_FOUND")

    stub = policy_pb2_grpc.PolicyServiceStub(server.channel)
    assert stub.GetPolicy(policy_pb2.PolicyRequest(policy_id="http-twin"), timeout=30).version >= 1
    deleted = http.delete("/v1/policies/http-twin")
    assert deleted.status_code == 200 and deleted.json() == {}
    assert_problem(http.get("/v1/policies/http-twin"), 404, "NOT_FOUND")
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetPolicy(policy_pb2.PolicyRequest(policy_id="http-twin"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_count_both_transports_and_show_runs_by_state(server: ServerHandle, http: httpx.Client,
                                                               trained: dict[str, Any]) -> None:
    server.status(trained["run_id"])
    http.get(f"/v1/runs/{trained['run_id']}")
    http.get("/v1/runs/run-000000000000")
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}

    def calls(transport: str, method: str, code: str) -> float:
        key = (("code", code), ("method", method), ("transport", transport))
        return samples.get(("rl_service_rpc_requests_total", key), 0.0)
    assert calls("grpc", "GetTrainingStatus", "OK") >= 1 and calls("http", "GetTrainingStatus", "OK") >= 1
    assert calls("http", "GetTrainingStatus", "NOT_FOUND") >= 1
    assert samples[("rl_service_runs", (("state", "SUCCEEDED"),))] >= 1
    assert ("rl_service_queue_length", ()) in samples
    assert any(name == "rl_service_act_duration_seconds_count" for name, _ in samples)


def test_health_and_readiness_and_the_dashboard(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "alive"}
    assert http.get("/readyz").json() == {"status": "SERVING"}
    page = http.get("/")
    assert page.status_code == 200 and "/static/dashboard.js" in page.text
    script = http.get("/static/dashboard.js")
    assert script.status_code == 200 and "/v1/algorithms" in script.text
    # Nothing from elsewhere: every link of the page is the server's own; the script names no other host (the
    # SVG namespace is an identifier, never fetched).
    assert set(re.findall(r'(?:src|href)="([^"]*)"', page.text)) == {"/static/dashboard.css", "/static/dashboard.js",
                                                                     "#/"}
    assert set(re.findall(r"https?://[^\s\"'`]+", script.text)) == {"http://www.w3.org/2000/svg"}


# ------------------------------------------------------------------------------------------ tokens, TLS, ports


def test_tokens_roles_and_audit_lines_are_grpcs(tmp_path: Path) -> None:
    tokens = {"rita": new_token(), "alice": new_token()}
    (tmp_path / "tokens").write_text(token_line("rita", Role.READER, tokens["rita"]) + "\n"
                                     + token_line("alice", Role.TRAINER, tokens["alice"]) + "\n")
    handle = start_server(tmp_path, auth_tokens_file=tmp_path / "tokens", http_enabled=True, log_level="INFO")
    try:
        base = f"http://127.0.0.1:{handle.running.http_port}"
        body = {"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 0}
        with httpx.Client(base_url=base, timeout=30) as anonymous:
            refused = anonymous.get("/v1/runs")
            assert_problem(refused, 401, "UNAUTHENTICATED")
            assert refused.headers["www-authenticate"] == "Bearer"
            assert_problem(anonymous.get("/v1/runs", headers={"Authorization": "Basic abc"}), 401, "UNAUTHENTICATED")
            assert_problem(anonymous.get("/metrics"), 401, "UNAUTHENTICATED")
            assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").status_code == 200
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {tokens['rita']}"}) as rita:
            assert rita.get("/v1/runs").status_code == 200 and rita.get("/metrics").status_code == 200
            with capture_logs() as logs:
                problem = assert_problem(rita.post("/v1/runs", json=body), 403, "PERMISSION_DENIED")
            assert "StartTraining needs role trainer" in problem["detail"]
        alice_token = {"Authorization": f"Bearer {tokens['alice']}"}
        with httpx.Client(base_url=base, timeout=30, headers=alice_token) as alice, capture_logs() as more:
            assert_problem(alice.post("/v1/runs", json=body), 400, "INVALID_ARGUMENT", "total_timesteps")
        audit = [entry for entry in logs + more if entry["event"] == "audit"]
        assert [(a["principal"], a["rpc"], a["code"]) for a in audit] == [
            ("rita", "StartTraining", "PERMISSION_DENIED"), ("alice", "StartTraining", "INVALID_ARGUMENT")]
        assert all(a["peer"].startswith("http:127.0.0.1:") for a in audit)
    finally:
        handle.stop()


def test_tls_serves_https_with_the_grpc_ports_certificate(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    running = build_server(make_settings(tmp_path / "server", http_enabled=True, tls_cert_file=pki.server.cert,
                                         tls_key_file=pki.server.key))
    try:
        url = f"https://localhost:{running.http_port}/healthz"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca.cert)), timeout=30) as client:
            assert client.get(url).json() == {"status": "alive"}
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=10) as plain:
            plain.get(f"http://127.0.0.1:{running.http_port}/healthz")
    finally:
        running.stop(grace=5)


def test_a_busy_http_port_stops_the_start_naming_it(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"HTTP_PORT 127.0.0.1:{port}"):
            start_server(tmp_path, http_enabled=True, http_port=port)
    # The data directory was released: a server starts there at once.
    start_server(tmp_path, http_enabled=True).stop()
