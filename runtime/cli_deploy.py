"""``edgesplit deploy MODEL`` and ``edgesplit undeploy MODEL``: put a stored model on the workers, take it off.

::

    edgesplit deploy vit_tiny_patch16_224 --coordinator tcp://10.0.0.1:5555   # the planner's plan, calibrated
    edgesplit deploy vit_tiny_patch16_224 --stages 3                          # stored splits, nothing measured
    edgesplit deploy vit_tiny_patch16_224 --stages 2 --replicas 2 --workers a,b,c,d
    edgesplit plan vit_tiny_patch16_224 --json > plan.json && edgesplit deploy vit_tiny_patch16_224 --plan plan.json
    edgesplit undeploy vit_tiny_patch16_224

A plan file is JSON::

    {"model": "vit_tiny_patch16_224",                  # optional; must match MODEL when given
     "stages": [["w0", 0, 7], ["w1", 7, 14]],          # [worker, first block, end block) in order, covering
                                                       # every block; a span listed on several workers = replicas
     "links": [null]}                                  # optional: one per cut, null (raw) or
                                                       # {"codec": NAME, "budget": N, "wire_dtype": "fp16"}

Stages may also be written ``{"worker": "w0", "start": 0, "end": 7}``; and what ``edgesplit plan
MODEL --json`` prints is read as it is (its ``plan``: stages and the codec on each hop).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

from edgesplit.partitioner.errors import UsageError

from .config import human_size

CALIBRATE_REQUESTS = 40  # requests a planned deploy runs to calibrate the plan (a few seconds on a slow cluster)
LINK_KEYS = {"codec", "budget", "wire_dtype", "rate", "share"}  # what a plan file's link spec may say
PROGRESS_POLL_S = 1.0  # how often a deploy asks the registry for the workers' fetch progress (heartbeats: 1 s)
MAX_PLAN_FILE_BYTES = 1024**2  # a plan is a few kB even for hundreds of stages; a larger file is the wrong one
PLAN_FILE_HELP = """plan file (--plan FILE), JSON:
  {"model": "vit_tiny_patch16_224",          optional; must be MODEL when given
   "stages": [["w0", 0, 7], ["w1", 7, 14]],  [worker, start block, end block), in order, covering every block;
                                             a span listed on several workers is a stage with replicas
   "links": [null]}                          optional: one per cut, null (raw) or
                                             {"codec": NAME, "budget": N, "wire_dtype": "fp16"}
stages may also be {"worker": "w0", "start": 0, "end": 7}; what `edgesplit plan MODEL --json` prints
is read as it is (its "plan": stages, and the codec on each hop)."""


def add_deploy_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import _add_client

    p.add_argument("model", help="a model in the coordinator's store")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = PLAN_FILE_HELP
    p.add_argument("--plan", default="auto", metavar="auto|FILE",
                   help="auto: measure the workers and links and deploy the planner's placement (unless --stages, "
                        "--replicas or --workers ask for a plain cut); FILE: a JSON plan (format below)")
    p.add_argument("--stages", type=int, default=None, metavar="N",
                   help="cut into N stages at the splits stored at partition time (or by profiled block times), "
                        "nothing measured (default with --workers/--replicas: one per group of R workers)")
    p.add_argument("--replicas", type=int, default=None, metavar="R",
                   help="workers per stage: a request whose worker is lost is replayed on a replica (no measuring)")
    p.add_argument("--workers", default=None, metavar="A,B,...",
                   help="workers to use, in stage order (default: every live worker, by name; no measuring)")
    p.add_argument("--calibrate", type=int, default=CALIBRATE_REQUESTS, metavar="N",
                   help="after a planned deploy (--plan auto), run N random requests, scale each worker's profile "
                        "by its stages' measured/predicted compute, plan again, deploy that if it differs, and "
                        "print the measured times beside the prediction; 0: skip "
                        f"(default {CALIBRATE_REQUESTS})")
    _add_client(p)


def add_undeploy_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import _add_client

    p.add_argument("model", help="a deployed model: its plan is forgotten and every worker frees its blocks")
    _add_client(p)


def _plan_error(path: str, what: str) -> UsageError:
    return UsageError(f"plan file {path}: {what}")


def _read_stage(path: str, k: int, v: Any) -> tuple[str, int, int]:
    if isinstance(v, dict):
        v = [v.get("worker"), v.get("start"), v.get("end")]
    if not (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and 0 < len(v[0]) <= 64
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v[1:]) and 0 <= v[1] < v[2]):
        raise _plan_error(path, f"stage {k} is {json.dumps(v)[:80]}; a stage is [worker, start, end] with "
                                "0 <= start < end (block indices, end excluded)")
    return v[0], v[1], v[2]


def _read_link(path: str, k: int, v: Any) -> dict[str, Any] | None:
    from .errors import ProtocolError
    from .links import LinkSpec

    if v is None:
        return None
    if not isinstance(v, dict) or not set(v) <= LINK_KEYS:
        raise _plan_error(path, f"link {k} is {json.dumps(v)[:80]}; a link is null (raw) or a map of "
                                f"{', '.join(sorted(LINK_KEYS))}")
    try:
        LinkSpec.from_msg(v)
    except ProtocolError as e:
        raise _plan_error(path, f"link {k}: {str(e).removeprefix('bad message: ')}") from None
    return dict(v)


def _from_planner_json(path: str, doc: dict[str, Any]) -> dict[str, Any]:
    """What `edgesplit plan --json` printed, as a plan file: its stages, and each inner hop's codec as a link."""
    plan = doc["plan"]
    if not isinstance(plan, dict) or not isinstance(plan.get("stages"), list) or not isinstance(plan.get("hops"), list):
        raise _plan_error(path, "its \"plan\" lacks \"stages\" or \"hops\" (is it `edgesplit plan --json` output?)")
    links: list[Any] = []
    for hop in plan["hops"][1:-1]:  # the first hop is client -> stage 0, the last stage k -> client
        codec = hop.get("codec") if isinstance(hop, dict) else None
        if codec is None:
            links.append(None)
        else:
            name, _, budget = str(codec).rpartition("@")
            if not name or not (budget == "full" or budget.isdigit()):
                raise _plan_error(path, f"hop codec {codec!r} is not NAME@BUDGET")
            links.append({"codec": name, "budget": None if budget == "full" else int(budget)})
    model = (doc.get("measurements") or {}).get("model") if isinstance(doc.get("measurements"), dict) else None
    return {"model": model, "stages": plan["stages"], "links": links}


def read_plan_file(path: str, model: str) -> tuple[list[tuple[str, int, int]], list[dict[str, Any] | None] | None]:
    """The stages and links of a plan file (format in this module's docstring); a UsageError names what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise _plan_error(path, "no such file (--plan takes 'auto' or a JSON plan file)")
    if p.stat().st_size > MAX_PLAN_FILE_BYTES:
        raise _plan_error(path, f"{p.stat().st_size} B is too large for a plan (at most {MAX_PLAN_FILE_BYTES} B)")
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _plan_error(path, f"not JSON ({e})") from None
    except OSError as e:
        raise _plan_error(path, f"cannot read it ({e.strerror or e})") from None
    except RecursionError:  # e.g. 100k nested '[': Python's parser gives up before any size cap would
        raise _plan_error(path, "nested too deeply for a plan (a plan is an object of short lists)") from None
    try:
        return _read_plan_doc(path, doc, model)
    except RecursionError:  # nested less deeply than the parser's limit, but still too deep to print or walk
        raise _plan_error(path, "nested too deeply for a plan (a plan is an object of short lists)") from None


def _read_plan_doc(path: str, doc: Any,
                   model: str) -> tuple[list[tuple[str, int, int]], list[dict[str, Any] | None] | None]:
    if not isinstance(doc, dict):
        raise _plan_error(path, "a plan is a JSON object with \"stages\" (and optionally \"model\", \"links\")")
    if "plan" in doc and "stages" not in doc:
        doc = _from_planner_json(path, doc)
    unknown = sorted(set(doc) - {"model", "stages", "links"})
    if unknown:
        raise _plan_error(path, f"unknown keys {unknown}; a plan has \"stages\" and optionally \"model\", \"links\"")
    if doc.get("model") is not None and doc["model"] != model:
        raise _plan_error(path, f"it is a plan for {doc['model']!r}, not {model!r}")
    stages_raw = doc.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise _plan_error(path, "\"stages\" must be a non-empty list of [worker, start, end]")
    stages = [_read_stage(path, k, v) for k, v in enumerate(stages_raw)]
    links_raw = doc.get("links")
    if links_raw is None:
        return stages, None
    if not isinstance(links_raw, list):
        raise _plan_error(path, "\"links\" must be a list: one per cut, null (raw) or a link spec")
    return stages, [_read_link(path, k, v) for k, v in enumerate(links_raw)]


def check_plan_against(path: str, model: str, stages: list[tuple[str, int, int]],
                       links: list[dict[str, Any] | None] | None, n_blocks: int) -> None:
    """Refuse, before anything is sent, a plan that does not cover ``model``'s blocks or miscounts its links."""
    from .errors import DeployError
    from .plan import PlannedStage, group_replicas

    try:
        hops = group_replicas([PlannedStage(*s) for s in stages], n_blocks, model)
    except DeployError as e:
        raise _plan_error(path, str(e)) from None
    if links is not None and len(links) != len(hops) - 1:
        raise _plan_error(path, f"{len(hops)} stages have {len(hops) - 1} cuts, but \"links\" has {len(links)} "
                                "entries; give one per cut (null = raw)")


class FetchProgress:
    """While a deploy runs: poll the registry and print each worker's block fetch progress (stderr) when it moves.

    The workers report ``fetch_done_bytes`` / ``fetch_total_bytes`` in their heartbeats; the
    coordinator passes them on as ``count_*`` telemetry, so no deploy message has to carry them.
    """

    def __init__(self, cl: Any, model: str) -> None:
        self.cl, self.model = cl, model
        self._stop = threading.Event()
        self._last = ""
        self._thread = threading.Thread(target=self._run, name="deploy-progress", daemon=True)

    def __enter__(self) -> "FetchProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from edgesplit.partitioner.errors import EdgesplitError

        while not self._stop.wait(PROGRESS_POLL_S):
            try:
                workers = self.cl.workers()
            except EdgesplitError:
                continue  # a slow answer: the deploy's own result is what counts
            parts = []
            for w in workers:
                total = w.telemetry.get("count_fetch_total_bytes", 0)
                if total > 0:
                    done = w.telemetry.get("count_fetch_done_bytes", 0)
                    parts.append(f"{w.name} {human_size(done)} of {human_size(total)} ({100 * done / total:.0f}%)")
            line = ", ".join(parts)
            if line and line != self._last and not self._stop.is_set():
                print(f"fetching blocks of {self.model}: {line}", file=sys.stderr, flush=True)
            self._last = line


def _n_blocks(cl: Any, model: str) -> int:
    """The stored model's block count (from the coordinator's model list)."""
    from .errors import UnknownModel

    found = [m for m in cl.models() if m["name"] == model]
    if not found:
        raise UnknownModel(f"model {model} is not in the coordinator's store; partition it there first "
                           "(`edgesplit partition`)")
    return int(found[0]["n_blocks"])


def _check_named(where: str, named: list[str], live: list[str], distinct: bool) -> None:
    """The workers ``where`` names must be registered (and, for --workers, each named once)."""
    unknown = sorted(set(named) - set(live))
    if unknown:
        raise UsageError(f"{where} names workers {unknown} that are not registered; registered: {live}")
    twice = sorted({w for w in named if named.count(w) > 1})
    if distinct and twice:
        raise UsageError(f"{where} names {', '.join(twice)} more than once; name each worker once (--replicas puts "
                         "a stage on several workers)")


def check_plain(model: str, n_blocks: int, live: list[str], workers: list[str] | None, n_stages: int | None,
                replicas: int) -> None:
    """Refuse, before anything is sent, a plain cut the coordinator would refuse (the same rules as
    ``plan.layerwise_hops``): stages in 1..n_blocks, distinct registered workers, replicas <= workers.

    Args:
        model: the model's name (for messages).
        n_blocks: its block count in the coordinator's store.
        live: the registered workers' names.
        workers: ``--workers`` (None: every registered worker).
        n_stages: ``--stages`` (None: one stage per group of ``replicas`` workers).
        replicas: ``--replicas`` (1 when not given).
    """
    from .types import MAX_REPLICAS

    if workers is not None:
        _check_named("--workers", workers, live, distinct=True)
    pool = workers if workers is not None else live
    if not pool:
        return  # no worker registered: the coordinator says so (not the user's flags' fault)
    if replicas > MAX_REPLICAS:
        raise UsageError(f"--replicas {replicas} is more than {MAX_REPLICAS}; give --replicas 1..{MAX_REPLICAS}")
    if replicas > len(pool):
        which = "--workers names" if workers is not None else "the coordinator has"
        raise UsageError(f"--replicas {replicas} needs at least {replicas} workers, but {which} {len(pool)} "
                         f"({', '.join(pool)}); give --replicas 1..{len(pool)} or start more workers")
    if n_stages is not None and n_stages > n_blocks:
        raise UsageError(f"--stages {n_stages}: {model} has {n_blocks} blocks, so 1..{n_blocks} stages")
    k = n_stages or max(1, len(pool) // replicas)
    if k > n_blocks:
        raise UsageError(f"{len(pool)} workers in groups of {replicas} make {k} stages, but {model} has {n_blocks} "
                         f"blocks; give --stages 1..{n_blocks}")


def run_deploy(args: argparse.Namespace) -> int:
    from .calibrate import calibrate, run_and_compare
    from .cli import _build
    from .cli_plan import print_calibrated
    from .client import Client, ClientConfig
    from .errors import RuntimeFailure

    if args.stages is not None and args.stages < 1:
        raise UsageError(f"--stages must be at least 1, got {args.stages}")
    if args.replicas is not None and args.replicas < 1:
        raise UsageError(f"--replicas must be at least 1, got {args.replicas}")
    if args.calibrate < 0:
        raise UsageError(f"--calibrate takes a number of requests (0: skip), got {args.calibrate}")
    workers = [w for w in args.workers.split(",") if w] if args.workers is not None else None
    if workers is not None and not workers:
        raise UsageError("--workers needs worker names, e.g. --workers w0,w1")
    plain = args.stages is not None or args.replicas is not None or workers is not None
    plan_file = None if args.plan == "auto" else args.plan
    stages = links = None
    if plan_file is not None:
        if plain:
            raise UsageError("--plan FILE gives the stages itself; drop --stages, --replicas and --workers "
                             "(or use --plan auto)")
        stages, links = read_plan_file(plan_file, args.model)
    with Client(_build(ClientConfig, args, "client")) as cl:
        cl.coordinator()  # a coordinator that does not answer fails within the control timeout, not the deploy's
        if stages is not None or plain:  # what the coordinator would refuse, refused here with the valid range
            n_blocks = _n_blocks(cl, args.model)
            live = sorted(w.name for w in cl.workers())
            if stages is not None:
                _check_named(f"plan file {plan_file}", [w for w, _, _ in stages], live, distinct=False)
                check_plan_against(plan_file, args.model, stages, links, n_blocks)
            else:
                check_plain(args.model, n_blocks, live, workers, args.stages, args.replicas or 1)
        else:
            print(f"measuring {args.model} on every live worker (profiles, then link probes), then planning ...",
                  file=sys.stderr, flush=True)
        with FetchProgress(cl, args.model):
            if stages is not None:
                route = cl.deploy(args.model, stages=stages, links=links)
            elif plain:
                route = cl.deploy(args.model, workers=workers, n_stages=args.stages, replicas=args.replicas or 1)
            else:
                route = cl.deploy(args.model)
        placement = cl.placements.get(args.model)
        calibrated = None
        if placement is not None and args.calibrate:
            print(f"calibrating: {args.calibrate} requests through the plan, then planning again with what "
                  "each worker showed ...", file=sys.stderr, flush=True)
            m = cl.measurements[args.model]
            try:
                _, rows = run_and_compare(cl, args.model, placement, m.hop_ms(), args.calibrate)
                calibrated = calibrate(cl, args.model, m, placement, rows, args.calibrate)
            except RuntimeFailure as e:  # the deploy stands: say what failed, as for any request
                print(f"edgesplit: warning: calibrating failed ({type(e).__name__}: {e}); the plan deployed last "
                      "serves (`edgesplit status` shows it)", file=sys.stderr)
    print(f"deployed {args.model} plan {route.plan}: "
          + " -> ".join("+".join(h.worker for h in reps) + f" [{reps[0].start}:{reps[0].end})"
                        for reps in route.replicas))
    if placement is not None:
        print(f"  planned ({placement.objective}): latency {placement.latency_ms:.2f} ms, bottleneck "
              f"{placement.bottleneck_ms:.2f} ms ({placement.bottleneck}), throughput {placement.throughput:.1f}/s")
    if calibrated is not None:
        print_calibrated(calibrated)
    print(f"  {'worker':<14}{'fetched':>11}{'loaded':>11}{'freed':>11}{'resident':>11}{'ms':>9}")
    for name in sorted(route.loaded):
        r = route.loaded[name]
        print(f"  {name:<14}" + "".join(f"{human_size(r.get(k) or 0):>11}" for k in
                                        ("fetched_bytes", "loaded_bytes", "freed_bytes", "resident_bytes"))
              + f"{r.get('load_ms') or 0:>9.0f}")
    return 0


def run_undeploy(args: argparse.Namespace) -> int:
    from .cli import _build
    from .client import Client, ClientConfig

    with Client(_build(ClientConfig, args, "client")) as cl:
        cl.coordinator()  # a coordinator that does not answer fails within the control timeout, not the undeploy's
        freed = cl.undeploy(args.model)
    if not freed:
        print(f"undeployed {args.model} (no worker hosted it)")
        return 0
    print(f"undeployed {args.model}")
    print(f"  {'worker':<14}{'freed':>11}{'resident':>11}")
    for name in sorted(freed):
        r = freed[name]
        print(f"  {name:<14}{human_size(r.get('freed_bytes') or 0):>11}{human_size(r.get('resident_bytes') or 0):>11}")
    return 0
