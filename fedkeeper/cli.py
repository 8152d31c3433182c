"""The `fedkeeper` command: run, init, setup, status, report (and serve/deploy from the platforms package)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from fedkeeper import __version__, runs
from fedkeeper.core import config as cfgmod
from fedkeeper.core import keys
from fedkeeper.core import strategy as strategies

STARTER = """\
# yaml-language-server: $schema={schema}
# FedKeeper federation config. Every field is optional; the values shown are the defaults.
# Validate and run it with:  fedkeeper run --config {name}
# Editors with YAML language support complete and check this file from {schema}
# (rewrite it with: fedkeeper schema --out {schema}).

name: fedkeeper
seed: 0                     # seeds data splits, client sampling and the initial model
rounds: 5                   # federated rounds
# store: ./fedkeeper-data/my-federation   # where this federation lives: a folder, s3://bucket/prefix or
#                           # gs://bucket/prefix (--store overrides it). Unset: each `run` and `setup`
#                           # creates a new folder ./fedkeeper-data/run-TIME (list them: fedkeeper runs)
# schedule: "*/10 * * * *"  # cron: start a round on this schedule (fedkeeper run --schedule)

model:
  name: nn                  # nn (Dense 500 -> classes) or cnn (Conv32-Pool-Conv64-Pool-Dense512)
  optimizer: adam           # adam or sgd
  learning_rate: 0.001
  batch_size: 10
  epochs: 2                 # local epochs per round (0: clients send the global model back untrained)
  jit_compile: true         # compile each client's training loop with XLA (same math, less time)
  steps_per_execution: 32   # training steps per compiled call (same batches and updates, less overhead)

data:
  dataset: digits           # digits (offline), mnist, fashion_mnist, cifar10, or npz:PATH
  partition: iid            # iid, shards (2 label shards per client), shards:K, dirichlet:ALPHA
  test_fraction: 0.2        # held out centrally for test accuracy (datasets without a test split)
  holdout_fraction: 0.1     # of each client's data, for federated evaluation

strategy:
  name: fedavg              # aggregation strategy: every one and its parameters are listed at the end
  params: {{}}                # the strategy's own parameters (fedavg takes none), e.g. {{mu: 0.01}} for fedprox
  fraction: 1.0             # share of clients selected per round
  min_clients: 1
  quorum: 0.5               # share of selected clients whose accepted updates make a new model
  deadline_s: 600           # a round closes at its deadline with the updates present (auto: from history)
  max_update_mb: 256        # larger updates are rejected before they are downloaded
  norm_multiple: 4          # reject updates farther from the global model than 4x the round median (0: off)
  max_examples: 100000      # example-count cap for clients with their own data (others: their partition size)
  retries: 0                # re-invocations of a failed client while the deadline allows
  lease_s: 120              # an aggregator's claim expires after this long

selection:
  name: random              # random, compute_aware (fast and reliable first, every client within max_wait
                            # rounds, unexplored ones tried) or utility (data size x loss against duration)
  max_wait: 5               # a client unselected for this many rounds is picked first (0: off)
  deadline_percentile: 90   # with strategy.deadline_s: auto, a round's deadline is this percentile of its
  deadline_margin: 1.5      # clients' expected durations times the margin, between floor and cap
  deadline_floor_s: 10
  deadline_cap_s: 600

# Privacy is off unless set (needs: pip install -e '.[privacy]'; see docs/privacy.md):
# privacy:
#   dp:
#     mode: central           # off, central (noise on the sum), local (each client noises its own update)
#     clip_norm: 1.0          # L2 bound on each update's difference from the global model
#     noise_multiplier: 1.0   # noise std = noise_multiplier x clip_norm
#     delta: 1.0e-5           # epsilon is reported for this delta after every round
#     epsilon_budget: 8       # stop before epsilon would exceed this (0: no budget)
#   secure_aggregation: true  # clients upload masked updates; the aggregator sees only their sum

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


class CLIError(Exception):
    """Bad input found by the command line itself; the message names the problem and the fix."""


def _err(msg: str) -> int:
    print(f"fedkeeper: error: {msg}", file=sys.stderr)
    return 2


def _note(msg: str) -> None:
    print(f"fedkeeper: {msg}", file=sys.stderr)


# (command-line option, config section, field) for every override of a config value
OVERRIDES = (("rounds", None, "rounds"), ("seed", None, "seed"), ("epochs", "model", "epochs"),
             ("model", "model", "name"), ("dataset", "data", "dataset"), ("partition", "data", "partition"),
             ("strategy", "strategy", "name"))


def build_config(args: argparse.Namespace) -> cfgmod.FederationConfig:
    """Config file (if any) with command-line overrides applied, validated."""
    raw = cfgmod.load_file(args.config) if getattr(args, "config", None) else {}
    for name, section, field in OVERRIDES:
        value = getattr(args, name, None)
        if value is None:
            continue
        if section:
            if raw.get(section) is None:
                raw[section] = {}
            if not isinstance(raw[section], dict):
                raise cfgmod.ConfigError(section, "expected a mapping", f"write {section}: as key: value lines")
            raw[section][field] = value
        else:
            raw[field] = value
    return cfgmod.from_dict(raw)


def _stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _is_folder(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _folder(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()


def _shell(url: str) -> str:
    import shlex

    return shlex.quote(url)


def open_reader(url: str):
    """Open an existing federation's store for reading; a missing folder is an error and is never created."""
    from fedkeeper.store import open_store

    if _is_folder(url) and not _folder(url).is_dir():
        raise CLIError(f"no folder at {url}; check the path (`fedkeeper runs` lists the federations under "
                       f"{runs.DEFAULT_ROOT})")
    return open_store(url)


def _runs_below(url: str) -> list:
    return runs.find(_folder(url)) if _is_folder(url) else []


def _no_federation(url: str, command: str) -> CLIError:
    """The error for a store without federation.json, naming the runs found below a folder."""
    found = _runs_below(url)
    if found:
        names = ", ".join(r.path.name for r in found[-3:])
        return CLIError(f"{url} holds no federation.json itself, but {len(found)} run(s) below it ({names}); "
                        f"pass one as --store, e.g. fedkeeper {command} --store {_shell(str(found[-1].path))}")
    return CLIError(f"{url} holds no federation (no federation.json); check the store URL, or start one with "
                    "`fedkeeper run` or `fedkeeper setup`")


def new_store_url(args: argparse.Namespace, cfg: cfgmod.FederationConfig, stamp: str) -> str:
    """Where a new federation goes: --store, else the config's store, else ./fedkeeper-data/run-TIME."""
    return args.store or cfg.store or f"{runs.DEFAULT_ROOT}/run-{stamp}"


def _epochs_note(cfg: cfgmod.FederationConfig) -> None:
    if cfg.model.epochs == 0:
        _note("model.epochs is 0: clients train nothing and send the global model back, so the model and its "
              "accuracy stay at round 0's; such a run measures the round's overhead only")


def _resume_target(args: argparse.Namespace):
    """(store, config) of the federation `run --resume` continues, after checking the options can apply."""
    if not args.store:
        raise CLIError("--resume needs --store URL, the store of the federation to continue "
                       f"(`fedkeeper runs` lists the ones under {runs.DEFAULT_ROOT})")
    fixed = [f"--{n}" for n in ("config", "epochs", "model", "dataset", "partition", "seed")
             if getattr(args, n, None) is not None]
    if fixed:
        raise CLIError(f"{', '.join(fixed)} cannot change a federation already in its store; drop "
                       f"{'it' if len(fixed) == 1 else 'them'} to resume, or start a new federation without --resume")
    store = open_reader(args.store)
    raw = store.get_json_or(keys.FEDERATION)
    if raw is None:
        raise _no_federation(args.store, "run --resume")
    cfg = cfgmod.from_stored(raw)
    if args.rounds is not None and args.rounds != cfg.rounds:
        if args.rounds < cfg.rounds:
            raise CLIError(f"--rounds {args.rounds} is below the federation's {cfg.rounds} rounds; a resume can "
                           f"only add rounds: pass --rounds {cfg.rounds + 1} or more, or drop --rounds")
        _note(f"extending the federation from {cfg.rounds} to {args.rounds} rounds")
        cfg.rounds = args.rounds
        store.put_json(keys.FEDERATION, cfg.to_dict())
    return store, cfg


def _apply_schedule(args: argparse.Namespace, cfg: cfgmod.FederationConfig) -> None:
    """--schedule turns the config's (or its own) cron on; without it a new run starts rounds back to back."""
    if args.schedule is not None:
        cfg.schedule = args.schedule or cfg.schedule
        if not cfg.schedule:
            raise CLIError("--schedule needs a cron expression, in the config (schedule: \"*/5 * * * *\") or as "
                           "--schedule EXPR")
        cfgmod.check_cron(cfg.schedule)
    elif not args.resume:
        cfg.schedule = ""


def cmd_run(args: argparse.Namespace) -> int:
    """Run a whole federation on the local runtime and write results and plots."""
    from fedkeeper.federation import existing
    from fedkeeper.runtime import run as runmod
    from fedkeeper.store import open_store

    stamp = _stamp()
    created: Path | None = None
    if args.resume:
        store, cfg = _resume_target(args)
        _apply_schedule(args, cfg)
    else:
        cfg = build_config(args)
        _apply_schedule(args, cfg)
        url = new_store_url(args, cfg, stamp)
        if _is_folder(url) and not _folder(url).exists():
            created = _folder(url)
        elif _is_folder(url) and not (_folder(url) / keys.FEDERATION).exists() and _runs_below(url):
            raise CLIError(f"{url} holds runs of its own, and a new federation needs a folder to itself; "
                           f"pass --store {_shell(url.rstrip('/') + '/NAME')}, or leave --store out for a new "
                           f"{runs.DEFAULT_ROOT}/run-TIME")
        store = open_store(url)
        cfg.store = store.url
    _epochs_note(cfg)
    name = Path(store.url).name if _is_folder(store.url) else f"run-{stamp}"
    out_dir = Path(args.out or f"{runs.DEFAULT_OUT_ROOT}/{name}")
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
    except BaseException as exc:
        # A folder this command made for a setup that never finished holds nothing worth keeping.
        unfinished = created is not None and existing(store) is None
        if unfinished:
            import shutil

            shutil.rmtree(created, ignore_errors=True)
        if not isinstance(exc, KeyboardInterrupt):
            raise
        progress._clear()
        if existing(store) is None:
            if unfinished:
                print(f"\ninterrupted during setup; removed the unfinished {created}; nothing to resume: "
                      "run the same command again to start over", file=sys.stderr)
            else:
                print(f"\ninterrupted during setup; {store.url} holds no federation yet, so there is nothing to "
                      "resume: run the same command again to start over", file=sys.stderr)
        else:
            print(f"\ninterrupted; the federation's state is kept in its store. Resume with:\n"
                  f"  fedkeeper run --resume --store {_shell(store.url)}", file=sys.stderr)
        return 130
    files = _write_outputs(results, out_dir, args)
    print(runmod.summary_table(results))
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def _write_outputs(results: dict, out_dir: Path, args: argparse.Namespace) -> list:
    """results.json and plots, plus the HTML page and experiment-tracking records the options ask for."""
    from fedkeeper import report

    files = report.write(results, out_dir)
    if getattr(args, "html", False):
        files.append(report.write_html(results, out_dir))
    if getattr(args, "tensorboard", None):
        from fedkeeper import tracking

        files.append(tracking.tensorboard(results, args.tensorboard))
    if getattr(args, "mlflow", None):
        from fedkeeper import tracking

        run_id = tracking.mlflow(results, args.mlflow, artifacts=[f for f in files if f.suffix in (".png", ".json", ".html")])
        _note(f"logged to MLflow at {args.mlflow} (run {run_id})")
    return files


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
    if args.store.startswith("gs://"):
        return _err("events-config is for s3:// stores (SeaweedFS, MinIO); a gs:// store needs none: without "
                    "notifications, clients tell the aggregator (events: client, the default for gs://)")
    if not args.store.startswith("s3://"):
        return _err(f"events-config is for s3:// stores (SeaweedFS, MinIO); {args.store} is a folder store, whose "
                    "own events reach the aggregator with nothing to configure")
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


def _schema_name(config_path: Path) -> Path:
    return config_path.with_name(config_path.stem + ".schema.json")


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented starter config and, beside it, the JSON Schema editors complete it from."""
    path = Path(args.path)
    if path.is_dir():
        return _err(f"{path} is a folder; give the file to write, e.g. {path / 'fedkeeper.yaml'}")
    if path.exists() and not args.force:
        return _err(f"{path} exists; pass --force to overwrite it or choose another path")
    schema = _schema_name(path)
    path.write_text(STARTER.format(name=path.name, schema=schema.name) + "\n" + strategies.describe("# "))
    schema.write_text(json.dumps(cfgmod.json_schema(), indent=2) + "\n")
    cfgmod.from_dict(cfgmod.load_file(str(path)))  # the starter must itself be valid
    print(f"wrote {path} (and {schema.name} for editor completion); edit it, then: fedkeeper run --config {path}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print (or write) the JSON Schema of fedkeeper.yaml."""
    text = json.dumps(cfgmod.json_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}; point your editor at it, e.g. a first line "
              f"'# yaml-language-server: $schema={args.out}' in fedkeeper.yaml", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    """Write a federation into a store without running it (for deployed platforms)."""
    from fedkeeper.federation import setup
    from fedkeeper.store import open_store

    cfg = build_config(args)
    store = open_store(new_store_url(args, cfg, _stamp()))
    cfg.store = store.url
    _epochs_note(cfg)
    setup(cfg, store, progress=lambda s: print(s, file=sys.stderr))
    print(f"federation written to {store.url}; start a round with the trigger (POST /rounds) or "
          f"`fedkeeper run --resume --store {_shell(store.url)}`")
    return 0


def _collect(url: str):
    """(store, results rebuilt from it), or (store, None) when it holds no federation."""
    from fedkeeper import report
    from fedkeeper.store import NotFound

    store = open_reader(url)
    try:
        return store, report.collect(store)
    except NotFound:
        return store, None


def status_view(store, results: dict) -> dict:
    """What `status --json` prints; rounds are counted from 1, as everywhere a person reads them."""
    state = store.get_json_or(keys.STATE) or {}
    fed = results["federation"]
    view = {"federation": fed.get("name"), "store": store.url, "status": state.get("status", "set up"),
            "round": int(state.get("round", 0)) + 1, "rounds": fed.get("rounds"),
            "rounds_done": int(state.get("rounds_done", 0)), "global_model": state.get("model"),
            "history": [{k: r.get(k) for k in ("round", "status", "test_accuracy", "federated_accuracy", "aggregations",
                                               "privacy")}
                        for r in results["rounds"]],
            "privacy": results["final"].get("privacy"), "stop_reason": state.get("reason") or None}
    r = int(state.get("round", 0))
    if state.get("status") == "open" and store.exists(keys.manifest(r)):
        import time

        m = store.get_json(keys.manifest(r))
        view["open_round"] = {"round": r + 1, "updates": len(store.list(keys.updates_prefix(r))),
                              "selected": len(m["clients"]), "quorum": m["quorum"],
                              "deadline_in_s": round(m["deadline"] - time.time(), 1)}
    return view


def cmd_status(args: argparse.Namespace) -> int:
    """Print the federation's state from the store alone (or the runs below a folder that holds several)."""
    store, results = _collect(args.store)
    if results is None:
        found = _runs_below(args.store)
        if not found:
            raise _no_federation(args.store, "status")
        if args.json:
            print(json.dumps({"runs": [{"store": str(r.path), "status": r.status, "rounds_done": r.rounds_done,
                                        "rounds": r.rounds, "size_bytes": r.size} for r in found]}, indent=1))
        else:
            print(f"{args.store} holds {len(found)} federation(s), one per run; show one with "
                  f"fedkeeper status --store {_shell(str(found[-1].path))}\n")
            print(runs.table(found))
        return 0
    view = status_view(store, results)
    if args.json:
        print(json.dumps(view, indent=1))
        return 0
    print(f"federation '{view['federation']}' in {store.url}")
    print(f"status: {view['status']}, round {view['round']} of {view['rounds']}, "
          f"{view['rounds_done']} done, global model {view['global_model']}")
    if view.get("privacy"):
        from fedkeeper.runtime.run import _epsilon

        print("privacy:" + (_epsilon(view["privacy"]) or " differential privacy off")
              + (", secure aggregation" if view["privacy"].get("secure_aggregation") else ""))
    if isinstance(view.get("stop_reason"), str):
        print(f"stopped: {view['stop_reason']}")
    o = view.get("open_round")
    if o:
        print(f"round {o['round']} open: {o['updates']}/{o['selected']} updates, quorum {o['quorum']}, "
              f"deadline in {o['deadline_in_s']:.0f} s" if o["deadline_in_s"] > 0 else
              f"round {o['round']} open and overdue: {o['updates']}/{o['selected']} updates")
    from fedkeeper.runtime.run import format_round

    for rec in results["rounds"]:
        if rec["test_accuracy"] is not None:
            print("  " + format_round(rec, view["rounds"]))
        else:
            print(f"  round {rec['round']}: {rec['status']}, evaluation pending")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild results.json, the plots and (optionally) the HTML page and tracking records from the store alone."""
    _, results = _collect(args.store)
    if results is None:
        raise _no_federation(args.store, "report")
    files = _write_outputs(results, Path(args.out), args)
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """List the federations under a folder with their sizes, and remove old ones."""
    root = Path(args.root)
    if not root.is_dir():
        return _err(f"no folder at {root}; runs live under {runs.DEFAULT_ROOT} unless --store named another place")
    found = runs.find(root, args.results)
    doomed = []
    if args.remove:
        by_name = {r.path.name: r for r in found}
        unknown = [n for n in args.remove if n not in by_name]
        if unknown:
            return _err(f"no run named {', '.join(unknown)} under {root}; the runs are: "
                        f"{', '.join(by_name) or 'none'}")
        doomed = [by_name[n] for n in args.remove]
    if args.keep is not None:
        if args.keep < 0:
            return _err("--keep needs 0 or more (the number of newest runs to keep)")
        doomed += [r for r in found[:max(0, len(found) - args.keep)] if r not in doomed]
    if not doomed:
        print(runs.table(found) if found else f"no federations under {root}")
        return 0
    print(("removing" if args.yes else "would remove") + f" {len(doomed)} run(s):")
    print(runs.table(doomed))
    if not args.yes:
        print("nothing removed; add --yes to remove them (store folders and their results folders)")
        return 0
    for r in doomed:
        runs.remove(r)
    return 0


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config (see `fedkeeper init`)")
    p.add_argument("--store", metavar="URL", help="where the federation lives: folder, s3://bucket/prefix or "
                                                  "gs://bucket/prefix (default: the config's store, else a new "
                                                  "folder ./fedkeeper-data/run-TIME)")
    p.add_argument("--rounds", type=int, help="federated rounds (default 5; with --resume: extend to this many)")
    p.add_argument("--epochs", type=int, help="local epochs per round (default 2; 0 trains nothing, for overhead runs)")
    p.add_argument("--model", choices=cfgmod.MODELS, help="nn (default) or cnn")
    p.add_argument("--dataset", help="digits (default), mnist, fashion_mnist, cifar10 or npz:PATH")
    p.add_argument("--partition", help="iid (default), shards, shards:K or dirichlet:ALPHA")
    p.add_argument("--seed", type=int, help="seed for data split, sampling and initial model (default 0)")
    p.add_argument("--strategy", metavar="NAME", help="aggregation strategy (default fedavg; `fedkeeper init` lists them)")


def _add_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--html", action="store_true", help="also write report.html: one self-contained page with the "
                                                       "summary, plots, config and per-client table")
    p.add_argument("--tensorboard", metavar="DIR", help="write per-round scalars and histograms as TensorBoard "
                                                        "event files into DIR (view: tensorboard --logdir DIR)")
    p.add_argument("--mlflow", metavar="URI", help="log params, per-round metrics and the plots to an MLflow "
                                                   "tracking store, e.g. file:./mlruns or sqlite:///mlflow.db "
                                                   "(needs the mlflow extra)")


def parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    ap = argparse.ArgumentParser(prog="fedkeeper", description="Federated learning on serverless platforms: "
                                 "clients and aggregator are functions, the object store holds all state. "
                                 "Rounds are counted from 1 in everything printed and written for people.")
    ap.add_argument("--version", action="version", version=f"fedkeeper {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run a whole federation on this machine's local FaaS runtime",
                       description="Set up a federation in a store and run all its rounds on local worker pools that "
                                   "emulate the configured platforms. With no options: digits, the 2-layer NN, 10 "
                                   "clients on openwhisk/openfaas/gcf, 5 rounds, in a new folder "
                                   "./fedkeeper-data/run-TIME (list and clean them with `fedkeeper runs`).")
    _add_overrides(p)
    p.add_argument("--out", metavar="DIR", help="where results.json and plots go (default: ./fedkeeper-runs/ and the "
                                                "store folder's name, e.g. ./fedkeeper-runs/run-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the federation already in --store "
                                                         "(with --rounds N: extend it to N rounds)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (default 3600)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only a line per round")
    p.add_argument("--schedule", nargs="?", const="", metavar="CRON",
                   help="start each round on a cron schedule (the config's `schedule`, or CRON given here, "
                        "e.g. '*/5 * * * *') instead of right after the previous one")
    p.add_argument("--events-port", type=int, default=0, metavar="N",
                   help="port on 127.0.0.1 where a remote store posts object events (default: any free port; "
                        "see `fedkeeper events-config`)")
    _add_outputs(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("events-config", help="print the store-side config that posts object events to `fedkeeper run`")
    p.add_argument("server", choices=("seaweedfs", "minio"), help="the S3-compatible server")
    p.add_argument("--store", required=True, metavar="URL", help="the federation's s3://bucket/prefix")
    p.add_argument("--port", type=int, required=True, help="the --events-port given to fedkeeper run")
    p.set_defaults(func=cmd_events_config)
    p = sub.add_parser("init", help="write a commented starter config (and its JSON Schema for editors)")
    p.add_argument("path", nargs="?", default="fedkeeper.yaml", help="where to write it (default fedkeeper.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("schema", help="print the JSON Schema of fedkeeper.yaml (for editor completion and checks)")
    p.add_argument("--out", metavar="FILE", help="write it to FILE instead of printing it")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("setup", help="write a federation (config, data, initial model) into a store without running it")
    _add_overrides(p)
    p.set_defaults(func=cmd_setup)
    p = sub.add_parser("status", help="print a federation's state from its store (or list the runs below a folder)")
    p.add_argument("--store", required=True, metavar="URL", help="the federation's store")
    p.add_argument("--json", action="store_true", help="machine-readable output (rounds counted from 1)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("report", help="rebuild results.json and plots (and optionally HTML, TensorBoard, MLflow) from a store")
    p.add_argument("--store", required=True, metavar="URL", help="the federation's store")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_outputs(p)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("runs", help="list the federations under ./fedkeeper-data with their sizes; remove old ones",
                       description="Every `run` without --store keeps its federation in ./fedkeeper-data/run-TIME and "
                                   "its results in ./fedkeeper-runs/run-TIME. This lists them (size includes the "
                                   "results) and removes them: --keep N removes all but the N newest, --remove NAME "
                                   "removes named ones; nothing is removed without --yes.")
    p.add_argument("root", nargs="?", default=runs.DEFAULT_ROOT, help="folder holding the runs (default ./fedkeeper-data)")
    p.add_argument("--results", default=runs.DEFAULT_OUT_ROOT, metavar="DIR",
                   help="folder holding their results (default ./fedkeeper-runs)")
    p.add_argument("--keep", type=int, metavar="N", help="remove all but the N newest runs")
    p.add_argument("--remove", nargs="+", metavar="NAME", help="remove these runs (names as listed)")
    p.add_argument("--yes", action="store_true", help="really remove (otherwise only show what would go)")
    p.set_defaults(func=cmd_runs)
    from fedkeeper import clients

    clients.add_commands(sub)
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
    except (CLIError, DataError, SetupError, MissingExtra, StoreError, FileNotFoundError, IsADirectoryError,
            ValueError) as exc:
        return _err(str(exc))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
