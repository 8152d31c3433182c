"""Each function's requirements file per platform holds exactly what the function imports there.

A fresh interpreter gets an import hook that refuses every third-party module outside the requirement
file's dependency closure (as a venv built from that file alone would), loads the platform's entry file by
path, answers one HTTP request through it, and imports the handler and the store backend it uses on
that platform (the client also builds a model). Every listed requirement must have been imported, so
no package is carried for nothing.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FILES = {"gcf": ("requirements.txt", "main.py"), "lambda": ("requirements-lambda.txt", "lambda_function.py"),
         "openwhisk": ("requirements-openwhisk.txt", "__main__.py"), "openfaas": ("requirements-openfaas.txt", "handler.py")}
STORE = {"gcf": "fedkeeper.store.gcs", "lambda": "fedkeeper.store.s3", "openwhisk": "fedkeeper.store.s3",
         "openfaas": "fedkeeper.store.s3"}

# Runs in the fresh interpreter: argv = allowed modules (JSON), function, platform, entry path, store module.
PROBE = r'''
import importlib.util, json, sys
allowed, fn, platform, entry, store_module = set(json.loads(sys.argv[1])), *sys.argv[2:]


class OnlyRequirements:
    """Refuse third-party modules outside the requirements, as a venv built from them would."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        # _sysconfigdata_* is the interpreter's own build data, outside stdlib_module_names.
        if top in allowed or top in sys.stdlib_module_names or top == "fedkeeper" or top.startswith("_sysconfigdata"):
            return None
        raise ModuleNotFoundError(f"No module named {name!r} (not in the {platform} requirements of {fn})", name=name)


sys.meta_path.insert(0, OnlyRequirements())
spec = importlib.util.spec_from_file_location(f"entry_{fn}_{platform}", entry)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
if platform == "lambda":
    event = {"version": "2.0", "routeKey": "$default", "rawPath": "/healthz", "rawQueryString": "", "headers": {},
             "requestContext": {"http": {"method": "GET", "path": "/healthz", "protocol": "HTTP/1.1",
                                         "sourceIp": "127.0.0.1", "userAgent": "probe"}, "stage": "$default"},
             "isBase64Encoded": False}
    status = mod.handler(event, None)["statusCode"]
elif platform == "gcf":
    import flask
    with flask.Flask("probe").test_request_context("/healthz"):
        status = getattr(mod, fn)(flask.request)[1]
elif platform == "openwhisk":
    status = mod.main({"__ow_method": "get", "__ow_path": "/healthz", "__ow_headers": {}, "__ow_body": ""})["statusCode"]
else:
    from types import SimpleNamespace
    event = SimpleNamespace(method="GET", path="/healthz", headers={}, body=b"", query={})
    status = mod.handle(event, SimpleNamespace(hostname="probe"))["statusCode"]
assert status == 200, status
importlib.import_module(f"fedkeeper.functions.{fn}")
importlib.import_module(store_module)
if fn == "client":
    from fedkeeper import models
    models.build("nn", (8, 8), 10)
print(json.dumps(sorted({m.partition(".")[0] for m in sys.modules})))
'''


def requirements(path: Path) -> list[Requirement]:
    """The requirements listed in a file (comments and blank lines skipped)."""
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines())
    return [Requirement(ln) for ln in lines if ln]


def closure(reqs: list[Requirement]) -> set[str]:
    """Canonical names of the listed distributions and everything they require, by installed metadata."""
    seen: set[str] = set()
    todo = list(reqs)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            deps = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        extras = req.extras or {""}
        for line in deps:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return seen


def modules_of(dists: set[str]) -> dict[str, set[str]]:
    """Top-level import names provided by each of the given distributions."""
    out: dict[str, set[str]] = {d: set() for d in dists}
    for module, owners in md.packages_distributions().items():
        for owner in owners:
            if canonicalize_name(owner) in out:
                out[canonicalize_name(owner)].add(module)
    return out


@pytest.mark.slow  # a fresh interpreter per case, and TensorFlow's import for the client
@pytest.mark.parametrize("fn,platform", [(fn, p) for fn in ("trigger", "aggregator", "client") for p in FILES])
def test_requirements_cover_exactly_the_imports(fn, platform):
    req_file, entry = FILES[platform]
    listed = requirements(ROOT / "functions" / fn / req_file)
    missing = [r.name for r in listed if not _installed(r.name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed here: pip install -e '.[all]'")
    allowed = sorted(set().union(*modules_of(closure(listed)).values()))
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(allowed), fn, platform,
                           str(ROOT / "functions" / fn / entry), STORE[platform]],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    direct = modules_of({canonicalize_name(r.name) for r in listed})
    unused = [name for name, mods in direct.items() if not mods & imported]
    assert not unused, f"{req_file} of {fn} lists {unused}, which the function never imports on {platform}"


def test_heavy_and_foreign_packages_stay_out():
    """No TensorFlow for the trigger and aggregator anywhere; no GCS client on Lambda; no AWS SDK on GCF."""
    for fn in ("trigger", "aggregator"):
        for req_file, _ in FILES.values():
            names = {canonicalize_name(r.name) for r in requirements(ROOT / "functions" / fn / req_file)}
            assert not names & {"tensorflow", "tensorflow-cpu", "keras", "scikit-learn"}, (fn, req_file)
    for fn in ("trigger", "aggregator", "client"):
        lam = {canonicalize_name(r.name) for r in requirements(ROOT / "functions" / fn / "requirements-lambda.txt")}
        gcf = {canonicalize_name(r.name) for r in requirements(ROOT / "functions" / fn / "requirements.txt")}
        assert "google-cloud-storage" not in lam and "functions-framework" not in lam
        assert "boto3" not in gcf and "serverless-wsgi" not in gcf
    # The trigger and the aggregator share one Lambda zip, so one file serves both.
    assert (ROOT / "functions/trigger/requirements-lambda.txt").read_text().replace("trigger", "aggregator") == \
        (ROOT / "functions/aggregator/requirements-lambda.txt").read_text()


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


def test_modules_hidden_from_local_workers_are_in_no_functions_requirements():
    # Prepare: the distributions that provide the modules a local worker refuses
    from fedkeeper.runtime.worker import NOT_DEPLOYED

    dists = {"sklearn": "scikit-learn", "pandas": "pandas", "matplotlib": "matplotlib"}
    assert set(NOT_DEPLOYED) <= set(dists)
    # Execute
    listed = set()
    for f in (ROOT / "functions").glob("*/requirements*.txt"):
        for line in f.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                listed.add(canonicalize_name(Requirement(line).name))
    # Assert: hiding them makes the local worker what every deployed function already is
    assert listed, "no requirements were read"
    assert not {canonicalize_name(dists[m]) for m in NOT_DEPLOYED} & listed


@pytest.mark.slow
def test_a_local_worker_trains_without_the_hidden_modules():
    # Prepare
    code = ("import sys; from fedkeeper.runtime.worker import hide_undeployed; hide_undeployed()\n"
            "import numpy as np; from fedkeeper import models\n"
            "m = models.build('nn', (8, 8), 10, jit_compile=True, steps_per_execution=4)\n"
            "h = m.fit(np.random.rand(40, 8, 8).astype('float32'), np.arange(40) % 10, batch_size=10, epochs=1, verbose=0)\n"
            "loaded = [n for n in ('sklearn', 'pandas', 'matplotlib') if sys.modules.get(n) is not None]\n"
            "print(len(h.history['loss']), loaded)")
    # Execute
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "1 []"



def _hidden_modules_loaded() -> list[str]:
    """In the model-building process, after it built the model: the refused libraries that were loaded anyway."""
    return [n for n in ("sklearn", "pandas", "matplotlib") if sys.modules.get(n) is not None]


@pytest.mark.slow
def test_the_setup_model_builder_starts_without_the_hidden_modules(monkeypatch):
    # Prepare: the pool build_initial_weights starts also reports, once its build is done, what that process loaded
    from concurrent.futures import ProcessPoolExecutor

    from fedkeeper import federation

    seen = {}

    class Reporting(ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            future = super().submit(fn, *args, **kwargs)
            seen["loaded"] = super().submit(_hidden_modules_loaded)  # one worker: runs after the build
            return future

    monkeypatch.setattr("concurrent.futures.ProcessPoolExecutor", Reporting)
    # Execute
    weights = federation.build_initial_weights("nn", (8, 8), 10, 0)
    # Assert: setup's builder is a process like a local worker, and still builds the model
    assert weights and all(v.size for v in weights.values())
    assert seen["loaded"].result() == []
