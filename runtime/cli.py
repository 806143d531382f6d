"""The ``edgesplit`` command.

::

    edgesplit demo                                   # the main job: split a model 3 ways on loopback, report
    edgesplit up --workers 3                         # a local cluster until Ctrl-C
    edgesplit up --workers 4 --replicas 2            # 2 stages, each on 2 workers (a loss costs no request)
    edgesplit infer --coordinator tcp://127.0.0.1:5555 --model vit_tiny_patch16_224 --input x.npy
    edgesplit link --coordinator tcp://127.0.0.1:5555 --model vit_tiny_patch16_224 --cut 0 --budget 8
    edgesplit plan vit_tiny_patch16_224 --coordinator tcp://127.0.0.1:5555 --deploy   # measured placement
    edgesplit deploy vit_tiny_patch16_224 --coordinator tcp://127.0.0.1:5555 --stages 2   # or --plan FILE
    edgesplit status --coordinator tcp://127.0.0.1:5555 [--json]                      # workers, memory, routes
    edgesplit undeploy vit_tiny_patch16_224 --coordinator tcp://127.0.0.1:5555
    edgesplit --log-level debug infer ...                                            # any command's logs

    # three boards: one coordinator, one worker per board, keyed (see README "Security")
    edgesplit keygen --role coordinator --out keys && edgesplit keygen --role worker --name board1 --out keys
    edgesplit partition vit_tiny_patch16_224 --store ./store
    edgesplit coordinator --bind tcp://*:5555 --store ./store --keys coord-keys/
    edgesplit worker --coordinator tcp://10.0.0.1:5555 --bind tcp://*:5600 --store ./ws --keys board1-keys/

Subcommands' arguments are only built for the subcommand being run, so ``edgesplit --help``
imports nothing heavy. A user's mistake (a bad flag, endpoint, file or config key: a
``UsageError``) ends with one line ``edgesplit CMD: error: ...`` on stderr and exit status 2;
any other edgesplit error with one such line and status 1; a bug keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

Adder = Callable[[argparse.ArgumentParser], None]
Runner = Callable[[argparse.Namespace], int]
LOG_LEVELS = ["debug", "info", "warning", "error"]
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"  # the daemons' format too
DAEMONS = ("worker", "coordinator")


def _config_file_arg(p: argparse.ArgumentParser, section: str) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"JSON or TOML file of settings (a [{section}] table or top-level keys); flags override it; "
                        "unknown keys are an error")


def _build(cls: type, args: argparse.Namespace, section: str) -> Any:
    from .config import from_args, from_env, from_mapping, load_file

    base = from_mapping(cls, load_file(args.config, section)) if getattr(args, "config", None) else cls()
    from .endpoints import check_config_endpoints

    cfg = from_args(cls, args, from_env(cls, base))  # defaults < file < EDGESPLIT_* environment < flags
    return check_config_endpoints(cfg)  # before anything binds or connects


# --- worker / coordinator ----------------------------------------------------------------------
def _add_worker(p: argparse.ArgumentParser) -> None:
    from .config import add_arguments
    from .worker import WorkerConfig

    add_arguments(p, WorkerConfig)
    _config_file_arg(p, "worker")


def _run_worker(args: argparse.Namespace) -> int:
    from .worker import WorkerConfig, run_worker

    return run_worker(_build(WorkerConfig, args, "worker"))


def _add_coordinator(p: argparse.ArgumentParser) -> None:
    from .config import add_arguments
    from .coordinator import CoordinatorConfig

    add_arguments(p, CoordinatorConfig)
    _config_file_arg(p, "coordinator")


def _run_coordinator(args: argparse.Namespace) -> int:
    from .coordinator import CoordinatorConfig, run_coordinator

    return run_coordinator(_build(CoordinatorConfig, args, "coordinator"))


# --- infer / workers -------------------------------------------------------------------------------
def _add_client(p: argparse.ArgumentParser) -> None:
    from .client import ClientConfig
    from .config import add_arguments

    add_arguments(p, ClientConfig)


def _add_infer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name in the coordinator's store (deployed)")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="a .npy array (one sample, or a batch with the leading batch dimension) or an image "
                        "(.png/.jpg/...: preprocessed as timm does for the model: its resize, crop, mean and std, "
                        "stored at partition time)")
    p.add_argument("--output", metavar="FILE.npy", default=None, help="save the output array here")
    p.add_argument("--top", type=int, default=5, help="print the top-K classes per sample (0 = none)")
    p.add_argument("--deadline-ms", type=float, default=None, metavar="MS",
                   help="schedule the request: the coordinator admits it only if the result can exist within MS, "
                        "else refuses it at once and says why")
    p.add_argument("--user", default="", help="who asks (with --deadline-ms; the coordinator plans per user)")
    _add_client(p)


def _add_link(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a deployed model")
    p.add_argument("--cut", type=int, required=True, help="which link: 0 = between stage 0 and stage 1")
    p.add_argument("--budget", default=None, metavar="B|full",
                   help="channels kept on the link (one of the codec's budgets), or 'full' for full width; with "
                        "--rate, the most kept")
    p.add_argument("--wire-dtype", choices=["fp32", "fp16", "int8"], default=None, help="values on the wire")
    p.add_argument("--rate", default=None, metavar="BYTES_PER_S|measured|off",
                   help="bytes/s allocated to the link, or 'measured' (the sending worker's own measurement): the "
                        "sender then picks the budget per transfer to fit it; 'off' returns to the fixed budget")
    p.add_argument("--share", type=float, default=None,
                   help="with --rate: fraction (0, 1] of a request's remaining time the transfer may take")
    p.add_argument("--codec", default=None, metavar="NAME",
                   help="attach another codec to the link: a name in the model's manifest (`edgesplit train-codec "
                        "MODEL ... --name NAME`), a codec kind, or 'raw'; the same stages are re-deployed on the same "
                        "workers (they fetch only the codec's block; requests in flight are replayed, not lost), "
                        "then the other options apply to the new codec")
    _add_client(p)


def _run_link(args: argparse.Namespace) -> int:
    from .client import Client, ClientConfig
    from .errors import ConfigError
    from .links import MEASURED

    changes: dict[str, Any] = {}
    try:
        if args.budget is not None:
            changes["budget"] = None if args.budget == "full" else int(args.budget)
        if args.rate == "off":
            changes["rate"] = None
        elif args.rate is not None:
            changes["rate"] = args.rate if args.rate == MEASURED else float(args.rate)
    except ValueError:
        raise ConfigError(f"--budget takes an integer or 'full', --rate a number, 'measured' or 'off' "
                          f"(got {args.budget!r}, {args.rate!r})") from None
    if args.wire_dtype is not None:
        changes["wire_dtype"] = args.wire_dtype
    if args.share is not None:
        changes["share"] = args.share
    if args.codec is not None:
        changes["codec"] = args.codec
    with Client(_build(ClientConfig, args, "client")) as cl:
        now = cl.set_link(args.model, args.cut, redeploy=args.codec is not None, **changes)
    redeployed = now.pop("redeployed", None)
    print(f"{args.model} cut {args.cut}: " + "  ".join(f"{k}={v}" for k, v in now.items()))
    if redeployed is not None:
        fetched = ", ".join(f"{w} {b} B" for w, b in sorted(redeployed["fetched_bytes"].items()))
        print(f"re-deployed the same stages as plan {redeployed['plan']} with codec {args.codec!r} "
              f"(fetched: {fetched})")
    return 0


def _run_infer(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from .client import Client, ClientConfig
    from .inputs import check_input_file, check_output, load_input

    cfg = _build(ClientConfig, args, "client")
    check_input_file(args.input)  # before connecting
    output = check_output(args.output) if args.output else None  # before anything is sent: the result is kept
    with Client(cfg) as cl:
        route = cl.route(args.model)  # the model's input shape and preprocessing: the input is checked here
        x = load_input(args.input, route.input_shape, route.data_config)
        t0 = time.perf_counter()
        y = cl.submit(args.model, x, deadline_ms=args.deadline_ms, user=args.user).result()
        ms = (time.perf_counter() - t0) * 1000
    print(f"{args.model}: input {tuple(x.shape)} -> output {tuple(y.shape)} in {ms:.1f} ms "
          f"via {' -> '.join(route.workers)}")
    if args.top and y.dim() == 2:
        k = min(args.top, y.shape[1])
        vals, idx = y.topk(k, dim=1)
        for i in range(y.shape[0]):
            print(f"  sample {i}: " + ", ".join(f"class {int(c)} ({float(v):.3f})" for v, c in zip(vals[i], idx[i])))
    if output:
        try:
            np.save(output, y.numpy())
        except OSError as e:  # checked before sending: the disk filled or the directory went since (not a usage error)
            from edgesplit.partitioner.errors import EdgesplitError

            raise EdgesplitError(f"--output {output}: cannot write the result: {e}") from None
        print(f"saved {output}")
    return 0


# --- up / demo -----------------------------------------------------------------------------------
def _add_up(p: argparse.ArgumentParser) -> None:
    from .cluster import LocalClusterConfig
    from .config import add_arguments

    add_arguments(p, LocalClusterConfig)
    p.add_argument("--model", default="vit_tiny_patch16_224",
                   help="timm model to partition into the store and deploy over the workers ('none' = skip)")
    p.add_argument("--stages", type=int, default=0,
                   help="stages of the deployed model (default: one per group of --replicas workers)")
    p.add_argument("--replicas", type=int, default=1,
                   help="workers per stage: each stage runs on this many workers, so losing one costs no request "
                        "(needs at least this many workers)")
    p.add_argument("--store", default=None, help="coordinator block store (default: a temporary one, removed at exit)")


def _interrupt_on_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _run_up(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    import time

    from .cluster import LocalCluster, LocalClusterConfig

    cfg = _build(LocalClusterConfig, args, "up")
    if not 1 <= args.replicas <= cfg.workers:
        from .errors import ConfigError

        raise ConfigError(f"--replicas {args.replicas} needs 1..--workers ({cfg.workers}) workers per stage; "
                          "start more workers or ask for fewer replicas")
    _interrupt_on_sigterm()
    tmp = None if args.store else tempfile.mkdtemp(prefix="edgesplit-up-")
    store_dir = args.store or os.path.join(tmp, "store")
    try:
        if args.model and args.model != "none":
            import timm

            from edgesplit.partitioner import BlockStore, partition, timm_recipe

            store = BlockStore(store_dir)
            if args.model not in store.list_models():
                print(f"partitioning {args.model} (random weights) into {store_dir} ...", flush=True)
                partition(timm.create_model(args.model, pretrained=False).eval(), args.model,
                          timm_recipe(args.model), store)
        with LocalCluster(cfg, store=store_dir) as lc:
            cl = lc.client()
            if args.model and args.model != "none":
                route = cl.deploy(args.model, n_stages=args.stages or max(1, cfg.workers // args.replicas),
                                  replicas=args.replicas)
                print(f"deployed {args.model}: " + " -> ".join("+".join(h.worker for h in reps)
                                                                for reps in route.replicas))
            print(f"coordinator {lc.endpoint}, workers {', '.join(lc.names)} (logs in {lc.log_dir})")
            print(f"try:  edgesplit workers --coordinator {lc.endpoint}")
            if args.model and args.model != "none":
                print("      python -c \"import numpy as np; np.save('x.npy', np.random.randn(3, 224, 224)"
                      ".astype('float32'))\"")
                print(f"      edgesplit infer --coordinator {lc.endpoint} --model {args.model} --input x.npy")
            if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a background job (``up &``): no Ctrl-C comes
                print(f"kill {os.getpid()} (SIGTERM) stops everything.", flush=True)
            else:
                print("Ctrl-C stops everything.", flush=True)
            while True:
                dead = [n for n, a in lc.alive().items() if not a]
                if dead:
                    print(f"{dead[0]} exited; log tail:\n{lc.log_tail(dead[0])}", file=sys.stderr)
                    return 1
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping the cluster ...", flush=True)
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _add_demo(p: argparse.ArgumentParser) -> None:
    from .config import add_arguments
    from .demo import DemoConfig

    add_arguments(p, DemoConfig)
    cw = p.add_argument_group("class-wise mode (ED-ViT style: per-class-group sub-models fused by an MLP)")
    cw.add_argument("--classwise", type=int, default=0, metavar="N",
                    help="instead of a layer-wise split: train a small model on scikit-learn digits, split it into N "
                         "class-group sub-models on N workers plus a fusion worker, and report (0 = off)")
    cw.add_argument("--classwise-arch", choices=["vit", "resnet"], default="vit",
                    help="model family in class-wise mode")
    cw.add_argument("--classwise-epochs", type=int, default=20, metavar="N", help="training epochs in class-wise mode")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    if args.classwise:
        from .extras import require_extra

        require_extra("classwise", "class-wise mode (--classwise)")
    _interrupt_on_sigterm()
    try:
        cfg = _build(DemoConfig, args, "demo")
        if args.classwise:
            from .classwise import ClasswiseDemoConfig, run_classwise_demo

            return run_classwise_demo(ClasswiseDemoConfig(
                groups=args.classwise, arch=args.classwise_arch, epochs=args.classwise_epochs, seed=cfg.seed,
                torch_threads=cfg.torch_threads, port=cfg.port))
        return run_demo(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted; the cluster was stopped", file=sys.stderr)
        return 130


# --- commands from other packages (imported only when run) ---------------------------------
def _module_file_exists(module: str) -> bool:
    """Whether ``module`` exists, without executing its package (``find_spec`` of the parent only)."""
    parent, _, leaf = module.rpartition(".")
    try:
        spec = importlib.util.find_spec(parent)
    except (ImportError, ValueError):
        return False
    locations = list(spec.submodule_search_locations or []) if spec else []
    return any((Path(loc) / f"{leaf}.py").is_file() for loc in locations)


# --- keys ----------------------------------------------------------------------------------------
def _add_keygen(p: argparse.ArgumentParser) -> None:
    from .security import ROLES

    p.description = (
        "Make a CURVE key pair for one daemon or client: NAME.key (public: copy it to every peer that must accept "
        "this one) and NAME.key_secret (keep it on this machine only, mode 0600). Each process's --keys DIR holds "
        "its own secret key and the public keys it accepts; the role written in a public key is what its holder "
        "may do: coordinator; worker (registers, fetches blocks, runs stages); operator (deploys, undeploys, "
        "changes links, and runs requests); user (asks routes and runs requests).")
    p.add_argument("--role", required=True, choices=ROLES, help="what the key's holder may do")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the two files to (made if absent)")
    p.add_argument("--name", default=None, help="file name and label of the key (default: the role; give workers, "
                                                "operators and users their own, e.g. board1)")


def _run_keygen(args: argparse.Namespace) -> int:
    from .security import keygen

    public, secret = keygen(args.role, args.out, args.name)
    print(f"{args.role} key: public {public} (copy to peers' key directories), secret {secret} (keep here only)")
    return 0


def _delegate(module: str, adder: str, runner: str) -> tuple[Adder, Runner]:
    return (lambda p: getattr(importlib.import_module(module), adder)(p),
            lambda a: getattr(importlib.import_module(module), runner)(a))


def commands() -> dict[str, tuple[str, Adder, Runner]]:
    """name -> (help, add arguments, run)."""
    cmds: dict[str, tuple[str, Adder, Runner]] = {
        "demo": ("split a model over 3 local workers, stream inputs, print a report (the main job)", _add_demo,
                 _run_demo),
        "up": ("start a coordinator and N workers on 127.0.0.1 until Ctrl-C", _add_up, _run_up),
        "worker": ("run a worker daemon (one per board)", _add_worker, _run_worker),
        "coordinator": ("run the coordinator daemon (one per cluster)", _add_coordinator, _run_coordinator),
        "infer": ("send one input (.npy or image) through a deployed model", _add_infer, _run_infer),
        "deploy": ("deploy a stored model: measured plan, N equal stages with replicas, or a plan file",
                   *_delegate("edgesplit.runtime.cli_deploy", "add_deploy_arguments", "run_deploy")),
        "undeploy": ("take a model off every worker (frees its blocks) and forget its plan",
                     *_delegate("edgesplit.runtime.cli_deploy", "add_undeploy_arguments", "run_undeploy")),
        "status": ("workers (state, health, telemetry), memory against budgets, latency, errors, models and routes",
                   *_delegate("edgesplit.runtime.cli_status", "add_arguments", "run")),
        "workers": ("the same as status (list the workers and models a coordinator knows)",
                    *_delegate("edgesplit.runtime.cli_status", "add_arguments", "run")),
        "link": ("change a deployed link's budget, wire dtype or rate live; --codec attaches a trained codec "
                 "(same stages re-deployed)", _add_link, _run_link),
        "plan": ("measure the workers and links, plan the split (stages, workers, codecs); --deploy to apply it",
                 *_delegate("edgesplit.runtime.cli_plan", "add_arguments", "run")),
        "keygen": ("make a CURVE key pair for a coordinator, worker, operator or user (keyed clusters)", _add_keygen,
                   _run_keygen),
    }
    if _module_file_exists("edgesplit.partitioner.cli"):
        cmds["partition"] = ("store a timm model as content-addressed blocks plus a manifest",
                             *_delegate("edgesplit.partitioner.cli", "add_partition_arguments", "run_partition"))
        cmds["inspect"] = ("show a stored model's blocks, sizes and split points",
                           *_delegate("edgesplit.partitioner.cli", "add_inspect_arguments", "run_inspect"))
    if _module_file_exists("edgesplit.compression.cli_train"):
        cmds["train-codec"] = ("train a split-point compression codec",
                               *_delegate("edgesplit.compression.cli_train", "add_arguments", "run"))
    return cmds


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``edgesplit CMD: error: ...``), exit status 2 as before."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _log_level_arg(p: argparse.ArgumentParser) -> None:
    try:
        p.add_argument("--log-level", dest="log_level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                       help="logging level of this command (default: warnings only; the daemons: info)")
    except argparse.ArgumentError:
        pass  # the daemons' configs have their own --log-level (same dest)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s own arguments are built (the others stay unimported)."""
    parser = _Parser(prog="edgesplit", description="Distributed split inference for edge boards.",
                     epilog="Run `edgesplit COMMAND --help` for a command's options.")
    _log_level_arg(parser)  # before the command (edgesplit --log-level debug infer ...) or after it
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, adder, _) in commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            adder(p)
            _log_level_arg(p)
    return parser


def _command_in(argv: list[str], names: Any) -> str | None:
    """The command named in ``argv`` (the first word that is neither an option nor the global option's value)."""
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--log-level":
            skip = True
        elif not a.startswith("-"):
            return a if a in names else None
    return None


def _one_line(e: BaseException) -> str:
    """An error's message on one line (some carry a log tail or a list)."""
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _die_with_parent() -> None:
    """Daemons started by a local cluster end when the process that started them ends (Linux)."""
    parent = os.environ.get("EDGESPLIT_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:  # the parent died before prctl took effect
        sys.exit(1)


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's stack to stderr (a daemon's log) and the process goes on:
    what a hung daemon or a Ctrl-C that does not stop is doing, without a debugger on the board."""
    import faulthandler

    if hasattr(signal, "SIGUSR1"):  # not on Windows
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgesplit`` console script."""
    if argv is None:  # a process of its own (not a call from a script or a test): ``kill -USR1`` dumps its stacks
        _dump_stacks_on_sigusr1()
        argv = sys.argv[1:]
    argv = list(argv)
    cmds = commands()
    parser = build_parser(_command_in(argv, cmds))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in DAEMONS:
        _die_with_parent()  # the daemons configure logging themselves, from their config's log_level
    elif getattr(args, "log_level", None):
        logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    from edgesplit.partitioner.errors import EdgesplitError, UsageError

    try:
        return int(cmds[args.command][2](args) or 0)
    except UsageError as e:  # the user's mistake: say what to change, nothing else
        print(f"edgesplit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except EdgesplitError as e:
        print(f"edgesplit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
