"""The ``sflsim`` command line: run, validate, schema (and the commands later modules add).

This is the only layer that prints and exits. Every ``UserError`` (bad scenario key, type or
value, malformed ``--set``, missing dataset) becomes one line on stderr and exit code 2;
Ctrl-C becomes exit code 130 after the run has flushed what it recorded.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from simulator.errors import UserError

EPILOG = """examples:
  sflsim run scenarios/quickstart.yaml
  sflsim run scenarios/quickstart.yaml --out runs/qs --seed 3 --set stop.rounds=5
  sflsim run scenarios/quickstart.yaml --set algorithm.name=splitfed_v2 --set time.server.capacity=null
  sflsim validate scenarios/*.yaml
  sflsim schema > sflsim-scenario.schema.json
Scenario keys are documented in docs/scenarios.md."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit code 2 (argparse's own code too)."""

    def error(self, message: str):  # pragma: no cover - exercised through the CLI tests
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set algorithm.lr_client=0.1 (repeatable; "
                        "the value is read as YAML; list items by index: time.episodes.0.factor=8)")
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sflsim",
        description="Discrete-event wall-clock simulator for split federated learning with stragglers: "
                    "real PyTorch training, simulated time.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="run one scenario and write its traces, summary and plot",
                       description="Run one scenario. Writes scenario.yaml, metrics.csv, events.csv, "
                                   "summary.json and accuracy_vs_time.png to --out.")
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--out", default=None, help="output folder (default: runs/<scenario file name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_scenario_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check scenario files without running them")
    p.add_argument("scenarios", nargs="+", help="scenario YAML files")
    _add_scenario_args(p)
    p.add_argument("--print", dest="print_resolved", action="store_true",
                   help="print the resolved scenario (defaults filled in)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of scenario files (for editors)")
    p.add_argument("--out", default=None, help="write to this file instead of stdout")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("list", help="list algorithms, datasets and models")
    p.set_defaults(func=cmd_list)
    return parser


def cmd_run(args) -> int:
    from simulator.runner import run_scenario
    from simulator.scenario import load_scenario

    scenario = load_scenario(args.scenario, args.overrides, seed=args.seed)
    out = Path(args.out) if args.out else Path("runs") / Path(args.scenario).stem
    try:
        result = run_scenario(scenario, out, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"sflsim: interrupted; what was recorded is in {out}/", file=sys.stderr)
        return 130
    s = result.summary
    acc = s["final_accuracy"]
    print(
        f"{scenario.name}: {s['algorithm']} reached test accuracy {acc:.4f} after {s['rounds']} rounds, "
        f"{s['sim_time_s']:.1f} s simulated ({s['host_runtime_s']:.1f} s on this machine; stop: {s['stop_reason']})"
    )
    print(f"outputs: {out}/ (metrics.csv, events.csv, summary.json, accuracy_vs_time.png)")
    return 0


def cmd_validate(args) -> int:
    from simulator.scenario import load_scenario, to_yaml

    failed = 0
    for path in args.scenarios:
        try:
            s = load_scenario(path, args.overrides, seed=args.seed)
        except UserError as e:
            print(f"{path}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok ({s.algorithm.name} on {s.data.dataset}, {s.data.num_clients} clients)")
        if args.print_resolved:
            print(to_yaml(s))
    return 2 if failed else 0


def cmd_schema(args) -> int:
    from simulator.scenario import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


def cmd_list(args) -> int:
    from simulator.algorithms import ALGORITHMS
    from simulator.scenario import DATASET_NAMES, MODEL_NAMES

    print("algorithms:")
    for name, spec in ALGORITHMS.items():
        print(f"  {name:14s} {spec.summary}")
    print("datasets:  " + ", ".join(DATASET_NAMES))
    print("models:    " + ", ".join(MODEL_NAMES))
    return 0


def _sigterm_as_interrupt(signum, frame):  # pragma: no cover - exercised via subprocess
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # A terminated run (SIGTERM, e.g. from a batch system) keeps its outputs like Ctrl-C does.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserError as e:
        print(f"sflsim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sflsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
