"""nodes.messages: run stats go to the client that queued the prompt, tagged with the prompt."""
import importlib
import sys
import types

import pytest


class FakeServer:
    def __init__(self, client_id, prompt_id="p1"):
        self.client_id, self.last_prompt_id, self.sent = client_id, prompt_id, []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


@pytest.fixture
def messages(comfy_nodes, monkeypatch):
    noop = comfy_nodes.NODE_CLASS_MAPPINGS["OptimNoop"]
    return importlib.import_module(noop.__module__.rsplit(".", 1)[0] + ".messages")


def install(monkeypatch, server):
    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {"instance": server})
    monkeypatch.setitem(sys.modules, "server", fake)


def test_stats_go_to_the_prompts_client_with_node_technique_and_prompt(messages, monkeypatch):
    srv = FakeServer("tab-1", "prompt-9")
    install(monkeypatch, srv)
    messages.stats_sender("12:4", "deepcache")({"shallow_calls": 6})
    assert srv.sent == [("comfyui-optim.stats", {"node": "12:4", "technique": "deepcache",
                                                 "stats": {"shallow_calls": 6}, "prompt_id": "prompt-9"},
                         "tab-1")]


def test_nothing_is_broadcast_for_a_client_less_run_or_without_a_node_id(messages, monkeypatch):
    srv = FakeServer(None)
    install(monkeypatch, srv)
    messages.stats_sender("3", "tgate")({"steps": 9})
    srv.client_id = "tab-1"
    messages.stats_sender(None, "tgate")({"steps": 9})
    assert srv.sent == []


def test_a_failing_send_never_fails_the_run(messages, monkeypatch):
    srv = FakeServer("tab-1")
    srv.send_sync = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("socket closed"))
    install(monkeypatch, srv)
    messages.stats_sender("3", "tgate")({"steps": 9})  # no exception
