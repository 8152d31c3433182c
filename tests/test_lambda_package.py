"""The Lambda plan read by the platform's own tools: `serverless package` (v3, config validation as errors) and cfn-lint.

Packaging runs offline with dummy credentials. Two things of the plan need the network and are swapped in
the copy that is packaged: the client's image build (ecr.images) becomes a prebuilt `image.uri`, and
serverless-python-requirements (which pip-installs the requirements into the zip) is left out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedkeeper.core import config
from fedkeeper.platforms import deploy
from tests import serverless_tools as sls

# One worker runs the module, so each plan is packaged once (`package`).
pytestmark = [pytest.mark.slow, pytest.mark.skipif(sls.missing() is not None, reason=str(sls.missing())),
              pytest.mark.xdist_group("lambda-package")]
ROOT = Path(__file__).resolve().parents[1]
CFN_LINT = Path(sys.executable).parent / "cfn-lint"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/fedkeeper-client@sha256:" + "0" * 64
# W3005 (a DependsOn that a Ref already implies) is in the framework's own output, not in anything the plan says.
FRAMEWORK_ONLY = {"W3005"}
S3_FEDERATION = {"store": "s3://fed-store/exp", "schedule": "*/5 * * * *", "client_access": "store",
                 "platforms": [{"name": "aws", "kind": "lambda", "clients": 4, "memory_mb": 3008, "timeout_s": 600}]}


def _paper_on_lambda() -> dict:
    """examples/paper.yaml with its cloud platform (GCF there) on AWS Lambda and an S3 store.

    As written, the paper's trigger and aggregator run on GCF and its store is gs://, so its Lambda plan holds
    nothing; this is the same federation with Lambda as the cloud.
    """
    raw = config.load_file(str(ROOT / "examples" / "paper.yaml"))
    for p in raw["platforms"]:
        if p.get("kind") == "gcf":
            p.update(kind="lambda", endpoint="", options={"region": "us-east-1"})
    return dict(raw, store="s3://my-fedkeeper-bucket/paper", client_access="store")


def configs() -> dict[str, config.FederationConfig]:
    """The configs whose Lambda plans are checked: the paper's, the default, and an all-Lambda S3 federation."""
    return {"paper": config.from_dict(_paper_on_lambda()),
            "default": config.from_dict({}),
            "s3": config.from_dict(S3_FEDERATION),
            "s3-existing-bucket": config.from_dict(
                dict(S3_FEDERATION, platforms=[dict(S3_FEDERATION["platforms"][0], options={"existing_bucket": True})]))}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """`serverless package` of a named config's plan, run once per config for the module."""
    done: dict[str, tuple[dict, dict]] = {}

    def get(name: str) -> tuple[dict, dict]:
        if name not in done:
            done[name] = packaged(tmp_path_factory.mktemp(name), configs()[name])
        return done[name]

    return get


def packaged(tmp_path: Path, cfg: config.FederationConfig) -> tuple[dict, dict]:
    """(plan, CloudFormation template) after `serverless package` of the plan."""
    plan = yaml.safe_load(deploy.plan_for(cfg, "lambda").files["serverless.yml"])
    doc = json.loads(json.dumps(plan))
    doc["plugins"].remove("serverless-python-requirements")
    doc["provider"].pop("ecr", None)
    for spec in doc["functions"].values():
        if "image" in spec:
            spec["image"] = {"uri": IMAGE}
    service = sls.service_dir(tmp_path / "service", doc)
    proc = sls.sls(["package", "--stage", "dev"], service, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Warning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    template = json.loads((service / ".serverless" / "cloudformation-template-update-stack.json").read_text())
    return plan, template


def lint(template_path: Path) -> list[dict]:
    """cfn-lint's findings on a template, as dicts."""
    proc = subprocess.run([str(CFN_LINT), "--format", "json", str(template_path)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode in (0, 2, 4, 6, 8, 10, 12, 14), proc.stderr[-2000:]
    return json.loads(proc.stdout or "[]")


def resources(template: dict, kind: str) -> dict:
    """Resources of one CloudFormation type, by logical id (without the framework's own deployment bucket)."""
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind and k != "ServerlessDeploymentBucket"}


@pytest.mark.skipif(not CFN_LINT.exists(), reason="cfn-lint is not installed: pip install -e '.[test]'")
@pytest.mark.parametrize("name", ["paper", "default", "s3"])
def test_plan_packages_and_lints_clean(name, package, tmp_path):
    plan, template = package(name)
    path = tmp_path / "template.json"
    path.write_text(json.dumps(template))
    findings = [f for f in lint(path) if f["Rule"]["Id"] not in FRAMEWORK_ONLY]
    assert findings == [], json.dumps(findings, indent=1)[:4000]
    fns = resources(template, "AWS::Lambda::Function")
    names = {f["Properties"]["FunctionName"] for f in fns.values()}
    # Deployed under the names the invoker calls, and nothing else (no custom-resource function).
    assert names == {spec["name"] for spec in plan["functions"].values()}
    assert all(f["Properties"].get("Runtime", "python3.11").startswith("python") for f in fns.values())
    routes = resources(template, "AWS::ApiGatewayV2::Route")
    # The HTTP API belongs to the trigger: a plan whose platform does not run it (the paper's control platform
    # is GCF) has no route at all.
    has_trigger = any("handler" in spec and "trigger" in spec["handler"] for spec in plan["functions"].values())
    assert [r["Properties"]["RouteKey"] for r in routes.values()] == (["ANY /{proxy+}"] if has_trigger else [])
    roles = resources(template, "AWS::IAM::Role")
    assert len(roles) >= 2  # one role per function with its own statements (serverless-iam-roles-per-function)


def test_s3_plan_wires_bucket_events_schedule_and_least_privilege(package):
    plan, template = package("s3")
    (bucket,) = resources(template, "AWS::S3::Bucket").values()
    assert bucket["Properties"]["BucketName"] == "fed-store"
    assert bucket["DeletionPolicy"] == "Retain" and bucket["UpdateReplacePolicy"] == "Retain"
    (notification,) = bucket["Properties"]["NotificationConfiguration"]["LambdaConfigurations"]
    rules = {r["Name"]: r["Value"] for r in notification["Filter"]["S3Key"]["Rules"]}
    assert notification["Event"] == "s3:ObjectCreated:*" and rules == {"prefix": "exp/rounds/", "suffix": ".safetensors"}
    target = notification["Function"]["Fn::GetAtt"][0]
    assert template["Resources"][target]["Properties"]["FunctionName"] == "fedkeeper-aggregator"
    (rule,) = resources(template, "AWS::Events::Rule").values()
    assert rule["Properties"]["ScheduleExpression"] == "cron(0/5 * * * ? *)"
    assert json.loads(rule["Properties"]["Targets"][0]["Input"])["source"] == "aws.events"
    client = next(f for f in resources(template, "AWS::Lambda::Function").values()
                  if f["Properties"]["FunctionName"] == "fedkeeper-client")
    assert client["Properties"]["PackageType"] == "Image" and client["Properties"]["MemorySize"] == 3008
    role = template["Resources"][client["Properties"]["Role"]["Fn::GetAtt"][0]]
    actions = {a for pol in role["Properties"]["Policies"] for st in pol["PolicyDocument"]["Statement"]
               for a in (st["Action"] if isinstance(st["Action"], list) else [st["Action"]]) if a.startswith("s3:")}
    assert actions == {"s3:GetObject", "s3:PutObject"}
    assert not resources(template, "Custom::S3")


def test_existing_bucket_option_brings_the_deprecated_node_runtime(tmp_path):
    """Why the plan creates the bucket by default: the framework's custom resource for an existing one runs nodejs18.x."""
    _, template = packaged(tmp_path, configs()["s3-existing-bucket"])
    assert resources(template, "Custom::S3") and not resources(template, "AWS::S3::Bucket")
    runtimes = {f["Properties"].get("Runtime") for f in resources(template, "AWS::Lambda::Function").values()}
    assert "nodejs18.x" in runtimes
    if CFN_LINT.exists():
        path = tmp_path / "template.json"
        path.write_text(json.dumps(template))
        assert "W2531" in {f["Rule"]["Id"] for f in lint(path)}  # cfn-lint: deprecated runtime
