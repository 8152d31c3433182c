"""Deploy plans, checked as a reviewer would: valid YAML, handlers that exist, triggers wired to the right functions."""

import shlex
from pathlib import Path

import pytest
import yaml

from fedkeeper.cli import main as cli_main
from fedkeeper.core import config
from fedkeeper.platforms import deploy

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "examples" / "paper.yaml"


def paper(**over):
    raw = config.load_file(str(PAPER))
    raw.update(over)
    return config.from_dict(raw)


def test_paper_example_is_the_papers_setup():
    cfg = paper()
    assert [(p.name, p.kind, p.clients, p.memory_mb) for p in cfg.platforms] == [
        ("openwhisk", "openwhisk", 7, 2048), ("openfaas", "openfaas", 3, 2048), ("gcf", "gcf", 93, 2048)]
    assert cfg.model.name == "cnn" and cfg.data.partition == "shards"


def test_openwhisk_plan_wires_alarm_to_trigger():
    cfg = paper(schedule="*/10 * * * *", control_platform="openwhisk")
    plan = deploy.plan_for(cfg, "openwhisk")
    manifest = yaml.safe_load(plan.files["manifest.yaml"])
    pkg = manifest["packages"]["fedkeeper"]
    assert set(pkg["actions"]) == {"fedkeeper-trigger", "fedkeeper-aggregator", "fedkeeper-client"}
    assert pkg["actions"]["fedkeeper-client"]["docker"]  # TensorFlow: container action
    assert pkg["actions"]["fedkeeper-client"]["limits"]["memorySize"] == 2048
    assert pkg["triggers"]["fedkeeper-tick"]["inputs"]["cron"] == "*/10 * * * *"
    assert pkg["rules"]["fedkeeper-tick-rule"] == {"trigger": "fedkeeper-tick", "action": "fedkeeper-trigger"}
    cmds = [c for c in plan.commands if c[0] == "wsk"]
    assert ["wsk", "rule", "update", "fedkeeper-tick-rule", "fedkeeper-tick", "fedkeeper-trigger"] in cmds
    assert all("--web" in c for c in cmds if c[:3] == ["wsk", "action", "update"] and c[3] != "fedkeeper-client")
    assert (ROOT / "deploy/openwhisk/Dockerfile.client").exists()


def test_openfaas_stack_has_cron_annotations_on_the_trigger_only():
    cfg = paper(schedule="0 * * * *", control_platform="openfaas")
    stack = yaml.safe_load(deploy.plan_for(cfg, "openfaas").files["stack.yml"])
    fns = stack["functions"]
    assert fns["fedkeeper-trigger"]["annotations"] == {"topic": "cron-function", "schedule": "0 * * * *"}
    assert "annotations" not in fns["fedkeeper-client"]
    for name, spec in fns.items():
        assert spec["lang"] == "python3-http"
        fn = name.split("-", 1)[1]
        assert (ROOT / "functions" / fn / "handler.py").exists()
    # presigned clients get no store credentials
    assert "fedkeeper-store-credentials" not in fns["fedkeeper-client"]["secrets"]
    assert stack["provider"]["gateway"] == "http://edge-gateway.example.org:8080"


def test_gcf_plan_finalize_trigger_and_scheduler():
    cfg = paper(schedule="*/15 * * * *")
    plan = deploy.plan_for(cfg, "gcf")
    deploys = {c[3]: c for c in plan.commands if c[:3] == ["gcloud", "functions", "deploy"]}
    event = deploys["fedkeeper-aggregator-event"]
    assert "--gen2" in event and event[event.index("--entry-point") + 1] == "aggregator_event"
    assert "type=google.cloud.storage.object.v1.finalized" in event and "bucket=my-fedkeeper-bucket" in event
    assert deploys["fedkeeper-client"][deploys["fedkeeper-client"].index("--memory") + 1] == "2048Mi"
    for name, cmd in deploys.items():
        entry = cmd[cmd.index("--entry-point") + 1]
        fn = cmd[cmd.index("--source") + 1].split("/")[-1]
        assert f"def {entry}(" in (ROOT / "functions" / fn / "main.py").read_text()
    sched = next(c for c in plan.commands if c[:3] == ["gcloud", "scheduler", "jobs"])
    assert sched[sched.index("--uri") + 1].endswith("/fedkeeper-trigger/tick")
    # presigned clients get no bucket role
    assert not any("fedkeeper-client@" in " ".join(c) and "add-iam-policy-binding" in c for c in plan.commands)


def test_aws_serverless_yml_routes_events():
    cfg = config.from_dict({"store": "s3://fed/exp", "schedule": "*/5 * * * *",
                            "platforms": [{"name": "aws", "kind": "lambda", "clients": 4, "memory_mb": 3008,
                                           "timeout_s": 600}]})
    doc = yaml.safe_load(deploy.plan_for(cfg, "aws").files["serverless.yml"])
    fns = doc["functions"]
    trig, agg, client = fns["fedkeeper-trigger"], fns["fedkeeper-aggregator"], fns["fedkeeper-client"]
    assert {"httpApi": {"method": "*", "path": "/{proxy+}"}} in trig["events"]
    assert any("schedule" in e and e["schedule"]["rate"] == ["cron(0/5 * * * ? *)"] for e in trig["events"])
    s3 = agg["events"][0]["s3"]
    assert s3["bucket"] == "fed" and s3["event"] == "s3:ObjectCreated:*" and {"prefix": "exp/rounds/"} in s3["rules"]
    assert client["image"] == {"name": "client"} and client["memorySize"] == 3008 and client["timeout"] == 600
    for spec in (trig, agg):
        module, func = spec["handler"].rsplit(".", 1)
        assert f"def {func}(" in (ROOT / (module + ".py")).read_text()
    # least privilege: the client may read models and data and write only updates
    actions = {a for st in client["iamRoleStatements"] for a in st["Action"]}
    assert actions == {"s3:GetObject", "s3:PutObject"}
    puts = next(st for st in client["iamRoleStatements"] if st["Action"] == ["s3:PutObject"])["Resource"]
    assert all("/rounds/*/" in r for r in puts)


@pytest.mark.parametrize("platform", ["openwhisk", "openfaas", "gcf", "lambda"])
def test_cli_dry_run_prints_files_and_commands(platform, capsys):
    assert cli_main(["deploy", platform, "--config", str(PAPER), "--schedule", "*/10 * * * *", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--- commands:" in out
    commands = out.split("--- commands:\n", 1)[1].strip().splitlines()
    assert commands and all(shlex.split(c)[0] in ("wsk", "docker", "faas-cli", "gcloud", "serverless") for c in commands)
    for block in out.split("--- file: ")[1:]:
        name, text = block.split("\n", 1)
        yaml.safe_load(text.split("\n--- commands:")[0])


def test_deploy_without_the_platform_cli_says_what_to_install(tmp_path, capsys):
    code = cli_main(["deploy", "openfaas", "--config", str(PAPER), "--build-dir", str(tmp_path)])
    assert code == 2 and "faas-cli is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 3])
def test_instance_concurrency_reaches_each_platforms_deploy_flag(n):
    # Prepare: the paper's three platforms, each client instance serving n invocations at once.
    raw = config.load_file(str(PAPER))
    for p in raw["platforms"]:
        p["instance_concurrency"] = n
    cfg = config.from_dict(raw)

    # Execute
    gcf = {c[3]: c for c in deploy.plan_for(cfg, "gcf").commands if c[:3] == ["gcloud", "functions", "deploy"]}
    ow = deploy.plan_for(cfg, "openwhisk")
    ow_cmd = next(c for c in ow.commands if c[:4] == ["wsk", "action", "update", "fedkeeper-client"])
    ow_limits = yaml.safe_load(ow.files["manifest.yaml"])["packages"]["fedkeeper"]["actions"]["fedkeeper-client"]["limits"]
    faas = yaml.safe_load(deploy.plan_for(cfg, "openfaas").files["stack.yml"])["functions"]["fedkeeper-client"]

    # Assert: the flag appears on the client function only, and only when asked for.
    client = gcf["fedkeeper-client"]
    if n == 1:
        assert "--concurrency" not in client and "--concurrency" not in ow_cmd
        assert "concurrency" not in ow_limits and "max_inflight" not in faas["environment"]
    else:
        assert client[client.index("--concurrency") + 1] == "3" and client[client.index("--cpu") + 1] == "1"
        assert ow_cmd[ow_cmd.index("--concurrency") + 1] == "3" and ow_limits["concurrency"] == 3
        assert faas["environment"]["max_inflight"] == "3"
    assert all("--concurrency" not in c for name, c in gcf.items() if name != "fedkeeper-client")
