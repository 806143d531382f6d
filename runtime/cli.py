"""The ``edgesplit`` command.

::

    edgesplit demo                                   # the main job: split a model 3 ways on loopback, report
    edgesplit up --workers 3                         # a local cluster until Ctrl-C
    edgesplit up --workers 4 --replicas 2            # 2 stages, each on 2 workers (a loss costs no request)
    edgesplit infer --coordinator tcp://127.0.0.1:5555 --model vit_tiny_patch16_224 --input x.npy
    edgesplit link --coordinator tcp://127.0.0.1:5555 --model vit_tiny_patch16_224 --cut 0 --budget 8
    edgesplit plan vit_tiny_patch16_224 --coordinator tcp://127.0.0.1:5555 --deploy   # measured placement

    # three boards: one coordinator, one worker per board, keyed (see README "Security")
    edgesplit keygen --role coordinator --out keys && edgesplit keygen --role worker --name board1 --out keys
    edgesplit partition vit_tiny_patch16_224 --store ./store
    edgesplit coordinator --bind tcp://*:5555 --store ./store --keys coord-keys/
    edgesplit worker --coordinator tcp://10.0.0.1:5555 --bind tcp://*:5600 --store ./ws --keys board1-keys/

Subcommands' arguments are only built for the subcommand being run, so ``edgesplit --help``
imports nothing heavy.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

Adder = Callable[[argparse.ArgumentParser], None]
Runner = Callable[[argparse.Namespace], int]


def _config_file_arg(p: argparse.ArgumentParser, section: str) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"JSON or TOML file of settings (a [{section}] table or top-level keys); flags override it; "
                        "unknown keys are an error")


def _build(cls: type, args: argparse.Namespace, section: str) -> Any:
    from .config import from_args, from_mapping, load_file

    base = from_mapping(cls, load_file(args.config, section)) if getattr(args, "config", None) else cls()
    return from_args(cls, args, base)


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
                        "(.png/.jpg/...: resized to the model's input and ImageNet-normalised)")
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
    with Client(_build(ClientConfig, args, "client")) as cl:
        now = cl.set_link(args.model, args.cut, **changes)
    print(f"{args.model} cut {args.cut}: " + "  ".join(f"{k}={v}" for k, v in now.items()))
    return 0


def load_input(path: str, input_shape: list[int]) -> Any:
    """A float32 batch from a .npy file or an image, shaped ``(B, *input_shape)``."""
    import numpy as np
    import torch

    from .errors import BadInput

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"input file {p} does not exist")
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise BadInput(f"{p} is not a plain .npy array ({e}); object arrays are refused") from None
        x = torch.from_numpy(np.ascontiguousarray(arr)).float()
        if list(x.shape) == list(input_shape):
            x = x.unsqueeze(0)
        return x
    try:
        from PIL import Image
    except ImportError:
        raise BadInput("reading images needs Pillow (pip install pillow), or pass a .npy array") from None
    try:
        img = Image.open(p).convert("RGB")
    except OSError as e:
        raise BadInput(f"cannot read image {p}: {e}") from None
    if len(input_shape) != 3 or input_shape[0] != 3:
        raise BadInput(f"the model's input is {input_shape}, not an RGB image; pass a .npy array")
    img = img.resize((input_shape[2], input_shape[1]), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def _run_infer(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from .client import Client, ClientConfig

    with Client(_build(ClientConfig, args, "client")) as cl:
        route = cl.route(args.model)
        x = load_input(args.input, route.input_shape)
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
    if args.output:
        np.save(args.output, y.numpy())
        print(f"saved {args.output}")
    return 0


def _add_workers(p: argparse.ArgumentParser) -> None:
    _add_client(p)


def _run_workers(args: argparse.Namespace) -> int:
    from .client import Client, ClientConfig
    from .config import human_size

    with Client(_build(ClientConfig, args, "client")) as cl:
        workers, models = cl.workers(), cl.models()
    print(f"{'worker':<12}{'endpoint':<26}{'device':<8}{'state':<10}{'cpu %':>6}{'rss':>11}{'seen s':>8}  stages")
    for w in workers:
        stages = ", ".join(f"{s.model}/{s.hop}[{s.start}:{s.end})" for s in w.stages) or "-"
        tel = w.telemetry
        print(f"{w.name:<12}{w.endpoint:<26}{w.device:<8}{w.state.value:<10}{tel.get('cpu_percent', 0):>6.0f}"
              f"{human_size(tel.get('proc_rss_bytes', 0)):>11}{w.last_seen_s:>8.1f}  {stages}")
    print(f"\n{'worker':<12}{'resident':>11}{'budget':>11}{'load rate':>12}{'evicted':>11}{'batch avg/max':>14}  "
          "stages: compute p50 ms (* = resident)")
    for w in workers:
        c, resident, stats = w.cache, {(m, h) for m, h in w.resident}, w.stage_stats()
        stages = ", ".join(f"{s.model}/{s.hop}{'*' if (s.model, s.hop) in resident else ''} "
                           f"{stats.get((s.model, s.hop), {}).get('compute_ms_p50', 0):.1f}" for s in w.stages) or "-"
        rate = c.get("load_bytes_per_s", 0)
        print(f"{w.name:<12}{human_size(c.get('resident_bytes', 0)):>11}{human_size(c.get('budget_bytes', 0)):>11}"
              f"{(human_size(rate) + '/s') if rate else '-':>12}{human_size(c.get('bytes_evicted', 0)):>11}"
              f"{w.telemetry.get('count_computed', 0) / max(1, w.telemetry.get('count_batches', 0)):>9.1f}/"
              f"{int(w.telemetry.get('count_batch_max', 0)):<4}  {stages}")
    links = [(w.name, k.split(" ", 1)[1], v) for w in workers for k, v in w.telemetry.items()
             if k.startswith("link_rate_bps ")]
    if links:
        print(f"\n{'measured link':<42}{'rate':>12}")
        for name, endpoint, rate in links:
            print(f"{name + ' -> ' + endpoint:<42}{human_size(rate) + '/s':>12}")
    print(f"\n{'model':<28}{'blocks':>7}{'size':>11}  route")
    for m in models:
        print(f"{m['name']:<28}{m['n_blocks']:>7}{human_size(m['size_bytes']):>11}  "
              f"{' -> '.join(m['route']) if m['route'] else '(not deployed)'}")
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
    cw.add_argument("--classwise-arch", choices=["vit", "resnet"], default="vit", help="model family in class-wise mode")
    cw.add_argument("--classwise-epochs", type=int, default=20, metavar="N", help="training epochs in class-wise mode")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

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
        "demo": ("split a model over 3 local workers, stream inputs, print a report (the main job)", _add_demo, _run_demo),
        "up": ("start a coordinator and N workers on 127.0.0.1 until Ctrl-C", _add_up, _run_up),
        "worker": ("run a worker daemon (one per board)", _add_worker, _run_worker),
        "coordinator": ("run the coordinator daemon (one per cluster)", _add_coordinator, _run_coordinator),
        "infer": ("send one input (.npy or image) through a deployed model", _add_infer, _run_infer),
        "workers": ("list the workers and models a coordinator knows", _add_workers, _run_workers),
        "link": ("change a deployed link's budget, wire dtype or rate live (no redeploy)", _add_link, _run_link),
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s own arguments are built (the others stay unimported)."""
    parser = argparse.ArgumentParser(prog="edgesplit", description="Distributed split inference for edge boards.",
                                     epilog="Run `edgesplit COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, adder, _) in commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            adder(p)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgesplit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = commands()
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in cmds else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in ("worker", "coordinator"):
        _die_with_parent()
    from edgesplit.partitioner.errors import EdgesplitError

    try:
        return int(cmds[args.command][2](args) or 0)
    except EdgesplitError as e:
        print(f"edgesplit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
