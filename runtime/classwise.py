"""Run a class-wise package (``partitioner.classwise``) on a cluster: N sub-models in parallel, then fusion.

Where the data goes, for one request ``x`` (B, C, H, W)::

    client --x--> worker of <pkg>.g0 --(B, d0)--> client ┐
    client --x--> worker of <pkg>.g1 --(B, d1)--> client ├ concat in descriptor order: (B, d0 + d1 + ...)
    client --x--> worker of <pkg>.gN --(B, dN)--> client ┘
    client --(B, sum d)--> worker of <pkg> (fusion MLP) --(B, n_classes) logits--> client

Each sub-model and the fusion head is its own 1-stage deployment of the existing layer-wise
runtime, so every hop has the runtime's guarantees (deadlines, ACKs, lost-worker errors).
The input is sent once per sub-model (the N sends go out together, the sub-models run in
parallel on their workers); the features come back to the client, which concatenates them
and sends them to the fusion worker. The coordinator only places the deployments, it never
carries tensors. Any failure of a sub-model or of the fusion fails the request with the
runtime's own error (``BadInput``, ``WorkerLost``, ``RequestTimeout``, ...).

``run_classwise_demo`` (``edgesplit demo --classwise N``) trains a small digits package,
runs it on a loopback cluster and compares it with ``classwise_predict`` in one process.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from edgesplit.partitioner import BlockStore
from edgesplit.partitioner.classwise import ClasswiseDescriptor

from .client import Client, RequestInfo
from .config import human_size, opt
from .demo import percentile, say
from .errors import BadInput, ConfigError, DeployError, RequestTimeout, RuntimeFailure
from .types import Route

# the demo's small models: (timm name, keywords beyond digits_kwargs)
DEMO_MODELS = {
    "vit": ("vit_tiny_patch16_224", {"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}),
    "resnet": ("resnet18", {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 64]}),
}
DEMO_TOLERANCE = 1e-4  # cluster vs one-process reference (same fp32 ops, different batching of threads)


@dataclass
class ClasswiseInfo:
    """What happened to one class-wise request: the sub-model requests and the fusion request."""

    t_submit: float  # time.time() seconds
    submodels: list[RequestInfo] = field(default_factory=list)  # descriptor order
    fusion: RequestInfo | None = None
    t_done: float = 0.0

    @property
    def latency_ms(self) -> float:
        return (self.t_done - self.t_submit) * 1000


@dataclass(frozen=True)
class ClasswisePlacement:
    """Which worker hosts each sub-model (descriptor order) and the fusion head."""

    submodels: list[str]
    fusion: str


class ClasswiseRunner:
    """Deploys a class-wise package as N + 1 one-stage deployments and runs requests through it.

    Args:
        client: a connected runtime client.
        store: the coordinator's block store (path or ``BlockStore``); read for the descriptor
            and block counts only.
        package: the package name (its fusion manifest, holding ``extra["classwise"]``).
        timeout_ms: default deadline of a whole class-wise request (sub-models + fusion).
    """

    def __init__(self, client: Client, store: BlockStore | str | os.PathLike[str], package: str,
                 timeout_ms: int | None = None) -> None:
        self.client = client
        self.store = store if isinstance(store, BlockStore) else BlockStore(store)
        self.package = package
        self.descriptor = ClasswiseDescriptor.from_extra(self.store.manifest(package).extra, package)
        self.timeout_ms = timeout_ms if timeout_ms is not None else client.cfg.timeout_ms
        self.placement: ClasswisePlacement | None = None
        self._closed = False
        self._gather = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="classwise-gather")

    # --- placement ------------------------------------------------------------------------------
    def plan(self, workers: Sequence[str] | None = None, fusion_worker: str | None = None) -> ClasswisePlacement:
        """Choose workers without deploying.

        Sub-model ``i`` goes to ``workers[i % len(workers)]`` when ``workers`` is given; else to the
        descriptor's assignment when every assigned worker is registered; else one live worker
        per sub-model, in name order. The fusion goes to ``fusion_worker``, else to the first
        worker (name order) that hosts no sub-model, else to the worker of sub-model 0.

        Returns:
            The placement.
        Raises:
            DeployError: no workers, or fewer live workers than sub-models without an explicit list.
        """
        d = self.descriptor
        live = sorted(w.name for w in self.client.workers() if w.state.value == "live")
        if workers is not None:
            if not workers:
                raise DeployError("workers is an empty list; name at least one worker or pass None")
            subs = [str(workers[i % len(workers)]) for i in range(len(d.submodels))]
        elif d.assignment and all(d.assignment.get(n) in live for n in d.submodels):
            subs = [d.assignment[n] for n in d.submodels]
        else:
            if len(live) < len(d.submodels):
                raise DeployError(f"class-wise package {self.package} has {len(d.submodels)} sub-models but only "
                                  f"{len(live)} live workers ({live}); start more workers or pass workers=[...] "
                                  "to share them")
            subs = live[:len(d.submodels)]
        if fusion_worker is None:
            pool = list(workers) if workers is not None else live
            free = [w for w in pool if w not in subs]
            fusion_worker = free[0] if free else subs[0]
        return ClasswisePlacement(submodels=subs, fusion=str(fusion_worker))

    def deploy(self, workers: Sequence[str] | None = None, fusion_worker: str | None = None) -> ClasswisePlacement:
        """Deploy every sub-model and the fusion head as 1-stage plans (see ``plan`` for who gets what).

        Returns:
            The placement used.
        Raises:
            DeployError (or another ``RuntimeFailure``): the runtime refused a deployment.
        """
        placement = self.plan(workers, fusion_worker)
        d = self.descriptor
        for name, worker in [*zip(d.submodels, placement.submodels), (d.fusion, placement.fusion)]:
            n_blocks = self.store.manifest(name).n_blocks
            self.client.deploy(name, stages=[(worker, 0, n_blocks)])
        self.placement = placement
        return placement

    def routes(self) -> list[Route]:
        """The deployed routes: sub-models in descriptor order, then the fusion."""
        d = self.descriptor
        return [self.client.route(n) for n in [*d.submodels, d.fusion]]

    # --- requests -------------------------------------------------------------------------------
    def submit(self, x: torch.Tensor, timeout_ms: int | None = None, trace: bool = False) -> concurrent.futures.Future:
        """Fan ``x`` out to every sub-model, fuse their features; the future gives (B, n_classes) logits.

        Args:
            x: (B, C, H, W) float32 input batch.
            timeout_ms: deadline of the whole request (default: the runner's).
            trace: record per-worker timings (``future.info.submodels[i].trace``, ``future.info.fusion.trace``).
        Returns:
            A future; ``future.info`` is the request's :class:`ClasswiseInfo`. It raises the first
            failing sub-model's error (descriptor order), or the fusion's.
        """
        budget = self.timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + budget / 1000.0
        out: concurrent.futures.Future = concurrent.futures.Future()
        info = ClasswiseInfo(t_submit=time.time())
        out.info = info  # type: ignore[attr-defined]
        if self._closed:
            raise RuntimeFailure(f"the class-wise runner of {self.package} is closed; create a new one")
        subs = [self.client.submit(n, x, timeout_ms=budget, trace=trace) for n in self.descriptor.submodels]
        info.submodels = [f.info for f in subs]  # type: ignore[attr-defined]
        self._gather.submit(self._fuse, subs, out, info, deadline, trace)
        return out

    def infer(self, x: torch.Tensor, timeout_ms: int | None = None) -> torch.Tensor:
        """``submit(x).result()``: (B, n_classes) logits, or the request's error."""
        return self.submit(x, timeout_ms).result()

    def _fuse(self, subs: list[concurrent.futures.Future], out: concurrent.futures.Future, info: ClasswiseInfo,
              deadline: float, trace: bool) -> None:
        """Gather the features in descriptor order and send them to the fusion (runs on the gather thread)."""
        try:
            feats = []
            for name, dim, f in zip(self.descriptor.submodels, self.descriptor.feature_dims, subs):
                try:  # the client enforces the deadline; the grace only guards against a lost future
                    y = f.result(timeout=max(0.0, deadline - time.monotonic()) + 5.0)
                except concurrent.futures.TimeoutError:
                    raise RequestTimeout(f"sub-model {name} of {self.package} gave no result within the "
                                         "deadline; check the workers with `edgesplit workers`") from None
                if y.dim() != 2 or y.shape[1] != dim:
                    raise BadInput(f"sub-model {name} returned features of shape {tuple(y.shape)}, the package "
                                   f"descriptor says (B, {dim}); re-create the package with split_classwise")
                feats.append(y)
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise RequestTimeout(f"class-wise request for {self.package}: the sub-models used the whole "
                                     "deadline; raise timeout_ms")
            fused = self.client.submit(self.descriptor.fusion, torch.cat(feats, dim=1), timeout_ms=left_ms,
                                       trace=trace)  # (B, sum d_i)
            info.fusion = fused.info  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001  (any failure must end the request, never hang it)
            info.t_done = time.time()
            _settle(out, exc=e)
            return
        fused.add_done_callback(lambda f: _finish(out, info, f))

    def close(self) -> None:
        """Stop the gather thread after the requests it holds (the client stays open)."""
        self._closed = True
        self._gather.shutdown(wait=True)

    def __enter__(self) -> "ClasswiseRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _finish(out: concurrent.futures.Future, info: ClasswiseInfo, fused: concurrent.futures.Future) -> None:
    info.t_done = time.time()
    exc = fused.exception()
    if exc is not None:
        _settle(out, exc=exc)
    else:
        _settle(out, value=fused.result())


def _settle(out: concurrent.futures.Future, value: Any = None, exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by the caller


# --- demo -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClasswiseDemoConfig:
    """``edgesplit demo --classwise N`` settings."""

    groups: int = opt(3, "class groups = sub-models = sub-model workers (the fusion gets one more)")
    arch: str = opt("vit", "model family: vit or resnet")
    inputs: int = opt(120, "held-out digits streamed through the cluster, one per request")
    in_flight: int = opt(8, "class-wise requests in flight at once")
    epochs: int = opt(20, "training epochs of the full model (sub-model retraining and fusion scale with it)")
    seed: int = opt(0, "seed of weights, training and split")
    torch_threads: int = opt(1, "torch threads per worker")
    port: int = opt(0, "coordinator port (0 = any free port)")


def run_classwise_demo(cfg: ClasswiseDemoConfig = ClasswiseDemoConfig()) -> int:
    """Train a digits package, run it on ``groups + 1`` local workers and report.

    Returns:
        0 when every request succeeded and the cluster's logits match ``classwise_predict``
        within ``DEMO_TOLERANCE``; 1 otherwise.
    """
    from edgesplit.partitioner.classwise import classwise_predict
    from edgesplit.partitioner.cli import build_digits_package

    from .cluster import LocalCluster, LocalClusterConfig

    if cfg.arch not in DEMO_MODELS:
        raise ConfigError(f"--arch must be one of {sorted(DEMO_MODELS)}, got {cfg.arch!r}")
    model, kwargs = DEMO_MODELS[cfg.arch]
    torch.set_num_threads(max(1, cfg.torch_threads))
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-classwise-demo-"))
    try:
        say(f"[1/4] training a {cfg.arch} on digits ({cfg.epochs} epochs) and splitting it into "
             f"{cfg.groups} class groups ...")
        t0 = time.perf_counter()
        store = BlockStore(tmp / "store")
        built = build_digits_package(model, "digits", store, cfg.groups, epochs=cfg.epochs, seed=cfg.seed,
                                     kwargs=kwargs)
        say(f"      done in {time.perf_counter() - t0:.1f} s; full model {built.full_accuracy:.1%} on held-out digits")

        say(f"[2/4] starting a coordinator and {cfg.groups + 1} workers on 127.0.0.1 ...")
        t0 = time.perf_counter()
        lc = LocalCluster(LocalClusterConfig(workers=cfg.groups + 1, port=cfg.port, torch_threads=cfg.torch_threads),
                          store=tmp / "store", workdir=str(tmp / "cluster"))
        with lc:
            cl = lc.client(timeout_ms=60_000)
            say(f"      registered in {time.perf_counter() - t0:.1f} s")
            runner = ClasswiseRunner(cl, store, "digits")
            with runner:
                t0 = time.perf_counter()
                placement = runner.deploy()
                say(f"[3/4] deployed in {time.perf_counter() - t0:.1f} s: " + ", ".join(
                    f"{n}->{w}" for n, w in zip(runner.descriptor.submodels, placement.submodels))
                     + f", fusion->{placement.fusion}")
                xs = [built.x_test[i:i + 1] for i in range(min(cfg.inputs, built.x_test.shape[0]))]
                for x in xs[:2]:
                    runner.infer(x)  # warm-up
                say(f"[4/4] streaming {len(xs)} held-out digits ({cfg.in_flight} in flight) ...")
                t0 = time.perf_counter()
                futures, outputs, errors = _stream(runner, xs, cfg.in_flight)
                wall_s = time.perf_counter() - t0
            ok_idx = [i for i, o in enumerate(outputs) if o is not None]
            max_diff, acc = float("nan"), float("nan")
            if ok_idx:
                got = torch.cat([outputs[i] for i in ok_idx])
                ref = classwise_predict(store, "digits", torch.cat([xs[i] for i in ok_idx]))
                max_diff = float((got - ref).abs().max())
                acc = float((got.argmax(1) == built.y_test[ok_idx]).float().mean())
            print(_report(cfg, runner, placement, built, store, [f.info for f in futures if f.exception() is None],
                          errors, wall_s, max_diff, acc))
            return 0 if not errors and ok_idx and max_diff <= DEMO_TOLERANCE else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stream(runner: ClasswiseRunner, xs: list[torch.Tensor],
            in_flight: int) -> tuple[list[concurrent.futures.Future], list[Any], list[str]]:
    from edgesplit.partitioner import EdgesplitError

    outputs: list[Any] = [None] * len(xs)
    errors: list[str] = []
    done: list[concurrent.futures.Future] = []
    pending: list[tuple[int, concurrent.futures.Future]] = []
    nxt = 0
    while nxt < len(xs) or pending:
        while nxt < len(xs) and len(pending) < in_flight:
            pending.append((nxt, runner.submit(xs[nxt], trace=True)))
            nxt += 1
        i, fut = pending.pop(0)
        try:
            outputs[i] = fut.result()
        except EdgesplitError as e:  # reported, not raised: the demo shows what failed
            errors.append(f"input {i}: {type(e).__name__}: {e}")
        done.append(fut)
    return done, outputs, errors


def _compute_ms(info: RequestInfo | None) -> float | None:
    if info is None or len(info.trace) != 1:
        return None
    _, _, _, t_start, t_end, _, _ = info.trace[0]
    return (t_end - t_start) * 1000


def _report(cfg: ClasswiseDemoConfig, runner: ClasswiseRunner, placement: ClasswisePlacement, built: Any,
            store: BlockStore, infos: list[ClasswiseInfo], errors: list[str], wall_s: float, max_diff: float,
            acc: float) -> str:
    d = runner.descriptor
    full = store.manifest(built.full_name)
    full_params = sum(b.n_params for b in full.blocks)
    lines = ["", f"edgesplit demo --classwise {cfg.groups}: {cfg.arch} on digits, {len(d.submodels)} sub-models + fusion "
                 f"on {len(d.submodels) + 1} worker processes ({os.cpu_count()} cores)", ""]
    lines.append(f"{'model':<18}{'worker':<8}{'classes':<14}{'params':>9}{'size':>11}{'x smaller':>10}"
                 f"  {'compute ms p50':>14}{'p95':>7}  {'reply ms p50':>12}")
    rows = [(n, w, ",".join(map(str, g)), k) for k, (n, w, g) in enumerate(zip(d.submodels, placement.submodels, d.groups))]
    rows.append((d.fusion + " (fusion)", placement.fusion, "all", None))
    for name, worker, classes, k in rows:
        man = store.manifest(d.submodels[k] if k is not None else d.fusion)
        params = sum(b.n_params for b in man.blocks)
        ri = [(i.submodels[k] if k is not None else i.fusion) for i in infos]
        comp = [c for c in (_compute_ms(r) for r in ri) if c is not None]
        reply = [r.latency_ms for r in ri if r is not None]
        lines.append(f"{name:<18}{worker:<8}{classes:<14}{params:>9,}{human_size(man.size_bytes):>11}"
                     f"{full.size_bytes / man.size_bytes:>10.1f}  {percentile(comp, .5):>14.2f}{percentile(comp, .95):>7.2f}"
                     f"  {percentile(reply, .5):>12.2f}")
    total = sum(store.manifest(n).size_bytes for n in [*d.submodels, d.fusion])
    lines.append(f"{'full model':<18}{'-':<8}{'all':<14}{full_params:>9,}{human_size(full.size_bytes):>11}{1.0:>10.1f}")
    lines.append(f"{'package total':<40}{human_size(total):>20}{full.size_bytes / total:>10.2f}")
    lines.append("")
    lat = [i.latency_ms for i in infos]
    lines.append(f"requests        {len(infos)} ok, {len(errors)} failed ({cfg.in_flight} in flight, "
                 f"{len(infos) / wall_s if wall_s > 0 else float('nan'):.1f} req/s)")
    lines.append(f"latency         p50 {percentile(lat, .5):.1f} ms   p95 {percentile(lat, .95):.1f} ms   (end to end, at the client: "
                 "sub-models in parallel, then fusion)")
    lines.append(f"accuracy        {acc:.1%} on {len(infos)} held-out digits (full model: {built.full_accuracy:.1%}; "
                 f"one-process package: {built.package_accuracy:.1%} on all {built.y_test.numel()})")
    verdict = "OK" if max_diff <= DEMO_TOLERANCE else "MISMATCH"
    lines.append(f"max |cluster - classwise_predict| = {max_diff:.3g}   (tolerance {DEMO_TOLERANCE:g}: {verdict})")
    for e in errors[:5]:
        lines.append(f"error: {e}")
    return "\n".join(lines)

