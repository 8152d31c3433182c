"""Rough edges a new user meets in the first hour: each bad input ends in one clear line, exit 2, no traceback."""

import argparse
import json
import socket
import time

import numpy as np
import pytest

from fedkeeper import report
from fedkeeper.cli import CLIError, _resume_target, main
from fedkeeper.core import config, keys
from fedkeeper.platforms import deploy
from fedkeeper.store.local import LocalStore
from tests.conftest import Federation
from tests.extras import mark


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_clear_line(err: str) -> str:
    """The single error line of a failed command (progress lines may precede it); never a traceback."""
    lines = [x for x in err.strip().splitlines() if x.startswith("fedkeeper: error:")]
    assert len(lines) == 1 and "Traceback" not in err and err.strip().endswith(lines[0]), err
    return lines[0]


# -- 1. cloud stores without credentials or with a dead endpoint --------------------------------------------
@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """An environment where boto3's credential chain finds nothing (no variables, files, profile or role)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "FEDKEEPER_S3_ENDPOINT", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@mark("aws")
@pytest.mark.parametrize("command", [["status"], ["run", "--rounds", "1"]])
def test_s3_without_credentials_names_the_chain(no_aws, command, capsys):
    assert main([*command, "--store", "s3://mybucket/fed"]) == 2
    line = _one_clear_line(capsys.readouterr().err)
    assert "no AWS credentials" in line and "AWS_ACCESS_KEY_ID" in line and "AWS_PROFILE" in line


@mark("aws")
def test_unreachable_s3_endpoint_is_named(no_aws, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    assert main(["status", "--store", f"s3://mybucket/fed?endpoint={endpoint}"]) == 2
    line = _one_clear_line(capsys.readouterr().err)
    assert f"cannot reach the S3 endpoint {endpoint}" in line and "endpoint=" in line


@mark("aws")
def test_s3_url_options_are_checked(no_aws, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    # boto3's name endpoint_url works too; a misspelt option is named, not silently ignored.
    assert main(["status", "--store", f"s3://mybucket/fed?endpoint_url={endpoint}"]) == 2
    assert f"cannot reach the S3 endpoint {endpoint}" in _one_clear_line(capsys.readouterr().err)
    assert main(["status", "--store", "s3://mybucket/fed?endpont=http://x"]) == 2
    assert "unknown option endpont" in _one_clear_line(capsys.readouterr().err)


@mark("gcp")
def test_gcs_without_credentials_names_adc(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    # The metadata server probe goes to a closed local port instead of the network.
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    assert main(["status", "--store", "gs://mybucket/fed"]) == 2
    line = _one_clear_line(capsys.readouterr().err)
    assert "no Google credentials" in line and "GOOGLE_APPLICATION_CREDENTIALS" in line
    assert "gcloud auth application-default login" in line


# -- 3. bad data and a folder as config -------------------------------------------------------------------
def test_npz_with_unequal_x_and_y_is_a_clear_error_and_leaves_no_folder(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 4)), y=np.zeros(9))
    store = tmp_path / "store"
    assert main(["run", "--dataset", f"npz:{bad}", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "x has 10 examples but y has 9 labels" in err and "Traceback" not in err
    assert not store.exists()  # the folder made for the failed setup is gone


def test_config_that_is_a_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path), "--store", str(tmp_path / "s")]) == 2
    line = _one_clear_line(capsys.readouterr().err)
    assert "is a folder, not a config file" in line and "Fix:" in line
    assert main(["setup", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in _one_clear_line(capsys.readouterr().err)


# -- 4. zero epochs are allowed and explained --------------------------------------------------------------
def test_zero_epochs_says_what_it_means(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 4)), y=np.zeros(9))  # stops right after the note, before any training
    main(["run", "--epochs", "0", "--dataset", f"npz:{bad}", "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert "model.epochs is 0" in err and "overhead" in err
    main(["run", "--epochs", "1", "--dataset", f"npz:{bad}", "--store", str(tmp_path / "s")])
    assert "model.epochs is 0" not in capsys.readouterr().err


# -- 5. deploy plans are deployable as printed or say what is missing --------------------------------------
def test_deploy_a_kind_shadowed_by_the_default_local_platform(capsys):
    assert main(["deploy", "gcf", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# deploy plan for platform 'gcf' (gcf)")
    missing = out.split("--- ")[0]
    assert "NOT DEPLOYABLE AS PRINTED" in missing and "store:" in missing and "options.project" in missing
    assert "gcloud functions deploy fedkeeper-trigger" in out  # the whole federation runs there


def test_lambda_plan_flags_a_missing_or_foreign_store(capsys):
    assert main(["deploy", "lambda", "--dry-run"]) == 0
    assert "store: deployed functions need an object store" in capsys.readouterr().out
    assert main(["deploy", "lambda", "--dry-run", "--config", "examples/paper.yaml"]) == 0
    head = capsys.readouterr().out.split("--- ")[0]
    assert "needs an s3:// store, not gs://" in head
    assert main(["deploy", "lambda", "--dry-run", "--store", "s3://bucket/fed"]) == 0
    assert "NOT DEPLOYABLE" not in capsys.readouterr().out


def test_apply_refuses_a_plan_with_missing_pieces(tmp_path, monkeypatch):
    cfg = config.from_dict({})
    plan = deploy.plan_for(cfg, "lambda")
    monkeypatch.setattr(deploy.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    ran = []
    monkeypatch.setattr(deploy.subprocess, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(deploy.DeployError, match="cannot deploy yet; set store:"):
        deploy.apply(plan, tmp_path)
    assert ran == []


# -- 6. a round whose start failed is finished by the next call --------------------------------------------
def test_failed_round_start_is_completed_by_the_next_post(federation, monkeypatch):
    from fedkeeper.platforms import common
    from fedkeeper.platforms.http import create_app

    class Flaky:
        """Fails once on the second client, like a platform API answering 500."""

        def __init__(self):
            self.calls, self.failed = [], False

        def invoke(self, function, payload, platform=None):
            if function == "client" and len(self.calls) == 1 and not self.failed:
                self.failed = True
                raise RuntimeError("platform answered 500")
            self.calls.append((function, payload.get("client")))

    inv = Flaky()
    monkeypatch.setenv("FEDKEEPER_STORE", federation.store.url)
    monkeypatch.delenv("FEDKEEPER_TOKEN", raising=False)
    monkeypatch.setitem(common._INVOKERS, federation.store.url, inv)
    monkeypatch.setitem(common._STORES, federation.store.url, federation.store)
    client = create_app("trigger").test_client()
    first = client.post("/rounds")
    assert first.status_code == 500
    again = client.post("/rounds")
    assert again.status_code == 200 and again.get_json()["status"] == "resumed", again.get_json()
    assert sorted(c for f, c in inv.calls if f == "client") == sorted(federation.ids + federation.ids[:1])
    assert client.post("/rounds").status_code == 409  # now genuinely busy


def test_a_post_arriving_while_the_round_is_being_opened_invokes_nobody(federation, monkeypatch):
    # Prepare: the deployed trigger's HTTP app; a second POST /rounds lands while the first still invokes clients
    from fedkeeper.platforms import common
    from fedkeeper.platforms.http import create_app

    app = create_app("trigger").test_client()
    answers = []

    class Slow:
        def __init__(self):
            self.calls = []

        def invoke(self, function, payload, platform=None):
            self.calls.append((function, payload.get("client")))
            if len(self.calls) == 2:
                answers.append(app.post("/rounds"))

    inv = Slow()
    monkeypatch.setenv("FEDKEEPER_STORE", federation.store.url)
    monkeypatch.delenv("FEDKEEPER_TOKEN", raising=False)
    monkeypatch.setitem(common._INVOKERS, federation.store.url, inv)
    monkeypatch.setitem(common._STORES, federation.store.url, federation.store)
    # Execute
    first = app.post("/rounds")
    # Assert: the second call said the round is busy and every client was invoked once
    assert first.status_code == 200 and first.get_json()["status"] == "started"
    assert answers[0].status_code == 409 and answers[0].get_json()["status"] == "busy", answers[0].get_json()
    assert sorted(c for f, c in inv.calls if f == "client") == sorted(federation.ids)


# -- 7. resume extends rounds and refuses options it cannot apply -------------------------------------------
def _args(store: str, **over) -> argparse.Namespace:
    base = dict(store=store, config=None, epochs=None, model=None, dataset=None, partition=None, seed=None, rounds=None)
    return argparse.Namespace(**{**base, **over})


def test_resume_with_more_rounds_extends_the_stored_federation(federation):
    url = federation.store.url
    _, cfg = _resume_target(_args(url, rounds=5))
    assert cfg.rounds == 5 and federation.store.get_json(keys.FEDERATION)["rounds"] == 5
    assert [c.id for c in cfg.clients] == federation.ids  # nothing else changed
    with pytest.raises(CLIError, match="can only add rounds"):
        _resume_target(_args(url, rounds=2))


def test_resume_refuses_options_that_cannot_apply(federation, capsys):
    assert main(["run", "--resume", "--store", federation.store.url, "--epochs", "3", "--seed", "1"]) == 2
    line = _one_clear_line(capsys.readouterr().err)
    assert "--epochs, --seed cannot change a federation already in its store" in line


# -- 8, 9. one store layout rule; readers never create ------------------------------------------------------
def test_new_federations_go_to_the_named_store_or_a_new_run_folder(tmp_path):
    from fedkeeper.cli import new_store_url

    cfg = config.from_dict({})
    assert cfg.store == ""
    assert new_store_url(_args(None), cfg, "20260101-000000") == "./fedkeeper-data/run-20260101-000000"
    assert new_store_url(_args(None), config.from_dict({"store": "/x/fed"}), "T") == "/x/fed"
    assert new_store_url(_args("/y"), config.from_dict({"store": "/x/fed"}), "T") == "/y"


@pytest.fixture
def two_runs(tmp_path):
    root, results = tmp_path / "data", tmp_path / "runs"
    for i, name in enumerate(("run-20260101-000000", "run-20260102-000000")):
        fed = Federation(root / name, rounds_total=2 + i)
        fed.store.put(f"data/blob-{i}", b"x" * (1000 * (i + 1)))
        (results / name).mkdir(parents=True)
        (results / name / "results.json").write_text("{}")
        t = 1_700_000_000 + i * 100
        import os

        os.utime(root / name / "models" / "000000.safetensors", (t, t))
    return root, results


def test_status_on_a_folder_of_runs_lists_them(two_runs, capsys):
    root, _ = two_runs
    assert main(["status", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "holds 2 federation(s)" in out and "run-20260101-000000" in out and "run-20260102-000000" in out
    assert main(["report", "--store", str(root), "--out", str(root / "o")]) == 2
    assert "run(s) below it" in capsys.readouterr().err


def test_runs_lists_sizes_and_removes_only_with_yes(two_runs, capsys):
    root, results = two_runs
    assert main(["runs", str(root), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "run-20260101-000000" in out and " KB" in out and "2 run(s)" in out
    assert main(["runs", str(root), "--results", str(results), "--keep", "1"]) == 0
    assert "would remove 1 run(s)" in capsys.readouterr().out
    assert (root / "run-20260101-000000").exists()
    assert main(["runs", str(root), "--results", str(results), "--keep", "1", "--yes"]) == 0
    assert not (root / "run-20260101-000000").exists() and not (results / "run-20260101-000000").exists()
    assert (root / "run-20260102-000000").exists() and (results / "run-20260102-000000").exists()
    assert main(["runs", str(root), "--remove", "run-nope"]) == 2


@pytest.mark.parametrize("command", [["status"], ["report", "--out", "OUT"], ["run", "--resume"]])
def test_readers_never_create_the_store(tmp_path, command, capsys):
    typo = tmp_path / "fedkeeper-dta"
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in command]
    assert main([*argv, "--store", str(typo)]) == 2
    assert "no folder at" in _one_clear_line(capsys.readouterr().err)
    assert not typo.exists()


# -- 10, 11. rounds counted from 1 everywhere; round time after a resume ----------------------------------
def _close_round(fed: Federation, r: int, created: float, finished: float, resumed: float | None = None) -> None:
    m = fed.store.get_json(keys.manifest(r))
    fed.store.put_json(keys.manifest(r), dict(m, created=created))
    if resumed is not None:
        fed.store.put_json(f"{keys.round_prefix(r)}resumed/{int(resumed * 1000)}.json", {"at": resumed})
    fed.store.put_json(keys.result(r), {"status": "done", "selected": fed.ids, "included": fed.ids, "rejected": [],
                                        "clients": {}, "timings": {"finished_at": finished}})
    fed.store.put_json(keys.evaluation(r), {"test_accuracy": 0.5, "test_loss": 1.0})
    fed.store.put_json(keys.STATE, {"round": r, "next_round": r + 1, "rounds_done": r + 1, "status": "done"})


def test_status_json_and_text_count_rounds_from_1(federation, capsys):
    federation.open_round(0)
    _close_round(federation, 0, created=100.0, finished=103.0)
    assert main(["status", "--store", federation.store.url, "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["round"] == 1 and [h["round"] for h in view["history"]] == [1]
    assert main(["status", "--store", federation.store.url]) == 0
    out = capsys.readouterr().out
    assert "round 1 of 3" in out and "round 1/3  test acc 0.5000" in out


def test_round_time_after_a_resume_leaves_out_the_pause(federation):
    t0 = time.time() - 100
    federation.open_round(0)
    _close_round(federation, 0, created=t0, finished=t0 + 49, resumed=t0 + 46)
    rec = report.round_record(federation.store, 0)
    assert rec["timings"]["round_s"] == pytest.approx(3.0) and rec["timings"]["resumed_at"] == pytest.approx(t0 + 46)
    from fedkeeper.runtime.run import format_round

    assert "time 3.0s (since resume)" in format_round(rec, 3)


def test_resumed_run_marks_the_open_round(federation):
    from fedkeeper.runtime import run as runmod

    federation.open_round(0)
    with pytest.raises(Exception):  # stops at the runtime; the mark is written before it starts
        runmod.run(federation.cfg, federation.store, resume=True, timeout_s=0.01, log=lambda s: None,
                   progress=runmod.Progress(federation.cfg, quiet=True))
    assert federation.store.list(f"{keys.round_prefix(0)}resumed/")


# -- 12. validation reports every problem; fixes match the rule; events-config per store kind ----------------
def test_every_problem_of_a_file_is_reported_at_once(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: 0\nroundz: 3\nmodel:\n  learning_rate: -3\n  name: resnet\n"
                    "strategy:\n  quorum: 1.5\nplatforms:\n  - {name: a, kind: azure}\n")
    with pytest.raises(config.ConfigError) as info:
        config.from_dict(config.load_file(str(path)))
    fields = [f for f, _, _ in info.value.errors]
    assert sorted(fields) == sorted(["rounds", "roundz", "model.learning_rate", "model.name", "strategy.quorum",
                                     "platforms[0].kind"])
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "6 problems in the config" in err and err.count("Fix:") == 6


def test_fix_matches_an_open_bound():
    with pytest.raises(config.ConfigError) as info:
        config.from_dict({"model": {"learning_rate": -3}})
    assert info.value.problem == "must be > 0, got -3" and info.value.fix == "set model.learning_rate to a value above 0"
    with pytest.raises(config.ConfigError) as info:
        config.from_dict({"model": {"epochs": -1}})
    assert info.value.fix == "set model.epochs to at least 0"


def test_cross_field_problems_are_all_reported():
    with pytest.raises(config.ConfigError) as info:
        config.from_dict({"platforms": [{"name": "a"}, {"name": "a"}], "control_platform": "zz",
                          "clients": [{"id": "c", "platform": "b"}]})
    fields = [f for f, _, _ in info.value.errors]
    assert fields == ["platforms[1].name", "clients[0].platform", "control_platform"]


@pytest.mark.parametrize("store, says, never", [("./some/folder", "folder store", "gs://"),
                                               ("gs://b/p", "events: client", "folder")])
def test_events_config_explains_per_store_kind(store, says, never, capsys):
    assert main(["events-config", "seaweedfs", "--store", store, "--port", "9000"]) == 2
    line = _one_clear_line(capsys.readouterr().err)
    assert says in line and never not in line


def test_schema_command_describes_the_config_file(tmp_path, capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    props = schema["properties"]
    assert {"rounds", "model", "data", "strategy", "platforms", "clients", "store"} <= set(props)
    model = schema["$defs"]["ModelConfig"]["properties"]
    assert model["learning_rate"]["exclusiveMinimum"] == 0 and model["name"]["enum"] == ["nn", "cnn"]
    assert schema["$defs"]["StrategyConfig"]["properties"]["name"]["enum"] == list(config.STRATEGIES)
    assert schema["$defs"]["ModelConfig"]["additionalProperties"] is False
    assert main(["schema", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == schema


def test_schema_accepts_the_starter_and_rejects_a_typo(tmp_path):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema checks the exported schema")
    import yaml

    path = tmp_path / "fedkeeper.yaml"
    assert main(["init", str(path)]) == 0
    schema = json.loads((tmp_path / "fedkeeper.schema.json").read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    jsonschema.validate(yaml.safe_load(open("examples/paper.yaml")), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"model": {"epoch": 3}}, schema)


def test_store_of_an_unfinished_setup_is_not_offered_for_resume(tmp_path, capsys):
    store = LocalStore(tmp_path / "half")
    store.put("data/test.npz", b"partial")
    assert main(["run", "--resume", "--store", store.url]) == 2
    assert "holds no federation" in _one_clear_line(capsys.readouterr().err)


def test_a_folder_of_runs_is_not_taken_for_a_new_federation(two_runs, capsys):
    root, results = two_runs
    assert main(["run", "--store", str(root)]) == 2
    assert "needs a folder to itself" in _one_clear_line(capsys.readouterr().err)
    # A federation that is itself a root of others is never listed for removal.
    Federation(root)
    assert main(["runs", str(root), "--results", str(results), "--keep", "0", "--yes"]) == 0
    assert (root / "federation.json").exists() and not (root / "run-20260102-000000").exists()


def test_validated_config_shares_no_mutable_value_with_its_input():
    # Strategy parameters are validated numbers; a platform's options are free-form and may hold lists.
    raw = {"strategy": {"name": "fedprox", "params": {"mu": 0.1}}, "platforms": [{"name": "p", "options": {"x": [1, 2]}}]}
    cfg = config.from_dict(raw)
    cfg.platforms[0].options["x"].append(3)
    cfg.strategy.params["mu"] = 0.5
    assert raw == {"strategy": {"name": "fedprox", "params": {"mu": 0.1}}, "platforms": [{"name": "p", "options": {"x": [1, 2]}}]}
