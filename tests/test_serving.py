"""Ray Serve for real on 127.0.0.1: concurrent requests of mixed sizes get the direct answers, bad
requests get a 4xx without disturbing the others, a shutdown with requests in flight drains."""

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_runtime import D, mlp_model, random_policy
from torch import nn

from eenet_fast.runtime import EarlyExitModel

pytestmark = pytest.mark.serve

EXAMPLE = torch.zeros(2, D)


def model_factory():
    """The served model (built the same in the test and in the replica) and its example batch."""
    return mlp_model(11), EXAMPLE


class Sleepy(nn.Module):
    def __init__(self, stage):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        time.sleep(0.02)
        return self.stage(x)


def slow_factory():
    """The same model with stages that take 20 ms a step: requests stay in flight for a while."""
    model = mlp_model(11)
    return EarlyExitModel([Sleepy(s) for s in model.stages], model.heads, backend="torch").eval(), EXAMPLE


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    import requests  # noqa: F401 - installed with ray[serve]
    from ray import serve

    from eenet_fast.serving import build_app, run_server

    model, _ = model_factory()
    random_policy(model, "eenet", 4, 0.4)
    policy = tmp_path_factory.mktemp("serve") / "exits.safetensors"
    model.save_policy(policy)
    tests = str(Path(__file__).parent)
    # Ray's processes inherit this: on a busy machine the HTTP proxy can take more than the default 5 s
    # to answer its readiness check, and Serve then kills it (seen beside two CPU-bound processes)
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}})
    try:
        port = free_port()
        app = build_app("test_serving:model_factory", policy, name="fast", num_cpus=0.5, max_batch=16,
                        max_wait_ms=2, max_body_bytes=64 << 10)
        run_server(app, port=port, name="fast", route_prefix="/fast", blocking=False)
        yield {"model": model, "policy": policy, "url": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url, body, timeout=60, content_type="application/json"):
    import requests

    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url, data=data, headers={"content-type": content_type}, timeout=timeout)


def post_either(url, x, i):
    """Every other request as a binary .npy body, the rest as JSON."""
    from eenet_fast.http_io import encode_inputs

    if i % 2 == 0:
        return post(url, {"inputs": x.tolist()})
    body, content_type = encode_inputs(x)
    return post(url, body, content_type=content_type)


def test_300_concurrent_requests_get_the_direct_answers(served):
    from ray import serve

    model, url = served["model"], served["url"] + "/fast"
    g = torch.Generator().manual_seed(0)
    requests_ = [torch.randn(int(n), D, generator=g) for n in torch.randint(1, 9, (300,), generator=g)]
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda ix: post_either(url, ix[1], ix[0]), enumerate(requests_)))
    handle = serve.get_app_handle("fast")
    by_handle = [handle.infer.remote(x) for x in requests_[:20]]
    for x, response in zip(requests_, responses):
        assert response.status_code == 200, response.text
        answer, direct = response.json(), model(x)
        assert answer["exits"] == direct.exits.tolist() and answer["predictions"] == direct.predictions.tolist()
        torch.testing.assert_close(torch.tensor(answer["logits"]), direct.logits, rtol=0, atol=1e-5)
    for x, response in zip(requests_, by_handle):
        result = response.result(timeout_s=60)
        assert torch.equal(result.exits, model(x).exits)
        torch.testing.assert_close(result.logits, model(x).logits, rtol=0, atol=1e-5)
    import requests

    stats = requests.get(url + "/stats", timeout=30).json()
    assert stats["requests"]["answered"] >= 320 and stats["samples"] == sum(len(x) for x in requests_) + sum(
        len(x) for x in requests_[:20])
    assert stats["stages"][0]["mean_batch"] > 1  # requests were batched together
    assert requests.get(url + "/health", timeout=30).json() == {"status": "ok"}


def test_bad_requests_get_a_4xx_and_do_not_disturb_the_others(served):
    from eenet_fast.http_io import NPY, encode_inputs

    model, url = served["model"], served["url"] + "/fast"
    g = torch.Generator().manual_seed(1)
    good = [torch.randn(3, D, generator=g) for _ in range(40)]
    nan = torch.randn(2, D).tolist()
    nan[1][3] = float("nan")
    bad = [
        ({"inputs": torch.randn(2, D + 1).tolist()}, 422, "but this engine serves float32"),  # wrong shape
        ({"inputs": [["a"] * D]}, 422, "not a rectangular array of numbers"),  # wrong dtype
        ({"inputs": [[1, 2], [3]]}, 422, "not a rectangular array"),  # ragged
        ({"inputs": {"x": [[1.0] * D]}}, 422, "takes one array"),  # a dict for a tensor model
        ({"batch": [[1.0] * D]}, 422, '"inputs"'),
        (json.dumps({"inputs": nan}), 422, "NaN or Infinity"),
        ('{"inputs": [[1.0, 2.0', 400, "not valid JSON"),
        ({"inputs": torch.randn(400, D).tolist()}, 413, "more than the 65536"),
        (b"\x93NUMPY garbage", 400, "not a valid .npy file"),
        (encode_inputs(torch.randn(2, D + 1))[0], 422, "but this engine serves float32"),
    ]
    binary = [isinstance(body, bytes) for body, _, _ in bad]
    with ThreadPoolExecutor(16) as pool:
        good_futures = [pool.submit(post_either, url, x, i) for i, x in enumerate(good)]
        bad_futures = [pool.submit(post, url, body, content_type=NPY if b else "application/json")
                       for (body, _, _), b in zip(bad, binary)]
        for x, f in zip(good, good_futures):
            response = f.result()
            assert response.status_code == 200, response.text
            assert response.json()["exits"] == model(x).exits.tolist()
        for (_, status, message), f in zip(bad, bad_futures):
            response = f.result()
            assert response.status_code == status and message in response.json()["error"], response.text


def test_the_serve_command_refuses_a_factory_it_cannot_import(tmp_path):
    from click.testing import CliRunner

    from eenet_fast.cli import main

    policy = tmp_path / "exits.safetensors"
    policy.write_bytes(b"")
    result = CliRunner().invoke(main, ["serve", "--model", "no_such_module:make", "--policy", str(policy)])
    assert result.exit_code != 0 and "cannot load the model factory 'no_such_module:make'" in result.output
    result = CliRunner().invoke(main, ["serve", "--model", "no_colon", "--policy", str(policy)])
    assert result.exit_code != 0 and "'package.module:function'" in result.output


def test_shutdown_with_requests_in_flight_answers_or_clearly_refuses_each(served):
    import requests
    from ray import serve

    from eenet_fast.serving import build_app

    model, url = served["model"], served["url"] + "/slow"
    serve.run(build_app("test_serving:slow_factory", served["policy"], name="slow", num_cpus=0.5, max_batch=4,
                        drain_s=60), name="slow", route_prefix="/slow")
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(2, D, generator=g) for _ in range(60)]
    outcomes = [None] * len(inputs)

    def call(i):
        try:
            response = post(url, {"inputs": inputs[i].tolist()}, timeout=120)
            outcomes[i] = (response.status_code, response.text)
        except requests.RequestException as error:  # refused at the door once the app is gone
            outcomes[i] = ("connection", str(error))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while requests.get(url + "/stats", timeout=30).json()["requests"]["accepted"] < 10 and time.monotonic() < deadline:
        time.sleep(0.05)  # until requests are in the engine
    serve.delete("slow")  # waits for the replica to drain and stop
    for t in threads:
        t.join(timeout=180)
    assert all(o is not None for o in outcomes), "a request never finished"
    answered = 0
    for x, (status, text) in zip(inputs, outcomes):
        if status == 200:
            answered += 1
            assert json.loads(text)["exits"] == model(x).exits.tolist()
        else:  # the app was gone: an error status or a refused connection, never a wrong answer
            assert status == "connection" or status >= 400, (status, text)
            assert text
    assert answered > 0
