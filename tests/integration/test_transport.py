"""The router's calls reach a replica by gRPC when they fit (transport.py); one that gRPC refuses
for its size is sent again by reference, never failed."""

from __future__ import annotations

import httpx

from tests.integration.conftest import wait_ready


def test_a_call_grpc_refuses_for_its_size_is_answered_by_reference(serve_cluster, monkeypatch):
    from ray import serve

    import serve_app.app as app_module

    def small_grpc_limit(model, server=None):  # this app's replica takes gRPC messages of 2 KiB at most
        options = original(model, server)
        options["ray_actor_options"]["runtime_env"] = {
            "env_vars": {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "2048"}}
        return options

    original = app_module.deployment_options
    monkeypatch.setattr(app_module, "deployment_options", small_grpc_limit)
    config = {"models": [{"name": "narrow", "source": "builtin:tiny-random-llama", "placement": {"num_cpus": 0.25},
                          "limits": {"max_new_tokens": 8}, "sampling": {"temperature": 0}}]}
    serve.run(app_module.build_app(config), name="narrow", route_prefix="/narrow", blocking=False)
    try:
        wait_ready(f"{serve_cluster}/narrow/readyz")
        url = f"{serve_cluster}/narrow/v1/generate"
        small = httpx.post(url, json={"model": "narrow", "prompt": "hi", "max_tokens": 4}, timeout=120)
        # About 3.5 KB of payload (1,500 tokens): past the replica's gRPC limit, well within the router's.
        large = httpx.post(url, json={"model": "narrow", "prompt": "hello " * 500, "max_tokens": 4}, timeout=120)
        assert small.status_code == 200, small.text
        assert large.status_code == 200, large.text
        assert large.json()["usage"]["prompt_tokens"] > 1000
    finally:
        serve.delete("narrow")
