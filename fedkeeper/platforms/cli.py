"""The `serve` and `deploy` subcommands of the fedkeeper CLI."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a function on 127.0.0.1 as its platform would call it."""
    from fedkeeper.platforms import serve

    if args.store:
        os.environ["FEDKEEPER_STORE"] = args.store
    if args.token:
        os.environ["FEDKEEPER_TOKEN"] = args.token
    auth = os.environ.get(args.auth_env) if args.auth_env else None
    serve.serve(args.function, args.platform, args.port, target=args.target, auth=auth)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Print (--dry-run) or apply the deploy plan of one platform."""
    from fedkeeper.core import config as cfgmod
    from fedkeeper.platforms import deploy

    raw = cfgmod.load_file(args.config) if args.config else {}
    if args.store:
        raw["store"] = args.store
    if args.schedule:
        raw["schedule"] = args.schedule
    cfg = cfgmod.from_dict(raw)
    plan = deploy.plan_for(cfg, args.platform)
    if args.dry_run:
        sys.stdout.write(plan.render())
        return 0
    try:
        deploy.apply(plan, Path(args.build_dir))
    except deploy.DeployError as exc:
        print(f"fedkeeper: error: {exc}", file=sys.stderr)
        return 2
    print(f"deployed {args.platform}; build files in {args.build_dir}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `serve` and `deploy` on the main parser's subcommands."""
    p = sub.add_parser("serve", help="serve a function on 127.0.0.1 exactly as a platform would call it",
                       description="GCF: functions-framework; lambda: the Invoke API and a Function URL front; "
                                   "openwhisk: action invokes and raw web actions; openfaas: a gateway for python3-http.")
    p.add_argument("function", choices=("trigger", "client", "aggregator", "all"),
                   help="the function, or all of them behind one gateway (not for gcf)")
    p.add_argument("--platform", required=True, choices=("gcf", "lambda", "openwhisk", "openfaas"))
    p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
    p.add_argument("--store", help="the federation's store (sets FEDKEEPER_STORE)")
    p.add_argument("--token", help="bearer token the HTTP API requires (sets FEDKEEPER_TOKEN)")
    p.add_argument("--target", help="gcf: the entry point in main.py (e.g. aggregator_event for CloudEvents)")
    p.add_argument("--auth-env", help="openwhisk/openfaas: env var holding the credential invokes must present")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("deploy", help="deploy the functions to a platform (or print the plan with --dry-run)")
    p.add_argument("platform", help="a platform name from the config, or a kind: openwhisk, openfaas, gcf, lambda")
    p.add_argument("--config", metavar="FILE", help="the federation config")
    p.add_argument("--store", help="override the config's store")
    p.add_argument("--schedule", help="cron for scheduled rounds (overrides the config)")
    p.add_argument("--dry-run", action="store_true", help="print every manifest and command instead of applying them")
    p.add_argument("--build-dir", default="./fedkeeper-deploy", help="where manifests and staged code go")
    p.set_defaults(func=cmd_deploy)
