"""`fedkeeper clients list|add|remove`: the federation's members and their history, read and changed in the store."""

from __future__ import annotations

import argparse
import json
import sys

from fedkeeper.core import history, keys


def view(store) -> dict:
    """Members and history as one JSON-ready record (rounds counted from 1, as everywhere people read them)."""
    from fedkeeper.functions import population
    from fedkeeper.functions.context import Context

    cfg = population.config(Context(store=store))
    hist = population.read_history(store)
    members = population.members(store, cfg)
    member_ids = {c["id"] for c in members}
    rows = []
    seen = set()
    for c in members + [{"id": cid, "platform": rec.get("platform", ""), "data": ""}
                        for cid, rec in sorted(hist["clients"].items())]:
        if c["id"] in seen:
            continue
        seen.add(c["id"])
        rec = hist["clients"].get(c["id"]) or {}
        exp = history.expected_duration(rec)
        last_sel = rec.get("last_selected")
        last_inc = rec.get("last_included")
        rows.append({
            "id": c["id"], "platform": c.get("platform") or rec.get("platform", ""),
            "member": c["id"] in member_ids, "data": c.get("data") or (keys.client_data(c["id"]) if c["id"] in member_ids else ""),
            "examples": rec.get("examples"), "selected": rec.get("selected", 0), "included": rec.get("included", 0),
            "rejected": rec.get("rejected", 0), "failures": rec.get("failures", 0), "timeouts": rec.get("timeouts", 0),
            "stragglers": rec.get("stragglers", 0),
            "last_selected": last_sel + 1 if isinstance(last_sel, int) else None,
            "last_included": last_inc + 1 if isinstance(last_inc, int) else None,
            "last_outcome": rec.get("last_outcome"), "last_train_loss": rec.get("last_train_loss"),
            "expected_s": exp, "reliability": history.reliability(rec) if rec else None,
            "recent_s": rec.get("durations", []), "phases": rec.get("phases", {}), "cold_start": rec.get("cold_start"),
        })
    return {"store": store.url, "rounds_recorded": hist["round"] + 1, "members": len(members), "clients": rows}


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def table(v: dict) -> str:
    """The clients view as an aligned text table."""
    head = ("client", "platform", "member", "examples", "sel", "incl", "rej", "fail", "t/o", "strag", "last",
            "expected s", "train loss")
    lines = [head]
    for c in v["clients"]:
        lines.append((c["id"], c["platform"], "yes" if c["member"] else "removed", _fmt(c["examples"]),
                      str(c["selected"]), str(c["included"]), str(c["rejected"]), str(c["failures"]),
                      str(c["timeouts"]), str(c["stragglers"]), _fmt(c["last_selected"]), _fmt(c["expected_s"], ".2f"),
                      _fmt(c["last_train_loss"], ".4f")))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in lines]
    out.append(f"{v['members']} members; history of {v['rounds_recorded']} round(s) ('last' counts rounds from 1)")
    return "\n".join(out)


def cmd_clients(args: argparse.Namespace) -> int:
    """List, add or remove clients in a federation's store."""
    from fedkeeper.cli import CLIError, _no_federation, open_reader
    from fedkeeper.functions import population
    from fedkeeper.functions.context import Context, HandlerError

    store = open_reader(args.store)
    if not store.exists(keys.FEDERATION):
        raise _no_federation(args.store, f"clients {args.action}")
    ctx = Context(store=store)
    try:
        if args.action == "list":
            v = view(store)
            print(json.dumps(v, indent=1) if args.json else table(v))
            return 0
        if args.action == "add":
            out = population.add_client(ctx, args.id, args.platform, args.data or "")
            print(f"added {out['client']} on {out['platform']} (data {out['data']}); it is selectable from round "
                  f"{out['from_round']}; {out['members']} members")
        else:
            out = population.remove_client(ctx, args.id)
            print(f"removed {out['client']} from round {out['from_round']} on (a running round keeps it); "
                  f"{out['members']} members")
    except HandlerError as exc:
        raise CLIError(str(exc)) from None
    if getattr(args, "json", False):
        print(json.dumps(out), file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    """Register `fedkeeper clients ...` on the CLI's subparsers."""
    p = sub.add_parser("clients", help="list a federation's clients with their history; add or remove clients",
                       description="Clients join and leave between rounds: a change applies from the next round, "
                                   "a running round keeps its clients, and a removed client's late update is "
                                   "recorded and ignored.")
    act = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = act.add_parser("list", help="members and their history (timings, failures, last participation, last loss)")
    q.add_argument("--store", required=True, metavar="URL", help="the federation's store")
    q.add_argument("--json", action="store_true", help="machine-readable output (rounds counted from 1)")
    q.set_defaults(func=cmd_clients)
    q = act.add_parser("add", help="add a client from the next round on")
    q.add_argument("id", help="client id: 1-64 letters, digits, '-', '_' or '.'")
    q.add_argument("--platform", required=True, help="the platform its function runs on (one of the config's)")
    q.add_argument("--data", help="its data: a store key ending in .npz or an http(s) URL (default data/ID.npz, "
                                  "which must exist)")
    q.add_argument("--store", required=True, metavar="URL", help="the federation's store")
    q.set_defaults(func=cmd_clients)
    q = act.add_parser("remove", help="remove a client from the next round on")
    q.add_argument("id", help="client id")
    q.add_argument("--store", required=True, metavar="URL", help="the federation's store")
    q.set_defaults(func=cmd_clients)
