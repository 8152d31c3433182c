"""Deploy plans per platform: the manifests and commands that put the three functions and the cron in place."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedkeeper.core import config as cfgmod
from fedkeeper.platforms.invokers import function_name

ROOT = Path(__file__).resolve().parents[2]


class _Dumper(yaml.SafeDumper):
    """Plain YAML without anchors, so every manifest reads on its own."""

    def ignore_aliases(self, data) -> bool:
        return True


def _yaml(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


# The zip functions' dependencies on Lambda (trigger and aggregator import the same set there).
LAMBDA_REQUIREMENTS = "functions/aggregator/requirements-lambda.txt"
TOOLS = {"openwhisk": "wsk", "openfaas": "faas-cli", "gcf": "gcloud", "lambda": "serverless"}


class DeployError(RuntimeError):
    """A deploy cannot proceed; the message names what to install or fix."""


@dataclass
class Plan:
    """Files to write (path relative to the build folder -> text) and commands to run, in order."""

    platform: cfgmod.PlatformConfig
    files: dict[str, str] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # what must be set before the plan deploys as printed

    def render(self) -> str:
        """Human-readable dry run: every file and every command, after whatever is still missing."""
        out = [f"# deploy plan for platform '{self.platform.name}' ({self.platform.kind})"]
        if self.missing:
            out.append("# NOT DEPLOYABLE AS PRINTED; first set:")
            out.extend(f"#   - {m}" for m in self.missing)
        for note in self.notes:
            out.append(f"# {note}")
        for path, text in self.files.items():
            out.append(f"\n--- file: {path}\n{text.rstrip()}")
        out.append("\n--- commands:")
        out.extend(" ".join(shlex.quote(c) for c in cmd) for cmd in self.commands)
        return "\n".join(out) + "\n"


def _roles(cfg: cfgmod.FederationConfig, p: cfgmod.PlatformConfig) -> set[str]:
    roles = {"client"} if any(c.platform == p.name for c in cfg.clients) or cfg.eval_platform == p.name else set()
    if cfg.control == p.name:
        roles |= {"trigger", "aggregator"}
    return roles


def _memory(p: cfgmod.PlatformConfig, fn: str) -> int:
    return p.memory_mb if fn == "client" else min(p.memory_mb, 1024)


def _instance_flag(p: cfgmod.PlatformConfig, flag: str) -> list[str]:
    """The platform's flag for invocations per instance, when the config asks for more than one."""
    return [flag, str(p.instance_concurrency)] if p.instance_concurrency > 1 else []


def _env(cfg: cfgmod.FederationConfig) -> dict[str, str]:
    return {"FEDKEEPER_STORE": cfg.store, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def _bucket(cfg: cfgmod.FederationConfig) -> tuple[str, str]:
    from fedkeeper.store.events import root_of

    if cfg.store.startswith(("s3://", "gs://")):
        return root_of(cfg.store.split("?", 1)[0])
    return "BUCKET", ""


def openwhisk(cfg: cfgmod.FederationConfig, p: cfgmod.PlatformConfig) -> Plan:
    """wskdeploy-style manifest plus the wsk commands: zip actions for trigger/aggregator, a container for the client."""
    plan = Plan(p)
    image = p.options.get("image", "fedkeeper/client-openwhisk:latest")
    actions = {}
    for fn in sorted(_roles(cfg, p)):
        name = function_name(p, fn)
        action = {"function": f"build/{fn}.zip", "runtime": "python:3.11", "main": "main",
                  "limits": {"memorySize": _memory(p, fn), "timeout": int(p.timeout_s * 1000)},
                  "inputs": {"store": cfg.store}, "web-export": "raw"}
        if fn == "client":
            # TensorFlow exceeds OpenWhisk's action size limit: the client runs as a container action.
            action = {"docker": image, "function": "build/client.zip", "main": "main",
                      "limits": action["limits"], "inputs": action["inputs"]}
            plan.commands.append(["docker", "build", "-t", image, "-f", "deploy/openwhisk/Dockerfile.client", "."])
            plan.commands.append(["docker", "push", image])
            plan.commands.append(["wsk", "action", "update", name, "build/client.zip", "--docker", image,
                                  "--memory", str(_memory(p, fn)), "--timeout", str(int(p.timeout_s * 1000)),
                                  *_instance_flag(p, "--concurrency"), "--param", "store", cfg.store])
            if p.instance_concurrency > 1:
                action["limits"]["concurrency"] = p.instance_concurrency
        else:
            plan.commands.append(["wsk", "action", "update", name, f"build/{fn}.zip", "--kind", "python:3.11",
                                  "--web", "raw", "--memory", str(_memory(p, fn)), "--timeout", str(int(p.timeout_s * 1000)),
                                  "--param", "store", cfg.store])
        actions[name] = action
    manifest: dict = {"packages": {"fedkeeper": {"actions": actions}}}
    if "trigger" in _roles(cfg, p) and cfg.schedule:
        trig = "fedkeeper-tick"
        manifest["packages"]["fedkeeper"]["triggers"] = {trig: {"feed": "/whisk.system/alarms/alarm",
                                                                "inputs": {"cron": cfg.schedule,
                                                                           "trigger_payload": {"fedkeeper_tick": True}}}}
        manifest["packages"]["fedkeeper"]["rules"] = {"fedkeeper-tick-rule": {"trigger": trig, "action": function_name(p, "trigger")}}
        plan.commands.append(["wsk", "trigger", "update", trig, "--feed", "/whisk.system/alarms/alarm",
                              "--param", "cron", cfg.schedule, "--param", "trigger_payload", json.dumps({"fedkeeper_tick": True})])
        plan.commands.append(["wsk", "rule", "update", "fedkeeper-tick-rule", trig, function_name(p, "trigger")])
    plan.files["manifest.yaml"] = _yaml(manifest)
    plan.notes.append("actions are zips of functions/<fn>/ with the fedkeeper package copied in; their dependencies "
                      "(requirements-openwhisk.txt, staged as requirements.txt) go into a virtualenv/ folder at the zip's "
                      "root, built inside the python:3.11 runtime image, which the runtime activates")
    if "aggregator" in _roles(cfg, p):
        plan.notes.append(f"store events: point the MinIO/SeaweedFS webhook at "
                          f"{p.endpoint.rstrip('/')}/api/v1/web/{p.options.get('namespace', '_')}/default/{function_name(p, 'aggregator')}/events")
    return plan


def openfaas(cfg: cfgmod.FederationConfig, p: cfgmod.PlatformConfig) -> Plan:
    """stack.yml for the python3-http template, with cron-connector annotations on the trigger."""
    plan = Plan(p)
    functions = {}
    for fn in sorted(_roles(cfg, p)):
        spec: dict = {"lang": "python3-http", "handler": f"./build/{fn}", "image": p.options.get("image_prefix", "fedkeeper/") + f"{fn}:latest",
                      "environment": dict(_env(cfg), exec_timeout=f"{int(p.timeout_s)}s", write_timeout=f"{int(p.timeout_s)}s"),
                      "limits": {"memory": f"{_memory(p, fn)}Mi"}, "secrets": ["fedkeeper-token"]}
        if fn == "trigger" and cfg.schedule:
            spec["annotations"] = {"topic": "cron-function", "schedule": cfg.schedule}
        if fn == "client" and p.instance_concurrency > 1:
            spec["environment"]["max_inflight"] = str(p.instance_concurrency)
        if fn != "client" or cfg.client_access != "presigned":
            spec["secrets"].append("fedkeeper-store-credentials")
        functions[function_name(p, fn)] = spec
    stack = {"version": 1.0, "provider": {"name": "openfaas", "gateway": p.endpoint or "http://127.0.0.1:8080"},
             "functions": functions}
    plan.files["stack.yml"] = _yaml(stack)
    plan.commands.append(["faas-cli", "template", "store", "pull", "python3-http"])
    plan.commands.append(["faas-cli", "up", "-f", "stack.yml"])
    if cfg.schedule:
        plan.notes.append("scheduled rounds need the cron-connector installed in the cluster (arkade install cron-connector)")
    return plan


def gcf(cfg: cfgmod.FederationConfig, p: cfgmod.PlatformConfig) -> Plan:
    """gcloud commands: gen2 functions, a GCS finalize trigger for the aggregator, Cloud Scheduler, service accounts."""
    plan = Plan(p)
    region, project = p.options.get("region", "us-central1"), p.options.get("project", "PROJECT")
    bucket, prefix = _bucket(cfg)
    env = ",".join(f"{k}={v}" for k, v in _env(cfg).items())
    sa = {r: f"fedkeeper-{r}@{project}.iam.gserviceaccount.com" for r in ("control", "client")}
    roles = _roles(cfg, p)
    for account in (["control"] if "trigger" in roles else []) + (["client"] if "client" in roles else []):
        plan.commands.append(["gcloud", "iam", "service-accounts", "create", f"fedkeeper-{account}", "--project", project])
    if "trigger" in roles:
        plan.commands.append(["gcloud", "storage", "buckets", "add-iam-policy-binding", f"gs://{bucket}",
                              "--member", f"serviceAccount:{sa['control']}", "--role", "roles/storage.objectUser"])
    if "client" in roles and cfg.client_access != "presigned":
        # Without presigned URLs a client still only reads and creates objects; it cannot delete or overwrite claims.
        for role in ("roles/storage.objectViewer", "roles/storage.objectCreator"):
            plan.commands.append(["gcloud", "storage", "buckets", "add-iam-policy-binding", f"gs://{bucket}",
                                  "--member", f"serviceAccount:{sa['client']}", "--role", role])
    base = ["--gen2", "--runtime", "python311", "--region", region, "--project", project, "--set-env-vars", env]
    for fn, entry, account, trigger in (("trigger", "trigger", "control", ["--trigger-http"]),
                                        ("aggregator", "aggregator", "control", ["--trigger-http"]),
                                        ("aggregator", "aggregator_event", "control",
                                         ["--trigger-event-filters", "type=google.cloud.storage.object.v1.finalized",
                                          "--trigger-event-filters", f"bucket={bucket}"]),
                                        ("client", "client", "client", ["--trigger-http"])):
        if fn not in roles:
            continue
        name = function_name(p, fn) + ("-event" if entry == "aggregator_event" else "")
        memory = f"{_memory(p, fn)}Mi"
        # Serving several requests per instance needs a whole vCPU on GCF 2nd gen.
        shared = [*_instance_flag(p, "--concurrency"), "--cpu", "1"] if fn == "client" and p.instance_concurrency > 1 else []
        plan.commands.append(["gcloud", "functions", "deploy", name, *base, "--source", f"build/{fn}",
                              "--entry-point", entry, *trigger, "--memory", memory, *shared,
                              "--timeout", f"{int(min(p.timeout_s, 3600))}s", "--service-account", sa[account],
                              "--no-allow-unauthenticated"])
    if "trigger" in roles and cfg.schedule:
        plan.commands.append(["gcloud", "scheduler", "jobs", "create", "http", "fedkeeper-tick", "--location", region,
                              "--schedule", cfg.schedule, "--http-method", "POST",
                              "--uri", f"https://{region}-{project}.cloudfunctions.net/{function_name(p, 'trigger')}/tick",
                              "--oidc-service-account-email", sa["control"]])
    plan.notes.append(f"the aggregator's finalize trigger fires for every object in gs://{bucket}; "
                      f"it ignores keys outside {prefix}rounds/<r>/updates/ at once")
    return plan


def aws(cfg: cfgmod.FederationConfig, p: cfgmod.PlatformConfig) -> Plan:
    """serverless.yml: HTTP API and EventBridge schedule on the trigger, S3 ObjectCreated on the aggregator, an image client."""
    plan = Plan(p)
    on_s3 = cfg.store.startswith("s3://")
    bucket, prefix = _bucket(cfg)
    region = p.options.get("region", "us-east-1")
    arn = f"arn:aws:s3:::{bucket}"
    store_rw = [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": f"{arn}/{prefix}*"},
                {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": arn}] if on_s3 else []
    invoke = [{"Effect": "Allow", "Action": ["lambda:InvokeFunction"],
               "Resource": [f"arn:aws:lambda:{region}:*:function:{function_name(p, f)}" for f in ("trigger", "client", "aggregator")]}]
    client_policy = [] if cfg.client_access == "presigned" or not on_s3 else [
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"{arn}/{prefix}models/*", f"{arn}/{prefix}data/*",
                                                                     f"{arn}/{prefix}rounds/*/manifest.json",
                                                                     f"{arn}/{prefix}federation.json"]},
        {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": [f"{arn}/{prefix}rounds/*/updates/*",
                                                                     f"{arn}/{prefix}rounds/*/timings/*"]}]
    functions: dict = {}
    resources: dict = {}
    roles = _roles(cfg, p)
    if "trigger" in roles:
        events: list = [{"httpApi": {"method": "*", "path": "/{proxy+}"}}]
        if cfg.schedule:
            events.append({"schedule": {"rate": [f"cron({_aws_cron(cfg.schedule)})"], "input": {"source": "aws.events", "detail-type": "Scheduled Event"}}})
        # Explicit names: the Serverless Framework would otherwise deploy "<service>-<stage>-<key>", which the invoker cannot find.
        # 29 s: an HTTP API gives up on its integration at 30 s, so the function must answer before that.
        functions[function_name(p, "trigger")] = {"name": function_name(p, "trigger"),
                                                  "handler": "functions/trigger/lambda_function.handler", "memorySize": 512,
                                                  "timeout": 29, "events": events, "iamRoleStatements": store_rw + invoke}
        agg_events: list = []
        if on_s3:
            s3 = {"bucket": bucket, "event": "s3:ObjectCreated:*", "rules": [{"prefix": f"{prefix}rounds/"}, {"suffix": ".safetensors"}]}
            if p.options.get("existing_bucket"):
                # The framework wires an existing bucket through its own custom resource, which runs on nodejs18.x.
                s3["existing"] = True
                plan.notes.append("options.existing_bucket: the Serverless Framework v3 adds a nodejs18.x custom resource "
                                  "to attach the notification; AWS deprecated that runtime (see docs/platforms.md)")
            else:
                # The stack owns the bucket (no custom resource); Retain keeps the federation's data if the stack goes.
                alnum = "".join(ch for ch in bucket if ch.isascii() and ch.isalnum())
                logical = "S3Bucket" + alnum[:1].upper() + alnum[1:]  # the framework's logical id for the bucket
                resources[logical] = {"DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain"}
                plan.notes.append(f"the stack creates bucket {bucket} with the notification; deploy before `fedkeeper setup`, "
                                  "or set options.existing_bucket for a bucket that exists already")
            agg_events.append({"s3": s3})
        else:
            plan.notes.append(f"store {cfg.store} is not on S3: no S3 notification is deployed; use `events: client` "
                              "so clients tell the aggregator")
        functions[function_name(p, "aggregator")] = {
            "name": function_name(p, "aggregator"), "handler": "functions/aggregator/lambda_function.handler",
            "memorySize": _memory(p, "aggregator"), "timeout": int(min(p.timeout_s, 900)),
            "iamRoleStatements": store_rw + invoke, **({"events": agg_events} if agg_events else {})}
    if "client" in roles:
        # TensorFlow is over Lambda's 250 MB zip limit, so the client ships as a container image.
        functions[function_name(p, "client")] = {"name": function_name(p, "client"), "image": {"name": "client"}, "memorySize": _memory(p, "client"),
                                                 "timeout": int(min(p.timeout_s, 900)),
                                                 **({"iamRoleStatements": client_policy} if client_policy else {})}
    provider: dict = {"name": "aws", "runtime": "python3.11", "region": region, "environment": _env(cfg)}
    if "client" in roles:
        provider["ecr"] = {"images": {"client": {"path": ".", "file": "deploy/aws/Dockerfile.client"}}}
    doc = {"service": "fedkeeper", "frameworkVersion": "3", "configValidationMode": "error", "provider": provider,
           "plugins": ["serverless-python-requirements", "serverless-iam-roles-per-function"],
           # The trigger and the aggregator share one zip, so they share one requirements file.
           "custom": {"pythonRequirements": {"fileName": LAMBDA_REQUIREMENTS, "dockerizePip": "non-linux"}},
           "package": {"patterns": ["!**", "fedkeeper/**", "functions/trigger/**", "functions/aggregator/**",
                                    "!**/__pycache__/**"]},
           "functions": functions}
    if resources:
        doc["resources"] = {"extensions": resources}
    plan.files["serverless.yml"] = _yaml(doc)
    plan.commands.append(["serverless", "deploy", "--config", "serverless.yml", "--region", region])
    return plan


def _aws_cron(expr: str) -> str:
    """Unix cron (m h dom mon dow) to EventBridge's six fields (one of dom/dow must be '?')."""
    m, h, dom, mon, dow = (f.replace("*/", "0/") if f.startswith("*/") else f for f in expr.split()[:5])
    if dow == "*":
        dow = "?"
    elif dom == "*":
        dom = "?"
    return f"{m} {h} {dom} {mon} {dow} *"


PLANNERS = {"openwhisk": openwhisk, "openfaas": openfaas, "gcf": gcf, "lambda": aws}


def plan_for(cfg: cfgmod.FederationConfig, platform: str) -> Plan:
    """The plan for a platform given by name or by kind."""
    kind = {"aws": "lambda"}.get(platform, platform)
    chosen = next((p for p in cfg.platforms if p.name == platform and p.kind != "local"), None) or \
        next((p for p in cfg.platforms if p.kind == kind), None)
    if chosen is None:
        named = next((p for p in cfg.platforms if p.name == platform), None)
        if kind not in PLANNERS:
            if named is not None:
                raise ValueError(f"platform {named.name} is kind {named.kind}, which is not deployed (it runs in "
                                 f"`fedkeeper run`); set its kind to one of {', '.join(PLANNERS)}, or name a kind")
            raise ValueError(f"unknown platform {platform!r}: name one from the config or a kind "
                             f"({', '.join(PLANNERS)})")
        if named is not None:
            # A local platform named after the kind emulates it (the default config's gcf): deploy it for real.
            chosen = named.model_copy(update={"kind": kind})
            cfg.platforms[cfg.platforms.index(named)] = chosen
        else:
            chosen = cfgmod.PlatformConfig(name=kind, kind=kind)
            cfg.platforms.append(chosen)
        if all(p.kind == "local" for p in cfg.platforms if p is not chosen):
            cfg.control_platform = chosen.name  # nothing else is deployed to run the trigger and the aggregator
    plan = PLANNERS[chosen.kind](cfg, chosen)
    plan.missing.extend(_missing(cfg, chosen))
    return plan


def _missing(cfg: cfgmod.FederationConfig, p: cfgmod.PlatformConfig) -> list[str]:
    """What the printed plan still lacks to deploy and work: a reachable store of the right kind, a project."""
    out = []
    store = cfg.store
    if not store.startswith(("s3://", "gs://")):
        got = f"not the folder {store!r}" if store else "and none is set"
        out.append(f"store: deployed functions need an object store they can reach, s3://BUCKET/PREFIX or "
                   f"gs://BUCKET/PREFIX, {got}; pass --store or set store: in the config "
                   "(the plan shows BUCKET until then)")
    elif p.kind == "lambda" and not store.startswith("s3://"):
        out.append(f"store: the lambda plan grants S3 access and fires the aggregator on S3 ObjectCreated events, "
                   f"so it needs an s3:// store, not {store}; use an s3:// store for Lambda")
    elif p.kind == "gcf" and not store.startswith("gs://") and "aggregator" in _roles(cfg, p):
        out.append(f"store: the gcf plan grants bucket roles and fires the aggregator on GCS finalize events, so "
                   f"it needs a gs:// store, not {store}; use a gs:// store, or run the aggregator on another platform")
    if p.kind == "gcf" and not p.options.get("project"):
        out.append(f"platforms.{p.name}.options.project: the Google Cloud project to deploy into (the plan shows PROJECT)")
    return out


def apply(plan: Plan, build_dir: Path) -> None:
    """Write the plan's files, stage each function's code, and run its commands (the platform's CLI must be installed)."""
    tool = TOOLS[plan.platform.kind]
    if shutil.which(tool) is None:
        raise DeployError(f"{tool} is not installed; install it, or use --dry-run to print the plan")
    if plan.missing:
        raise DeployError("the plan cannot deploy yet; set " + "; ".join(plan.missing))
    build_dir.mkdir(parents=True, exist_ok=True)
    # Lambda packages from the service root (fedkeeper/ beside functions/); the others deploy one folder per function.
    shutil.copytree(ROOT / "fedkeeper", build_dir / "fedkeeper", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "functions", build_dir / "functions", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    for fn in ("trigger", "client", "aggregator"):
        dest = build_dir / "build" / fn
        shutil.copytree(ROOT / "functions" / fn, dest, dirs_exist_ok=True)
        shutil.copytree(ROOT / "fedkeeper", dest / "fedkeeper", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        # Each platform installs requirements.txt from the function's folder: stage that platform's own list.
        own = dest / f"requirements-{plan.platform.kind}.txt"
        if own.exists():
            shutil.copyfile(own, dest / "requirements.txt")
        if plan.platform.kind == "openwhisk":
            shutil.make_archive(str(build_dir / "build" / fn), "zip", dest)
    tools = ROOT / "deploy" / "aws" / "node_modules"
    if plan.platform.kind == "lambda" and tools.is_dir() and not (build_dir / "node_modules").exists():
        (build_dir / "node_modules").symlink_to(tools)  # the pinned framework plugins (npm ci in deploy/aws)
    for path, text in plan.files.items():
        (build_dir / path).write_text(text)
    for cmd in plan.commands:
        if subprocess.run(cmd, cwd=build_dir).returncode != 0:
            raise DeployError(f"`{' '.join(cmd)}` failed; fix its error above and run the deploy again (steps are idempotent)")
