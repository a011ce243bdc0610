"""Per-run statistics sent to the frontend (keyed by node id) and kept for the log."""
import logging

EVENT = "comfyui-optim.stats"


def stats_sender(node_id, technique: str):
    """A callback for an optim hook's end of run: forwards its stats to the frontend, if a server
    is running (in-process use, tests and benchmarks, has none)."""
    def send(stats: dict) -> None:
        try:
            from server import PromptServer
            instance = getattr(PromptServer, "instance", None)
        except ImportError:
            instance = None
        if instance is None or node_id is None:
            return
        # Like ComfyUI's own "executed": only to the client that queued the prompt (another
        # user's tab has other nodes under the same ids), and not at all for a client-less run.
        client_id = getattr(instance, "client_id", None)
        if client_id is None:
            return
        payload = {"node": str(node_id), "technique": technique, "stats": stats,
                   "prompt_id": getattr(instance, "last_prompt_id", None)}
        try:
            instance.send_sync(EVENT, payload, client_id)
        except Exception as e:  # a lost statistics message must never fail the user's run
            logging.getLogger("comfyui-optim").debug("could not send stats: %s", e)
    return send


def current_prompt_id():
    """The prompt the server is running (None in-process): calls of one prompt make one run."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(getattr(PromptServer, "instance", None), "last_prompt_id", None)


def node_id_of(cls):
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None
