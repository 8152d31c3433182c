"""The `fedkeeper` command: run, init, setup, status, report (and serve/deploy from the platforms package)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from fedkeeper import __version__
from fedkeeper.core import config as cfgmod
from fedkeeper.core import keys

STARTER = """\
# FedKeeper federation config. Every field is optional; the values shown are the defaults.
# Validate and run it with:  fedkeeper run --config {name}

name: fedkeeper
seed: 0                     # seeds data splits, client sampling and the initial model
rounds: 5                   # federated rounds
store: ./fedkeeper-data     # folder, s3://bucket/prefix or gs://bucket/prefix (overridden by --store)
# schedule: "*/10 * * * *"  # cron: start a round on this schedule (fedkeeper run --schedule)

model:
  name: nn                  # nn (Dense 500 -> classes) or cnn (Conv32-Pool-Conv64-Pool-Dense512)
  optimizer: adam           # adam or sgd
  learning_rate: 0.001
  batch_size: 10
  epochs: 2                 # local epochs per round
  jit_compile: true         # compile each client's training loop with XLA (same math, less time)
  steps_per_execution: 32   # training steps per compiled call (same batches and updates, less overhead)

data:
  dataset: digits           # digits (offline), mnist, fashion_mnist, cifar10, or npz:PATH
  partition: iid            # iid, shards (2 label shards per client), shards:K, dirichlet:ALPHA
  test_fraction: 0.2        # held out centrally for test accuracy (datasets without a test split)
  holdout_fraction: 0.1     # of each client's data, for federated evaluation

strategy:
  name: fedavg              # aggregation strategy (fedavg: example-weighted mean of the client models)
  params: {{}}                # the strategy's own parameters (fedavg takes none)
  fraction: 1.0             # share of clients selected per round
  min_clients: 1
  quorum: 0.5               # share of selected clients whose accepted updates make a new model
  deadline_s: 600           # a round closes at its deadline with the updates present
  max_update_mb: 256        # larger updates are rejected before they are downloaded
  norm_multiple: 4          # reject updates farther from the global model than 4x the round median (0: off)
  max_examples: 100000      # example-count cap for clients with their own data (others: their partition size)
  retries: 0                # re-invocations of a failed client while the deadline allows
  lease_s: 120              # an aggregator's claim expires after this long

# Each platform runs clients as functions. kind: local emulates one on this machine;
# openwhisk, openfaas, gcf and lambda call a deployed function at `endpoint`.
platforms:
  - {{name: openwhisk, kind: local, clients: 4, concurrency: 2, timeout_s: 300, memory_mb: 2048}}
  - {{name: openfaas,  kind: local, clients: 2, concurrency: 1, timeout_s: 300, memory_mb: 2048}}
  - {{name: gcf,       kind: local, clients: 4, concurrency: 2, timeout_s: 300, memory_mb: 2048}}

# Clients are generated from each platform's count (ids like gcf-000). You may also list
# clients explicitly, e.g. with their own data:
# clients:
#   - {{id: hospital-a, platform: gcf, data: "https://example.org/hospital-a.npz"}}
"""


def _err(msg: str) -> int:
    print(f"fedkeeper: error: {msg}", file=sys.stderr)
    return 2


def build_config(args: argparse.Namespace) -> cfgmod.FederationConfig:
    """Config file (if any) with command-line overrides applied, validated."""
    raw = cfgmod.load_file(args.config) if getattr(args, "config", None) else {}
    for name, section, field in (("rounds", None, "rounds"), ("seed", None, "seed"), ("epochs", "model", "epochs"),
                                 ("model", "model", "name"), ("dataset", "data", "dataset"),
                                 ("partition", "data", "partition")):
        value = getattr(args, name, None)
        if value is None:
            continue
        if section:
            raw.setdefault(section, {})
            if not isinstance(raw[section], dict):
                raise cfgmod.ConfigError(section, "expected a mapping", f"write {section}: as key: value lines")
            raw[section][field] = value
        else:
            raw[field] = value
    return cfgmod.from_dict(raw)


def _stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def cmd_run(args: argparse.Namespace) -> int:
    """Run a whole federation on the local runtime and write results and plots."""
    from fedkeeper.runtime import run as runmod
    from fedkeeper.store import open_store

    stamp = _stamp()
    if args.resume and not args.store:
        return _err("--resume needs --store pointing at the federation to continue")
    if args.resume:
        store = open_store(args.store)
        try:
            cfg = cfgmod.from_stored(store.get_json(keys.FEDERATION))
        except KeyError:
            return _err(f"{args.store} holds no federation.json; nothing to resume")
    else:
        cfg = build_config(args)
        url = args.store or (cfg.store if getattr(args, "config", None) and cfg.store != "./fedkeeper-data"
                             else f"./fedkeeper-data/run-{stamp}")
        store = open_store(url)
        cfg.store = store.url
    if args.schedule is not None:
        cfg.schedule = args.schedule or cfg.schedule
        if not cfg.schedule:
            return _err("--schedule needs a cron expression, in the config (schedule: \"*/5 * * * *\") or as --schedule EXPR")
        cfgmod.check_cron(cfg.schedule)
    elif not args.resume:
        cfg.schedule = ""
    out_dir = Path(args.out or f"./fedkeeper-runs/run-{stamp}")
    print(f"federation '{cfg.name}': {len(cfg.clients)} clients on "
          + ", ".join(f"{p.name} ({p.clients}, {p.kind})" for p in cfg.platforms)
          + f"; {cfg.rounds} rounds of {cfg.model.name} on {cfg.data.dataset}", file=sys.stderr)
    print(f"store: {store.url}", file=sys.stderr)
    print(f"results: {out_dir.resolve()}", file=sys.stderr)
    progress = runmod.Progress(cfg, quiet=args.quiet)
    try:
        results = runmod.run(cfg, store, resume=args.resume, progress=progress, timeout_s=args.timeout,
                             events_port=args.events_port)
    except runmod.RunError as exc:
        return _err(str(exc))
    from fedkeeper import report

    files = report.write(results, out_dir)
    print(runmod.summary_table(results))
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


SEAWEEDFS_TOML = """\
# SeaweedFS filer notifications for FedKeeper: put this file in the working directory of
# `weed` (or /etc/seaweedfs/) before starting it, then run fedkeeper with --events-port {port}.
[notification.webhook]
enabled = true
endpoint = "{url}"
event_types = ["create", "update"]
path_prefixes = ["/buckets/{bucket}/{prefix}rounds/"]
"""


def cmd_events_config(args: argparse.Namespace) -> int:
    """Print the store-side configuration that sends object events to `fedkeeper run --events-port`."""
    if not args.store.startswith("s3://"):
        return _err("events-config is for s3:// stores (SeaweedFS, MinIO); gs:// stores use events: client")
    bucket, _, prefix = args.store[5:].split("?", 1)[0].partition("/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    url = f"http://127.0.0.1:{args.port}/events"
    if args.server == "seaweedfs":
        print(SEAWEEDFS_TOML.format(url=url, bucket=bucket, prefix=prefix, port=args.port), end="")
    else:
        print(f"mc admin config set ALIAS notify_webhook:fedkeeper endpoint={url}\n"
              f"mc admin service restart ALIAS\n"
              f"mc event add ALIAS/{bucket} arn:minio:sqs::fedkeeper:webhook --event put --prefix {prefix}rounds/")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented starter config."""
    path = Path(args.path)
    if path.exists() and not args.force:
        return _err(f"{path} exists; pass --force to overwrite it or choose another path")
    path.write_text(STARTER.format(name=path.name))
    cfgmod.from_dict(cfgmod.load_file(str(path)))  # the starter must itself be valid
    print(f"wrote {path}; edit it, then: fedkeeper run --config {path}")
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    """Write a federation into a store without running it (for deployed platforms)."""
    from fedkeeper.federation import setup
    from fedkeeper.store import open_store

    cfg = build_config(args)
    store = open_store(args.store or cfg.store)
    cfg.store = store.url
    setup(cfg, store, progress=lambda s: print(s, file=sys.stderr))
    print(f"federation written to {store.url}; start a round with the trigger (POST /rounds) or `fedkeeper run --resume --store {store.url}`")
    return 0


def _collect(url: str):
    """(store, results rebuilt from it), or (store, None) when it holds no federation."""
    from fedkeeper import report
    from fedkeeper.store import NotFound, open_store

    store = open_store(url)
    try:
        return store, report.collect(store)
    except NotFound:
        return store, None


def cmd_status(args: argparse.Namespace) -> int:
    """Print the federation's state from the store alone."""
    store, results = _collect(args.store)
    if results is None:
        return _err(f"{args.store} holds no federation (no federation.json)")
    state = store.get_json_or(keys.STATE) or {}
    if args.json:
        print(json.dumps({"state": state, "rounds": [{k: r.get(k) for k in ("round", "status", "test_accuracy", "aggregations",
                                                                            "privacy")}
                                                     for r in results["rounds"]]}, indent=1))
        return 0
    fed = results["federation"]
    print(f"federation '{fed['name']}' in {store.url}")
    print(f"status: {state.get('status', '?')}, round {int(state.get('round', 0)) + 1} of {fed['rounds']}, "
          f"{state.get('rounds_done', 0)} done, global model {state.get('model')}")
    if results["final"].get("privacy"):
        from fedkeeper.runtime.run import _epsilon

        print("privacy:" + (_epsilon(results["final"]["privacy"]) or " differential privacy off")
              + (", secure aggregation" if results["final"]["privacy"].get("secure_aggregation") else ""))
    if isinstance(state.get("reason"), str) and state["reason"]:
        print(f"stopped: {state['reason']}")
    r = int(state.get("round", 0))
    if state.get("status") == "open" and store.exists(keys.manifest(r)):
        m = store.get_json(keys.manifest(r))
        have = len(store.list(keys.updates_prefix(r)))
        import time

        left = m["deadline"] - time.time()
        print(f"round {r + 1} open: {have}/{len(m['clients'])} updates, quorum {m['quorum']}, "
              f"deadline in {left:.0f} s" if left > 0 else f"round {r + 1} open and overdue: {have}/{len(m['clients'])} updates")
    from fedkeeper.runtime.run import format_round

    for rec in results["rounds"]:
        if rec["test_accuracy"] is not None:
            print("  " + format_round(rec, fed["rounds"]))
        else:
            print(f"  round {rec['round'] + 1}: {rec['status']}, evaluation pending")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild results.json and the plots from the store alone."""
    from fedkeeper import report

    _, results = _collect(args.store)
    if results is None:
        return _err(f"{args.store} holds no federation (no federation.json)")
    files = report.write(results, args.out)
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config (see `fedkeeper init`)")
    p.add_argument("--store", metavar="URL", help="folder, s3://bucket/prefix or gs://bucket/prefix "
                                                  "(default for run: a new folder under ./fedkeeper-data/)")
    p.add_argument("--rounds", type=int, help="federated rounds (default 5)")
    p.add_argument("--epochs", type=int, help="local epochs per round (default 2)")
    p.add_argument("--model", choices=cfgmod.MODELS, help="nn (default) or cnn")
    p.add_argument("--dataset", help="digits (default), mnist, fashion_mnist, cifar10 or npz:PATH")
    p.add_argument("--partition", help="iid (default), shards, shards:K or dirichlet:ALPHA")
    p.add_argument("--seed", type=int, help="seed for data split, sampling and initial model (default 0)")


def parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    ap = argparse.ArgumentParser(prog="fedkeeper", description="Federated learning on serverless platforms: "
                                 "clients and aggregator are functions, the object store holds all state.")
    ap.add_argument("--version", action="version", version=f"fedkeeper {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run a whole federation on this machine's local FaaS runtime",
                       description="Set up a federation in a store and run all its rounds on local worker pools that "
                                   "emulate the configured platforms. With no options: digits, the 2-layer NN, 10 "
                                   "clients on openwhisk/openfaas/gcf, 5 rounds.")
    _add_overrides(p)
    p.add_argument("--out", metavar="DIR", help="where results.json and plots go (default: ./fedkeeper-runs/run-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the federation already in --store")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (default 3600)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only a line per round")
    p.add_argument("--schedule", nargs="?", const="", metavar="CRON",
                   help="start each round on a cron schedule (the config's `schedule`, or CRON given here, "
                        "e.g. '*/5 * * * *') instead of right after the previous one")
    p.add_argument("--events-port", type=int, default=0, metavar="N",
                   help="port on 127.0.0.1 where a remote store posts object events (default: any free port; "
                        "see `fedkeeper events-config`)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("events-config", help="print the store-side config that posts object events to `fedkeeper run`")
    p.add_argument("server", choices=("seaweedfs", "minio"), help="the S3-compatible server")
    p.add_argument("--store", required=True, metavar="URL", help="the federation's s3://bucket/prefix")
    p.add_argument("--port", type=int, required=True, help="the --events-port given to fedkeeper run")
    p.set_defaults(func=cmd_events_config)
    p = sub.add_parser("init", help="write a commented starter config")
    p.add_argument("path", nargs="?", default="fedkeeper.yaml", help="where to write it (default fedkeeper.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("setup", help="write a federation (config, data, initial model) into a store without running it")
    _add_overrides(p)
    p.set_defaults(func=cmd_setup)
    p = sub.add_parser("status", help="print a federation's state from its store")
    p.add_argument("--store", required=True, metavar="URL", help="the federation's store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("report", help="rebuild results.json and plots from a store")
    p.add_argument("--store", required=True, metavar="URL", help="the federation's store")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=cmd_report)
    try:
        from fedkeeper.platforms.cli import add_commands
    except ImportError:
        pass
    else:
        add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedkeeper` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    ap = parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        args = ap.parse_args(["run"] + (argv if argv is not None else sys.argv[1:]))
    from fedkeeper.data import DataError
    from fedkeeper.federation import SetupError
    from fedkeeper.store import MissingExtra, StoreError

    try:
        return args.func(args)
    except cfgmod.ConfigError as exc:
        return _err(str(exc))
    except (DataError, SetupError, MissingExtra, StoreError, FileNotFoundError, ValueError) as exc:
        return _err(str(exc))
    except KeyboardInterrupt:
        print("\ninterrupted; the federation's state is in its store (resume with --resume --store URL)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
