"""The ``sflsim`` command line: run, validate, schema (and the commands later modules add).

This is the only layer that prints and exits. Every ``UserError`` (bad scenario key, type or
value, malformed ``--set``, missing dataset) becomes one line on stderr and exit code 2;
a diverged run (NaN/inf loss or parameter) one line and exit code 3; Ctrl-C becomes exit code
130 (SIGTERM 143) after the run has flushed and landed what it recorded. ``EPILOG`` and README.md
list the codes.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

from typing import Optional

from simulator import experiments, rundir
from simulator.errors import Terminated, UserError

EPILOG = """examples:
  sflsim run scenarios/quickstart.yaml
  sflsim run scenarios/quickstart.yaml --out runs/qs --seed 3 --set stop.rounds=5
  sflsim run scenarios/quickstart.yaml --set algorithm.name=splitfed_v2 --set time.server.capacity=null
  sflsim run scenarios/quickstart.yaml --out runs/qs --overwrite
  sflsim run scenarios/gas_fmnist.yaml --out runs/gas --checkpoint-every 20
  sflsim resume runs/gas --set stop.rounds=2000
  sflsim verify runs/qs
  sflsim validate scenarios/*.yaml
  sflsim schema > sflsim-scenario.schema.json
  sflsim memory --model opt-1.3b --cut 2 --batch 32 --seq-len 32
  sflsim compare scenarios/quickstart.yaml --algorithms splitfed_v1,splitfed_v2 --seeds 3 --out runs/cmp
  sflsim report runs/cmp
Scenario keys are documented in docs/scenarios.md.

exit codes:
  0    ok (compare/sweep: every run completed or diverged; diverged runs get a note line)
  1    a run failed (a bug or an unexpected error; compare/sweep: some run failed)
  2    bad input (scenario key, --set, flag, missing file or dataset, an unusable --out)
  3    run: the training diverged (NaN/inf); outputs and summary.json are kept
  130  interrupted (Ctrl-C); what was recorded is kept (run: summary.json says interrupted)
  143  terminated (SIGTERM, e.g. by a batch system); kept as for Ctrl-C
run --out DIR: the run is written beside DIR and moved into place when it ends; a DIR that holds
a run is refused (exit 2) unless --overwrite; every run's timeline is verified (sflsim verify)."""

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, the shell's convention


def _interrupted_code(e: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (raised as ``Terminated``, a KeyboardInterrupt)."""
    return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit code 2 (argparse's own code too)."""

    def error(self, message: str):  # pragma: no cover - exercised through the CLI tests
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set algorithm.lr_client=0.1 (repeatable; "
                        "the value is read as YAML; list items by index: time.episodes.0.factor=8)")
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")


def _checkpoint_every(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of rounds >= 1, got {text!r}")
    return n


def _add_checkpoint_arg(p: argparse.ArgumentParser, default: str = "default: none") -> None:
    p.add_argument("--checkpoint-every", type=_checkpoint_every, default=None, metavar="N",
                   help="write checkpoint.pt every N rounds (gas: global iterations), at the end and when "
                        f"interrupted, for sflsim resume ({default})")


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
                                   "summary.json and accuracy_vs_time.png to --out: into OUT.partial-<pid> "
                                   "beside it, moved into place when the run ends, then verified "
                                   "(sflsim verify).",
                       epilog="exit codes: 0 ok, 1 the run failed (a bug; it lands with traceback.txt), 2 bad "
                              "input (also an --out that holds a run, without --overwrite), 3 the training "
                              "diverged (NaN/inf; outputs kept, summary.json says where), 130 interrupted "
                              "(Ctrl-C), 143 terminated (SIGTERM)")
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--out", default=None, help="output folder (default: runs/<scenario file name>); "
                                               "must not hold files unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out, as a whole, once the new run completes or diverges (a "
                        "run that fails or is interrupted lands beside it as OUT.failed-<time> / "
                        "OUT.interrupted-<time>, and the old run stays)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--timing-only", action="store_true",
                   help="run the event timeline with no tensor work (same as --set timing_only=true): events.csv "
                        "as a training run writes it, metrics.csv with the round times and no accuracy, no "
                        "figure; stop.target_accuracy is refused (docs/timing-only.md)")
    _add_checkpoint_arg(p)
    _add_scenario_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "resume", help="continue an interrupted or stopped run from its checkpoint",
        description="Continue the run in RUN_DIR from its checkpoint.pt (sflsim run --checkpoint-every N; an\n"
                    "interrupted run checkpoints its last round end on the way out). The timeline is replayed\n"
                    "with no tensor work up to the checkpoint's round, checked byte for byte against RUN_DIR's\n"
                    "files, then training continues from the saved state: the result is the run a straight\n"
                    "run would have made, except summary.json's host-time fields and resumed_from\n"
                    "(docs/checkpoint.md). It replaces RUN_DIR when it completes; an interrupted or failed\n"
                    "resume lands beside it and RUN_DIR stays.",
        epilog="examples:\n  sflsim resume runs/gas\n  sflsim resume runs/qs --set stop.rounds=40\n"
               "exit codes: as for run; 2 also when RUN_DIR has no checkpoint, diverged, or --set names a key\n"
               "outside stop.*, name, description and threads",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder with checkpoint.pt")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="stop.KEY=VALUE",
                   help="a larger stop rule, e.g. --set stop.rounds=40 (repeatable; stop.*, name, description, "
                        "threads only)")
    _add_checkpoint_arg(p, "default: the interrupted run's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_resume)

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

    p = sub.add_parser("verify", help="check a run folder's timeline (what every run checks when it ends)",
                       description="Checks events.csv, metrics.csv, summary.json and scenario.yaml of a run "
                                   "folder: no overlapping compute per client or messages per link, server "
                                   "jobs within time.server.capacity, finite spans, rising sequence numbers, "
                                   "summary totals equal to the event log, monotone metrics (docs/verify.md).",
                       epilog="exit codes: 0 every invariant holds, 1 some does not (one line each), 2 not a "
                              "run folder")
    p.add_argument("run_dir", help="a run folder (sflsim run --out DIR, or DIR/runs/<id> of a batch)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "retime", help="re-price a finished run under another time model, without training again",
        description="Re-time a finished run: run the scenario of RUN_DIR with --set time.KEY=VALUE changes and\n"
                    "no tensor work, taking accuracy and losses from RUN_DIR. Writes a complete run folder\n"
                    "(scenario.yaml, events.csv, metrics.csv, client_rounds.csv, summary.json, figure) identical\n"
                    "to a full training run of the modified scenario except summary.json's host-time fields (host_runtime_s,\n"
                    "eval_host_s) and retimed_from. Only for splitfed_v1, splitfed_zo and mu_splitfed with a fixed tau, evaluated\n"
                    "by rounds (eval.every_rounds), stopped by rounds (or a target accuracy), and completed\n"
                    "(docs/retime.md). sweep and compare do this on their own for runs that differ only in time.*.",
        epilog="example: sflsim retime runs/base --set time.client.tiers.0.speed_factor=0.1 --out runs/base-slow\n"
               "exit codes: 0 ok, 1 the re-timing failed (a bug), 2 refused (another algorithm, a key outside\n"
               "time.*, eval.every_sim_s, stop.sim_time_s, a run that did not complete) or bad input",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a completed run folder (sflsim run --out DIR, or DIR/runs/<id> of a batch)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="time.KEY=VALUE",
                   help="a time-model change, e.g. --set time.server.capacity=2 (repeatable; keys under time. only)")
    p.add_argument("--out", required=True, help="output folder; must not hold files unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out once the re-timing completes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_retime)
    _add_memory_command(sub)
    add_batch_commands(sub)  # compare, sweep, report
    return parser


def cmd_run(args) -> int:
    from simulator.runner import divergence_warning_muted, run_scenario
    from simulator.scenario import load_scenario

    overrides = list(args.overrides) + (["timing_only=true"] if args.timing_only else [])
    scenario = load_scenario(args.scenario, overrides, seed=args.seed)
    out = Path(args.out) if args.out else Path("runs") / Path(args.scenario).stem
    _preflight_run(scenario, out, getattr(args, "overwrite", False))  # before any output is touched
    try:
        with divergence_warning_muted():  # said below, in one line
            result = run_scenario(scenario, out, progress=not args.no_progress, overwrite=args.overwrite,
                                  checkpoint_every=args.checkpoint_every)
    except KeyboardInterrupt as e:
        return _interrupted(e, out)
    return _report_run(result, scenario, out)


def _interrupted(e: KeyboardInterrupt, out: Path) -> int:
    """The line an interrupted run prints, and its exit code."""
    from simulator.checkpoint import CHECKPOINT
    from simulator.runner import landed_in

    where = landed_in(e)
    kept = f"what was recorded is in {where}/" if where else "nothing was recorded"
    if where is not None and where != out:
        kept += f" ({out}/ is unchanged)"
    if where is not None and (where / CHECKPOINT).is_file():
        kept += f"; continue it with: sflsim resume {where}"
    print(f"sflsim: interrupted; {kept}", file=sys.stderr)
    return _interrupted_code(e)


def _report_run(result, scenario, out: Path) -> int:
    """The lines a finished run prints, and its exit code."""
    s = result.summary
    if s.get("status") == "diverged":
        why = str(result.diverged) if result.diverged is not None else "diverged"
        print(f"sflsim: {why}; outputs kept in {out}/", file=sys.stderr)
        return EXIT_DIVERGED
    if s.get("timing_only"):
        print(f"{scenario.name}: {s['algorithm']} timing only: {s['rounds']} rounds, {s['sim_time_s']:.1f} s "
              f"simulated, {s['events']} events ({s['host_runtime_s']:.1f} s on this machine; stop: {s['stop_reason']})")
        print(f"outputs: {out}/ (metrics.csv with round times and no accuracy, events.csv, summary.json)")
        return 0
    acc = s["final_accuracy"]
    print(
        f"{scenario.name}: {s['algorithm']} reached {s.get('eval_data', 'test')} accuracy {acc:.4f} after "
        f"{s['rounds']} rounds, "
        f"{s['sim_time_s']:.1f} s simulated ({s['host_runtime_s']:.1f} s on this machine; stop: {s['stop_reason']})"
    )
    print(f"outputs: {out}/ (metrics.csv, events.csv, summary.json, accuracy_vs_time.png)")
    return 0


def cmd_resume(args) -> int:
    from simulator.checkpoint import prepare_resume, resumed_scenario
    from simulator.runner import divergence_warning_muted, resume_run

    out = Path(args.run_dir)
    scenario = resumed_scenario(out, args.overrides)
    plan = prepare_resume(out, scenario)  # refusals before anything runs
    try:
        with divergence_warning_muted():
            result = resume_run(out, args.overrides, progress=not args.no_progress,
                                checkpoint_every=args.checkpoint_every)
    except KeyboardInterrupt as e:
        return _interrupted(e, out)
    print(f"resumed {out} from round {plan.round} (simulated {plan.checkpoint['sim_time_s']:.1f} s)")
    return _report_run(result, scenario, out)


def cmd_retime(args) -> int:
    from simulator.retime import check_source, retime_run, retimed_scenario

    scenario = retimed_scenario(args.run_dir, args.overrides)
    check_source(Path(args.run_dir), scenario)
    out = Path(args.out)
    _preflight_run(scenario, out, args.overwrite)
    try:
        result = retime_run(scenario, args.run_dir, out, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt as e:
        print("sflsim: interrupted", file=sys.stderr)
        return _interrupted_code(e)
    s = result.summary
    print(f"{scenario.name}: {s['algorithm']} re-timed from {args.run_dir}: {s['rounds']} rounds, "
          f"{s['sim_time_s']:.1f} s simulated ({s.get('eval_data', 'test')} accuracy {s['final_accuracy']:.4f}; "
          f"{s['host_runtime_s']:.1f} s on this machine)")
    print(f"outputs: {out}/ (metrics.csv, events.csv, summary.json, accuracy_vs_time.png)")
    return 0


def _preflight_run(scenario, out: Path, overwrite: bool) -> None:
    """What ``run`` would refuse after it started, refused now (UserError: one line, exit 2).

    ``run_scenario`` runs ``preflight`` itself; checking here too puts the data and file errors
    before the output-folder one, in the order a user fixes them (cheap: milliseconds)."""
    from simulator.preflight import preflight

    preflight(scenario)
    rundir.check_out_dir(out, overwrite)


def cmd_validate(args) -> int:
    """Everything ``run`` checks before training: the schema, then ``preflight`` (files, sizes, draws)."""
    from simulator.preflight import preflight
    from simulator.scenario import load_scenario, to_yaml

    failed = 0
    for path in args.scenarios:
        try:
            s = load_scenario(path, args.overrides, seed=args.seed)
            preflight(s)
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


MEMORY_EPILOG = """examples:
  sflsim memory --model opt-1.3b --cut 2 --batch 32 --seq-len 32          (accounting on meta, ~30 s)
  sflsim memory --model opt-125m --cut 2 --batch 16 --seq-len 32 --measure (+ real CPU steps)
  sflsim memory --model opt --config '{"hidden_size": 64, "num_hidden_layers": 4, "ffn_dim": 128,
      "num_attention_heads": 4}' --cut 2 --batch 8 --seq-len 16 --measure --how tracker
What each column means and the paper's 8.02 / 5.64 / 1.05 GB: docs/memory.md."""

PAPER_GB = {"fedavg": 8.02, "fedlora": 5.64, "mu_splitfed": 1.05}  # OPT-1.3B on SST-2 (the paper)


def _add_memory_command(sub) -> None:
    p = sub.add_parser(
        "memory", help="client memory of FedAvg, FedLoRA, SplitFed and MU-SplitFed, side by side",
        description="Client memory of one training step for the same text model, cut, batch and "
                    "sequence length: accounted on the meta device (parameters, gradients, optimizer "
                    "state, activations, and the step's peak of live tensors) and, with --measure, "
                    "measured on a real step. Prints a Markdown table.",
        epilog=MEMORY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="opt-125m, opt-350m, opt-1.3b (published shapes, random weights), opt (with "
                        "--config or --local-path) or minilm")
    p.add_argument("--cut", type=int, default=2, help="transformer blocks on a split client (default 2)")
    p.add_argument("--batch", type=int, default=32, help="minibatch size B (default 32)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence L, all real (default 32)")
    p.add_argument("--config", default=None, metavar="JSON",
                   help='OPT sizes as JSON, e.g. \'{"preset": "opt-125m", "num_hidden_layers": 6}\'')
    p.add_argument("--local-path", default=None, help="directory of real OPT weights (opt only)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="some of fedavg fedlora splitfed mu_splitfed (default: all four)")
    p.add_argument("--measure", action="store_true",
                   help="also measure a real step per method (CPU: peak RSS growth in a fresh process; "
                        "needs the memory it reports, and minutes for OPT-1.3B)")
    p.add_argument("--how", choices=("rss", "tracker"), default="rss",
                   help="CPU measurement: rss (default) or tracker (live tensor bytes, in process)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (torch.cuda.max_memory_allocated)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="first-order optimizer")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--num-classes", type=int, default=2, help="classes of the head (default 2, SST-2)")
    p.add_argument("--unit", choices=("GB", "MB"), default="GB", help="1e9 (default) or 1e6 bytes")
    p.set_defaults(func=cmd_memory)


def cmd_memory(args) -> int:
    import math

    from models.text import OPT_PRESETS, TEXT_MODELS, num_layers
    from simulator.measure.memory import METHODS, memory_table

    if args.model not in TEXT_MODELS + tuple(OPT_PRESETS):
        raise UserError(f"--model: unknown model {args.model!r}; choose one of "
                        f"{', '.join(tuple(OPT_PRESETS) + TEXT_MODELS)}")
    config = None
    if args.config is not None:
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as e:
            raise UserError(f"--config: not valid JSON ({e.msg}): {args.config!r}") from None
        if not isinstance(config, (dict, str)):
            raise UserError(f"--config: expected a JSON object (or a preset name), got {args.config!r}")
    methods = [m for item in (args.methods or []) for m in item.split(",") if m] or None
    for m in methods or ():
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    for key in ("batch", "seq_len", "lora_r", "num_classes"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')}: must be a positive integer, got {getattr(args, key)}")
    try:
        n = num_layers(args.model, config, args.local_path)
    except ValueError as e:
        raise UserError(f"--config: {e}") from None
    if not 1 <= args.cut <= n - 1:
        raise UserError(f"--cut: {args.model} has {n} transformer blocks, so the cut must be in 1..{n - 1}, "
                        f"got {args.cut}")
    try:
        df = memory_table(args.model, cut=args.cut, batch=args.batch, seq_len=args.seq_len, config=config,
                          local_path=args.local_path, measure=args.measure, device=args.device, how=args.how,
                          methods=methods, dtype=args.dtype, optimizer=args.optimizer,
                          momentum=args.momentum, lora_r=args.lora_r, num_classes=args.num_classes)
    except ValueError as e:
        raise UserError(str(e)) from None
    unit = 1e9 if args.unit == "GB" else 1e6
    paper = args.model == "opt-1.3b" or (isinstance(config, dict) and config.get("preset") == "opt-1.3b"
                                         and len(config) == 1)
    cols = [("params_bytes", "params"), ("grads_bytes", "grads"), ("optimizer_bytes", "optimizer"),
            ("activation_bytes", "activations"), ("total_bytes", "sum"), ("peak_bytes", "peak")]
    if args.measure:
        cols.append(("measured_peak_bytes", "measured"))
    head = ["method"] + [f"{name} {args.unit}" for _, name in cols]
    if paper:
        head.append("paper GB (OPT-1.3B, SST-2)")
    print(f"Client memory of one training step: {args.model}, cut {args.cut} (split methods), batch "
          f"{args.batch}, sequence length {args.seq_len}, {args.dtype}, {args.optimizer} "
          f"({args.unit} = 10^{9 if args.unit == 'GB' else 6} bytes)")
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for _, row in df.iterrows():
        cells = [str(row["method"])]
        for col, _ in cols:
            v = float(row[col])
            cells.append("" if math.isnan(v) else f"{v / unit:.3f}")
        if paper:
            cells.append(f"{PAPER_GB[row['method']]:.2f}" if row["method"] in PAPER_GB else "")
        print("| " + " | ".join(cells) + " |")
    print()
    print("sum = params + grads + optimizer + activations; peak = the step's peak of live tensors, run on "
          "the meta device" + ("; measured = " + str(df.attrs.get("measured_with")) + " over a real step"
                               if args.measure else "") + ". See docs/memory.md.")
    return 0


def cmd_verify(args) -> int:
    """The timeline invariants of one run folder: "ok: N events checked", or one line per violation."""
    from simulator.verify import load_run, check

    data, missing = load_run(args.run_dir)
    violations = missing + check(data)
    if violations:
        for v in violations:
            print(f"{args.run_dir}: {v}")
        return EXIT_FAILED
    print(f"ok: {len(data.events)} events checked")
    return EXIT_OK


def cmd_list(args) -> int:
    """The registries: algorithms, datasets (and their kind), models (kind and valid cuts)."""
    from models.registry import MODELS
    from simulator.algorithms import ALGORITHMS
    from simulator.data import DATASETS

    print("algorithms:")
    for name, spec in ALGORITHMS.items():
        print(f"  {name:14s} {spec.summary}")
    print("datasets (kind):")
    for name, data in DATASETS.items():
        print(f"  {name:14s} {data.kind:6s} {data.summary}")
    print("models (kind, cuts):")
    for name, model in MODELS.items():
        print(f"  {name:14s} {model.kind:6s} {model.cut_range():11s} {model.summary}")
    return 0


# --------------------------------------------------------------------------------------------
# compare, sweep, report (the batch layer is simulator/experiments/, its folders simulator/rundir.py)
# --------------------------------------------------------------------------------------------
def _add_batch_args(p) -> None:
    p.add_argument("--out", default=None, help="output folder (default: runs/<file name>-<command>)")
    p.add_argument("--seeds", default=None, metavar="N|S1,S2,..",
                   help="N seeds from the scenario's seed on, or a comma-separated list of seeds")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[ALG:]KEY=VALUE",
                   help="override a scenario key for every run; with an ALG: (or ALG/VARIANT:) prefix only "
                        "for that algorithm's runs, e.g. --set mu_splitfed:algorithm.tau=2 (repeatable)")
    p.add_argument("--workers", type=int, default=None,
                   help="local Dask worker processes (default: one per core, at most one per run); "
                        "1 runs in this process without Dask")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="use an existing Dask scheduler (e.g. tcp://host:8786) instead of a local cluster")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: cores // workers locally; the scenario's own "
                        "setting with --scheduler)")
    p.add_argument("--overwrite", action="store_true",
                   help="re-run finished runs whose inputs changed (default: stop with an error)")
    p.add_argument("--no-retime", action="store_true",
                   help="train every run; by default runs that differ from another only in time.* keys are "
                        "re-timed from it (sflsim retime: same outputs, no training) where the algorithm allows")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what would be done; run nothing")
    p.add_argument("--report", action="store_true", help="write the report (sflsim report OUT) afterwards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


BATCH_EXIT_CODES = ("exit codes: 0 every run completed or diverged (diverged runs are results: a note line, "
                    "status diverged in runs.csv), 1 some run failed, 2 bad input, 130 interrupted (Ctrl-C), "
                    "143 terminated (SIGTERM)")


def add_batch_commands(sub) -> None:
    """Add ``compare``, ``sweep`` and ``report`` to the ``sflsim`` sub-command parsers."""
    p = sub.add_parser(
        "compare", help="run several algorithms (and variants) over seeds on one scenario",
        description="Every (algorithm[, variant], seed) on the same scenario; the same seed gives every "
                    "algorithm the same straggler realisation. Results in OUT/runs/<run id>/, statuses in "
                    "OUT/runs.csv; re-running the command skips finished runs. Variants and defaults can "
                    "be written in the scenario file: algorithms: [..], seeds: N, "
                    "variants: {ALG: {LABEL: {dotted.key: value}}} (see docs/analysis.md).",
        epilog=BATCH_EXIT_CODES)
    p.add_argument("scenario", help="scenario YAML file (may carry algorithms/seeds/variants/base keys)")
    p.add_argument("--algorithms", default=None, metavar="A,B,..",
                   help="comma-separated algorithm names (default: the file's algorithms:, else its algorithm)")
    _add_batch_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "sweep", help="run a grid of scenario keys (cartesian product) over seeds",
        description="A grid file has base: SCENARIO.yaml (relative to it), grid: {dotted.key: [values]}, and "
                    "optionally seeds: N, set: {dotted.key: value}. Re-running skips finished runs.",
        epilog=BATCH_EXIT_CODES)
    p.add_argument("grid", help="grid YAML file")
    _add_batch_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "select", help="the best grid point per algorithm of a sweep evaluated on a validation split",
        description="Per algorithm (and variant), the grid point with the best mean METRIC over its seeds. A point "
                    "with a diverged, failed or unfinished seed is never chosen; ties go to the point planned "
                    "first (the grid's order). Runs must have evaluated on a validation split (data.validation). "
                    "`sflsim compare S.yaml $(sflsim select DIR --args)` runs the choice (docs/analysis.md).")
    p.add_argument("dir", help="a sweep (or compare) output folder")
    p.add_argument("--metric", default="final_accuracy",
                   help="summary.json field: final_accuracy (default), best_accuracy, final_subset_accuracy, final_loss")
    p.add_argument("--out", default=None, help="write the selection as JSON to this file")
    p.add_argument("--args", action="store_true", help="print only the --set items of the choice, for a shell command")
    p.add_argument("--allow-test", action="store_true",
                   help="select on runs that evaluated on the test set (exploring only: that tunes on test)")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser(
        "report", help="figures, tables and report.md/.html for a compare or sweep folder",
        description="Writes DIR/report/: figures/*.png, tables/*.csv and *.md, report.md and report.html.")
    p.add_argument("dir", help="a compare or sweep output folder (or one run folder)")
    p.add_argument("--targets", default=None, metavar="A1,A2",
                   help="test-accuracy targets as fractions, e.g. 0.7,0.8 (default: the scenario's "
                        "stop.target_accuracy and the highest multiple of 0.05 every run reached)")
    p.add_argument("--baseline", default=None, help="the row speed-ups and paired differences are against "
                                                    "(an algorithm name or a row label; default: the first)")
    p.add_argument("--out", default=None, help="report folder (default: DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "study", help="a whole study: step sizes tuned on validation, experiments, reports (resumable)",
        description="Run a study file (e.g. scenarios/paper/study.yaml): 1. tuning: its step-size grids,\n"
                    "evaluated on a validation split, and the best point of each (OUT/selected.yaml);\n"
                    "2. experiments: its compare/sweep files with each method's selected step sizes; 3. reports.\n"
                    "Finished runs are reused: run the same command again to continue an interrupted study\n"
                    "(docs/reproduction.md).",
        epilog=BATCH_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study YAML file")
    p.add_argument("--out", default=None, help="output folder (default: runs/<study file name>)")
    p.add_argument("--stage", action="append", choices=("tuning", "experiments", "reports"), default=None,
                   help="run only this stage (repeatable; default: all three in order)")
    p.add_argument("--only", action="append", default=None, metavar="EXPERIMENT",
                   help="run only this experiment of the study (repeatable; its tunings still run)")
    p.add_argument("--workers", type=int, default=None, help="local Dask worker processes (1: in this process)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="a scenario key for every run of the study, after the study's own set: (repeatable; "
                        "e.g. --set device=cuda; use another --out: changed inputs are not mixed with runs made "
                        "without them)")
    p.add_argument("--dry-run", action="store_true", help="list the tunings and experiments and their runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_study)


def cmd_study(args) -> int:
    from simulator.experiments.study import STAGES, load_study, run_study

    study = load_study(args.study)
    study.overrides = tuple(study.overrides) + tuple(args.overrides)
    if args.only:
        missing = [n for n in args.only if n not in study.experiments]
        if missing:
            raise UserError(f"--only {missing[0]}: not an experiment of {args.study} "
                            f"({', '.join(study.experiments)})")
        keep = {n: e for n, e in study.experiments.items() if n in args.only}
        study.experiments = keep
        study.tuning = {n: t for n, t in study.tuning.items() if any(n in e.use for e in keep.values())}
    out = Path(args.out) if args.out else Path("runs") / Path(args.study).stem
    if args.dry_run:
        for t in study.tuning.values():
            print(f"tuning {t.name}: sweep {t.grid} -> {', '.join(t.apply_to)}")
        for e in study.experiments.values():
            print(f"experiment {e.name}: {e.kind} {e.file}" + (f" (step sizes of {', '.join(e.use)})" if e.use else ""))
        return 0
    try:
        result = run_study(study, out, stages=args.stage or STAGES, workers=args.workers, threads=args.threads,
                           progress=not args.no_progress)
    except KeyboardInterrupt as e:
        print(f"sflsim: interrupted; finished runs are kept in {out}/, run the same command again to continue",
              file=sys.stderr)
        return _interrupted_code(e)
    failed = sum(len(b.failed) for b in result["batches"].values())
    print(f"study {study.name}: done in {out}/ (selections in {out}/selected.yaml)")
    if failed:
        print(f"sflsim: {failed} runs failed; re-running the command retries them", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _parse_targets(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            v = float(part)
        except ValueError:
            raise UserError(f"--targets: {part!r} is not a number") from None
        if v > 1 and v <= 100:
            raise UserError(f"--targets: give accuracies as fractions (0.8, not {part.strip()})")
        if not 0 < v <= 1:
            raise UserError(f"--targets: {v} is not in (0, 1]")
        out.append(v)
    if not out:
        raise UserError("--targets: no targets given")
    return out


def cmd_compare(args) -> int:
    plan = experiments.plan_compare(args.scenario,
                                    algorithms=args.algorithms.split(",") if args.algorithms else None,
                                    seeds=args.seeds, overrides=args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.scenario).stem}-compare"
    return _run_cli(plan, out, args)


def cmd_sweep(args) -> int:
    plan = experiments.plan_sweep(args.grid, overrides=args.overrides, seeds=args.seeds)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.grid).stem}-sweep"
    return _run_cli(plan, out, args)


def _run_cli(plan: experiments.Plan, out: Path, args) -> int:
    dropped: dict[str, set[str]] = {}
    for s in plan.specs:
        dropped.setdefault(s.algorithm, set()).update(s.dropped_keys)
    for alg, keys in dropped.items():
        if keys:
            print(f"note: {alg} does not take {', '.join(sorted(keys))} from the base scenario; not carried over "
                  f"(dropped_keys in {rundir.RUN_META})", file=sys.stderr)
    sources = {} if args.no_retime else plan.retime_sources()
    if sources:
        adaptive = any(s.scenario.get("algorithm", {}).get("tau") == "adaptive" for s in plan.specs
                       if s.run_id in sources)
        print(f"{plan.kind}: {len(sources)} of {len(plan.specs)} runs differ from another run only in time.* keys: "
              f"they are re-timed from its trained run instead of trained (sflsim retime; --no-retime trains every "
              f"run); runs.csv says retimed_from"
              + ("; adaptive tau is re-timed only where the new time model keeps its step counts, else trained"
                 if adaptive else ""), file=sys.stderr)
    if args.dry_run:
        runs_dir = out / rundir.RUNS
        for s in plan.specs:
            state = rundir.run_state(runs_dir, s.run_id, s.fingerprint)
            what = {"complete": "skip (complete)", "changed": "re-run needs --overwrite (inputs changed)",
                    "missing": f"re-time from {sources[s.run_id]}" if s.run_id in sources else "run"}[state]
            print(f"{s.run_id}: {what}")
        print(f"{len(plan.specs)} runs planned in {out}/")
        return 0
    try:
        result = experiments.run_batch(plan, out, workers=args.workers, scheduler=args.scheduler,
                                       threads=args.threads, progress=not args.no_progress,
                                       overwrite=args.overwrite, command=sys.argv[:], retime=not args.no_retime)
    except KeyboardInterrupt as e:
        print(f"sflsim: interrupted; finished runs are kept in {out}/{rundir.RUNS}/, run the same command again to "
              "resume", file=sys.stderr)
        return _interrupted_code(e)
    n = len(result.outcomes)
    diverged = result.diverged
    print(f"{plan.kind}: {n} runs in {out}/ ({result.count('completed')} ran now, {result.count('reused')} "
          f"already complete, " + (f"{len(diverged)} diverged, " if diverged else "")
          + f"{len(result.failed)} failed); statuses in {out / rundir.RUNS_CSV}")
    for o in diverged:
        print(f"  {o['run_id']}: {o['error']} (outputs: {o['path']}/)", file=sys.stderr)
    if diverged:
        print(f"note: {len(diverged)} of {n} runs diverged: a result, not a failure (status diverged in "
              f"{rundir.RUNS_CSV}; the report leaves them out of means)", file=sys.stderr)
    for o in result.failed:
        print(f"  failed: {o['run_id']}: {o['error']} (traceback: {o['path']}/{rundir.TRACEBACK})", file=sys.stderr)
    if args.report:
        from analysis.report import write_report

        page = write_report(out)
        _print_summary(page.parent / "tables" / "summary.csv")
        print(f"report: {page} (figure: {page.parent / 'figures' / 'accuracy_vs_time.png'})")
    else:
        print(f"report: sflsim report {out}")
    if result.failed:
        print(f"sflsim: {len(result.failed)} of {n} runs failed; re-running the command retries them",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _print_summary(path: Path) -> None:
    """A short table on stdout: final accuracy and simulated time to each target, per run label."""
    import pandas as pd

    if not path.is_file():
        return
    t = pd.read_csv(path)
    targets = [c[len("time_to_"):-len("_mean")] for c in t.columns if c.startswith("time_to_") and c.endswith("_mean")]
    data = set(t["eval_data"].dropna()) if "eval_data" in t.columns else set()
    if data and data != {"test"}:  # a validation accuracy never reads as a test accuracy
        print(f"accuracy on: {' and '.join(sorted(data))} (validation: samples held out of the training set, "
              "data.validation)")
    head = f"{'run':<24} {'seeds':>5} {'final acc. (%)':>14}" + "".join(f" {'time to ' + f'{float(x):.0%}' + ' (s)':>17}"
                                                                      for x in targets)
    print(head)
    for _, r in t.iterrows():
        acc = "diverged" if r["n"] == 0 else f"{100 * r['final_accuracy_mean']:.1f}"
        cells = []
        for x in targets:
            v = r.get(f"time_to_{x}_mean")
            cells.append(f"{v:>17.1f}" if pd.notna(v) else f"{'not reached':>17}")
        print(f"{r['label']:<24} {int(r['n']):>5} {acc:>14}" + "".join(f" {c}" for c in cells))


def cmd_report(args) -> int:
    from analysis.report import write_report

    page = write_report(args.dir, targets=_parse_targets(args.targets), baseline=args.baseline,
                        out_dir=args.out)
    print(f"report: {page} (and {page.with_suffix('.html').name}, figures/, tables/)")
    _print_selection(page.parent / "selection.json")
    return 0


def _print_selection(path: Path) -> None:
    """The report's choice of grid point per algorithm, when it made one (runs on a validation split)."""
    chosen = (rundir.read_json(path) or {}).get("chosen") if path.is_file() else None
    if not chosen:
        return
    print(f"best by validation accuracy (selection: {path}):")
    for c in chosen:
        keys = ", ".join(f"{k}={v}" for k, v in (c["params"] or {}).items())
        print(f"  {c['label']}: " + (f"{keys} ({100 * c['value']:.2f}%)" if c["params"] is not None
                                     else "no point completed every seed"))


def cmd_select(args) -> int:
    from analysis.select import select_points

    sel = select_points(args.dir, metric=args.metric, allow_test=args.allow_test)
    if args.out:
        sel.write(args.out)
    if args.args:
        if sel.unselected:
            raise UserError(f"{args.dir}: no point of {', '.join(sel.unselected)} completed every seed; nothing to pass on")
        print(" ".join(f"--set {shlex.quote(item)}" for item in sel.set_items()))
        return 0
    print(f"{args.dir}: best by {sel.eval_data} {args.metric} ({sel.goal}imum mean over seeds):")
    for line in sel.lines():
        print(f"  {line}")
    if args.out:
        print(f"selection: {args.out}")
    return 0


def _sigterm_as_interrupt(signum, frame):  # pragma: no cover - exercised via subprocess
    raise Terminated


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
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        print("sflsim: interrupted", file=sys.stderr)
        return _interrupted_code(e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
