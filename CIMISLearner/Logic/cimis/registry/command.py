"""``cimis models``: list, show, activate, delete, export and import registry versions."""

from __future__ import annotations

import json
from pathlib import Path

from cimis.registry.archive import check_import_source
from cimis.registry.store import Registry


def models_command(args) -> None:
    """``cimis models ACTION``: list, show, activate, delete, export, import (wired in cli.py)."""
    if args.action == "import":
        check_import_source(Path(args.source))  # before a missing registry is created for it
    registry = Registry.open(args.registry, create=args.action == "import")
    if args.action == "list":
        infos = registry.list()
        if args.json:
            print(json.dumps([i.to_json() for i in infos], indent=2))
            return
        if not infos:
            print(f"no versions in {registry.root}")
            return
        for i in infos:
            mark = "*" if i.active else " "
            note = f"  {i.note}" if i.note else ""
            print(f"{mark} {i.name}  {i.created:25}  {i.kind or '-':7}  {', '.join(i.classes)}{note}")
        return
    if args.action == "show":
        info = registry.info(args.version or "active")
        card = registry.verify(info.name)
        if args.json:
            print(json.dumps({**info.to_json(), "card": card, "checksums": "ok"}, indent=2))
            return
        print(f"{info.name}{' (active)' if info.active else ''}  {info.path}")
        print(f"  created   {info.created}")
        print(f"  kind      {info.kind or '-'}")
        classes = ", ".join(f"{c.get('name')} ({c.get('value')})" for c in card["classes"])
        print(f"  classes   {classes}")
        if info.note:
            print(f"  note      {info.note}")
        metrics = card.get("metrics", {}).get("validation", {})
        if metrics.get("dice"):
            dice = ", ".join(f"{k} {v:.3f}" if isinstance(v, (int, float)) else f"{k} -" for k, v in metrics["dice"].items())
            print(f"  dice      {dice}")
        print("  checksums ok")
        return
    if args.action == "activate":
        print(f"active version: {registry.activate(args.version)}")
    elif args.action == "delete":
        print(f"deleted {registry.delete(args.version)}")
    elif args.action == "export":
        print(f"exported {registry.resolve(args.version)} to {registry.export(args.version, args.out, args.overwrite)}")
    elif args.action == "import":
        name = registry.import_model(args.source, activate=args.activate)
        print(f"imported {args.source} as {name}{' (active)' if args.activate else ''}")
