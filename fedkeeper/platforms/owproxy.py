"""A stand-in for OpenWhisk's Python action proxy: the /init and /run JSON protocol of an action container.

It follows the action interface of OpenWhisk's "Adding Action Language Runtimes" document: /init takes
{"value": {"name", "main", "code", "binary"}} once (a second call is an error), where code is the
base64 zip of the action with __main__.py at its root; /run takes {"value": params, ...context} at most
one at a time, exports every context field as __OW_<FIELD> in the environment, and answers with the
action's dict; anything else is an error object {"error": ...}. Log markers close each activation.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import sys
import tempfile
import threading
import traceback
import zipfile
from typing import Any, Callable

from flask import Flask, Response, request

# The markers the platform's log collector looks for at the end of each activation's stdout and stderr.
END_MARKER = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"


def _json(status: int, body: Any) -> Response:
    return Response(json.dumps(body), status, mimetype="application/json")


def create_app() -> Flask:
    """The proxy's two routes, for one action per process, as in a container."""
    app = Flask("openwhisk-action-proxy")
    state: dict[str, Callable | None] = {"main": None}
    lock = threading.Lock()  # the platform never overlaps activations in one container; neither does this

    @app.post("/init")
    def init():
        if state["main"] is not None:
            return _json(403, {"error": "Cannot initialize the action more than once."})
        value = (request.get_json(silent=True) or {}).get("value")
        if not isinstance(value, dict) or not value.get("code"):
            return _json(403, {"error": "Missing main/no code to execute."})
        try:
            state["main"] = _load(value)
        except Exception as exc:  # reported as the init error, as the runtime does
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            return _json(502, {"error": f"Initialization has failed due to: {exc}"})
        return _json(200, {"ok": True})

    @app.post("/run")
    def run():
        if state["main"] is None:
            return _json(403, {"error": "Cannot invoke an uninitialized action."})
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("value", {}), dict):
            return _json(403, {"error": "The action input must be a JSON object with a 'value' object."})
        with lock:
            for key, val in body.items():
                if key != "value":
                    os.environ[f"__OW_{key.upper()}"] = val if isinstance(val, str) else json.dumps(val)
            try:
                result = state["main"](body.get("value") or {})
            except Exception as exc:
                print(traceback.format_exc(), file=sys.stderr, flush=True)
                result = exc
            finally:
                for stream in (sys.stdout, sys.stderr):
                    print(END_MARKER, file=stream, flush=True)
        if isinstance(result, Exception):
            return _json(502, {"error": f"An error has occurred: {result}"})
        if not isinstance(result, dict):
            return _json(502, {"error": "The action did not return a dictionary."})
        try:
            return _json(200, result)
        except (TypeError, ValueError):
            return _json(502, {"error": "The action did not return a dictionary."})

    return app


def _load(value: dict) -> Callable:
    """Unpack the action (a zip when binary, else a single source file) and return its main function."""
    folder = tempfile.mkdtemp(prefix="ow-action-")
    if value.get("binary"):
        with zipfile.ZipFile(io.BytesIO(base64.b64decode(value["code"]))) as zf:
            zf.extractall(folder)
    else:
        with open(os.path.join(folder, "__main__.py"), "w") as fh:
            fh.write(value["code"])
    for key, val in (value.get("env") or {}).items():
        os.environ[key] = str(val)
    sys.path.insert(0, folder)  # the zip's own packages (fedkeeper/) import from its root
    spec = importlib.util.spec_from_file_location("action_main", os.path.join(folder, "__main__.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = getattr(module, value.get("main") or "main", None)
    if not callable(main):
        raise ValueError(f"the action has no function {value.get('main') or 'main'!r}")
    return main


def action_zip(root: str, function: str) -> bytes:
    """The zip an OpenWhisk deploy uploads: functions/<function>/ at the root, the fedkeeper package beside it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for base, prefix in ((os.path.join(root, "functions", function), ""), (os.path.join(root, "fedkeeper"), "fedkeeper/")):
            for folder, dirs, files in os.walk(base):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                for name in files:
                    if name.endswith(".pyc"):
                        continue
                    path = os.path.join(folder, name)
                    zf.write(path, prefix + os.path.relpath(path, base))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    """Serve the proxy on 127.0.0.1 (OpenWhisk's containers listen on 8080)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args(argv)
    from werkzeug.serving import run_simple

    run_simple("127.0.0.1", args.port, create_app(), threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
