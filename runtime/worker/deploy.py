"""Loading orders from the coordinator: DEPLOY (register stages, fetch what the store lacks, load) and PREFETCH.

Not a loop of its own: the control loop calls :meth:`Deployer.advance` every iteration, so
a deploy never blocks heartbeats. A DEPLOY whose stages cannot fit the memory budget is
refused before anything is fetched. Blocks the local store lacks are fetched in chunks
and hash-checked on the loader thread; the stages are then registered (skeletons holding
no memory, replacing the model's old ones in one reference swap) and, unless the order
says ``load: false``, made resident by loading only the blocks the cache lacks. A
PREFETCH makes a registered model resident ahead of its requests, evicting by the
coordinator's hint of which models come next.

A fetch logs its progress every ``PROGRESS_EVERY_S`` (blocks and bytes of the total, rate)
and reports it in heartbeats, as the counters ``fetch_done_bytes`` / ``fetch_total_bytes``
(gauges over the fetches in progress, 0 when none), so ``edgesplit deploy`` can show it:
the coordinator passes worker counters on as ``count_*`` telemetry unchanged.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any

import torch
import zmq

from edgesplit.partitioner import EdgesplitError, ModelManifest

from .. import protocol as P
from ..config import human_size
from ..errors import DeployError, ProtocolError
from ..links import LinkSpec, check_link, codec_block, create_link_codec
from ..protocol import Err, Msg
from ..transport import send
from ..types import StageInfo
from .residency import Load
from .stage import Stage, stage_skeleton

if TYPE_CHECKING:
    from .daemon import Worker

PROGRESS_EVERY_S = 2.0  # a fetch that takes longer logs its progress this often (boards fetch GBs over Wi-Fi)


class _Deploy:
    """A DEPLOY order in progress: fetch missing blocks chunk by chunk, then build the stages.

    With no manifest it is a re-fetch: blocks a stage needed and the local store lacked (or
    held corrupt) are fetched again, and nothing is built or answered.
    """

    def __init__(self, rid: bytes, manifest: ModelManifest | None, plan: int, stages: list[StageInfo],
                 links: list[tuple[LinkSpec, LinkSpec]], missing: list[str], load: bool,
                 sizes: dict[str, int] | None = None) -> None:
        self.rid, self.manifest, self.plan, self.stages, self.links = rid, manifest, plan, stages, links
        self.load = load
        self.prev: dict[int, tuple[str, ...]] = {}  # keyed: hop -> endpoints of the previous hop's workers
        self.missing = collections.deque(missing)
        self.current: str | None = None
        self.buf: bytearray | None = None
        self.size = -1
        self.next_off = 0
        self.received = 0
        self.outstanding = 0
        self.fetched_bytes = 0
        self.verifying: list[concurrent.futures.Future] = []
        self.build: concurrent.futures.Future | None = None
        self.loading: concurrent.futures.Future | None = None
        self.freed = 0
        self.t0 = time.monotonic()
        # progress: the manifest's tensor bytes estimate each block until its first chunk tells its file size
        self.n_missing = len(missing)
        self.estimates = {bid: (sizes or {}).get(bid, 0) for bid in missing}
        self.total_bytes = sum(self.estimates.values())
        self.t_logged = self.t0

    @property
    def fetching(self) -> bool:
        return self.current is not None or bool(self.missing)

    @property
    def done_bytes(self) -> int:
        return self.fetched_bytes + self.received


class Deployer:
    """Deploys in progress, keyed by the DEPLOY's request id."""

    def __init__(self, worker: "Worker") -> None:
        self.w = worker
        self.log = logging.getLogger(f"edgesplit.worker.{worker.name}.deploy")
        self.loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loader")
        self.active: dict[bytes, _Deploy] = {}
        self.prefetching: dict[bytes, tuple[str, concurrent.futures.Future]] = {}

    def cancel_all(self) -> None:
        """Fetch state is tied to one coordinator connection: drop it when that connection goes."""
        self.active.clear()
        self.prefetching.clear()

    def fail(self, sock: zmq.Socket, rid: bytes, code: Err, reason: str) -> bool:
        """End a deploy with an error reply; False when ``rid`` is no deploy of ours."""
        d = self.active.pop(rid, None)
        if d is None:
            return False
        if d.manifest is not None:
            _reply(sock, P.encode_error(rid, code, f"worker {self.w.name}: {reason}"))
        return True

    def refetch(self, bid: str) -> None:
        """Fetch a block again that a stage needed and the local store lacked (one order per block)."""
        if any(bid == d.current or bid in d.missing for d in self.active.values()):
            return
        self.log.warning("block %s is missing or was corrupt in the local store; fetching it again", bid[:12])
        self.w.load_counters["refetched"] += 1
        rid = P.new_rid()
        self.active[rid] = _Deploy(rid, None, 0, [], [], [bid], False)

    def start(self, sock: zmq.Socket, msg: P.Message) -> None:
        w = self.w
        try:
            body = msg.body
            plan = P.body_get(body, "plan", int)
            stages = [StageInfo.from_msg(s) for s in P.body_get(body, "stages", list)]
            links_in = [LinkSpec.from_msg(l) for l in P.body_get(body, "links_in", list, [None] * len(stages))]
            links_out = [LinkSpec.from_msg(l) for l in P.body_get(body, "links_out", list, [None] * len(stages))]
            if not len(links_in) == len(links_out) == len(stages):
                raise ProtocolError("bad message: DEPLOY needs one link spec in and out per stage")
            links = list(zip(links_in, links_out))
            model = P.check_model_name(P.body_get(body, "model", str))
            manifest = ModelManifest.from_json(bytes(msg.blob(0)).decode())
            if manifest.name != model or any(s.model != model or s.n_blocks != manifest.n_blocks for s in stages):
                raise ProtocolError(f"bad message: DEPLOY of {model} carries a manifest of {manifest.name}")
            load = P.body_get(body, "load", bool, True)
            prev = {int(k): tuple(P.check_endpoint(ep) for ep in v)
                    for k, v in P.body_get(body, "prev", dict, {}).items()}
            keys = {P.check_endpoint(ep): k for ep, k in P.body_get(body, "keys", dict, {}).items()
                    if isinstance(k, str) and len(k) == P.KEY_Z85_CHARS}
        except (EdgesplitError, UnicodeDecodeError, ValueError, TypeError) as e:
            _reply(sock, P.encode_error(msg.rid, Err.DEPLOY_FAILED, f"worker {w.name}: bad DEPLOY: {e}"))
            return
        needed = list(dict.fromkeys([b.id for s in stages for b in manifest.blocks[s.start:s.end]]
                                    + [c for pair in links for c in (codec_block(l, manifest) for l in pair) if c]))
        sizes = {b.id: b.size_bytes for s in stages for b in manifest.blocks[s.start:s.end]}
        if sum(sizes.values()) > w.cfg.memory_budget_bytes:  # refused before anything is fetched
            _reply(sock, P.encode_error(msg.rid, Err.DEPLOY_FAILED, (
                f"worker {w.name}: stages {[s.hop for s in stages]} of {model} need {human_size(sum(sizes.values()))} "
                f"({sum(sizes.values())} B), the memory budget is {human_size(w.cfg.memory_budget_bytes)} "
                f"({w.cfg.memory_budget_bytes} B)")))
            return
        missing = [bid for bid in needed if bid not in w.cache and not w.store.has(bid)]
        for rid, d in list(self.active.items()):  # an older order for this model must not install after this one
            if d.manifest is not None and d.manifest.name == model:
                self.fail(sock, rid, Err.DEPLOY_FAILED, f"deploy of {model} plan {d.plan} superseded by plan {plan}")
        self.active[msg.rid] = _Deploy(msg.rid, manifest, plan, stages, links, missing, load, sizes)
        self.active[msg.rid].prev = prev
        w.peer_keys.update(keys)
        self.log.info("deploy %s plan %d: stages %s; %d of %d blocks to fetch (~%s)", model, plan,
                      [(s.hop, s.start, s.end) for s in stages], len(missing), len(needed),
                      human_size(self.active[msg.rid].total_bytes))

    def on_chunk(self, sock: zmq.Socket, msg: P.Message) -> None:
        d = self.active.get(msg.rid)
        if d is None or d.current is None:
            return  # a late chunk of a cancelled deploy
        try:
            bid = P.body_get(msg.body, "id", str)
            off = P.body_get(msg.body, "off", int)
            size = P.body_get(msg.body, "size", int)
        except ProtocolError as e:
            self.log.warning("W: bad CHUNK: %s", e)
            return
        data = msg.blob(0)
        if bid != d.current or off < 0 or size < 0 or off + len(data) > size or (d.size >= 0 and size != d.size):
            self.fail(sock, d.rid, Err.DEPLOY_FAILED, f"inconsistent chunk of block {bid[:12]}")
            return
        if d.buf is None:
            budget = self.w.cfg.memory_budget_bytes
            if size > budget + P.CHUNK_BYTES:
                self.fail(sock, d.rid, Err.DEPLOY_FAILED, f"block {bid[:12]} is {size} B, above the memory "
                                                          f"budget of {budget} B")
                return
            d.size, d.buf = size, bytearray(size)
            d.total_bytes += size - d.estimates.pop(bid, 0)
        d.buf[off:off + len(data)] = data
        d.received += len(data)
        d.outstanding -= 1

    def advance(self, sock: zmq.Socket) -> None:
        """One step of every deploy and prefetch in progress (an order that fails ends; the worker serves on)."""
        self._advance_prefetches(sock)
        for d in list(self.active.values()):
            try:
                self._advance(sock, d)
            except Exception as e:  # noqa: BLE001  (storage, device memory, a bad manifest: this order only)
                self.log.error("%s failed: %s", f"deploy of {d.manifest.name}" if d.manifest else "re-fetch", e)
                self.fail(sock, d.rid, Err.DEPLOY_FAILED, str(e))
        fetching = [d for d in self.active.values() if d.fetching]
        self.w.load_counters["fetch_done_bytes"] = sum(d.done_bytes for d in fetching)
        self.w.load_counters["fetch_total_bytes"] = sum(d.total_bytes for d in fetching)

    def _log_progress(self, d: _Deploy, now: float, done: bool = False) -> None:
        """Every ``PROGRESS_EVERY_S`` while fetching, and once at the end: blocks, bytes of the total, rate."""
        if not done and now - d.t_logged < PROGRESS_EVERY_S:
            return
        d.t_logged = now
        what = f"deploy of {d.manifest.name} plan {d.plan}" if d.manifest else "re-fetch"
        n_done = d.n_missing - len(d.missing) - (d.current is not None)
        rate = d.done_bytes / max(now - d.t0, 1e-6)
        pct = 100.0 * d.done_bytes / d.total_bytes if d.total_bytes else 100.0
        if done:
            self.log.info("%s: fetched %d blocks, %s in %.1f s (%s/s)", what, d.n_missing,
                          human_size(d.fetched_bytes), now - d.t0, human_size(rate))
        else:
            self.log.info("%s: fetching blocks, %d of %d done, %s of %s (%.0f%%) at %s/s", what, n_done,
                          d.n_missing, human_size(d.done_bytes), human_size(d.total_bytes), pct, human_size(rate))

    def _advance(self, sock: zmq.Socket, d: _Deploy) -> None:
        """Request chunks within the credit, verify whole blocks, then build and install."""
        w = self.w
        if d.current is not None and d.size >= 0 and d.received >= d.size:
            data = bytes(d.buf)
            bid = d.current
            d.fetched_bytes += len(data)
            d.verifying.append(self.loader.submit(w.store.put_bytes, bid, data))  # hash check off-thread
            d.current, d.buf, d.size, d.next_off, d.received, d.outstanding = None, None, -1, 0, 0, 0
            self.log.debug("fetched block %s (%d B)", bid[:12], len(data))
            if not d.missing:
                self._log_progress(d, time.monotonic(), done=True)
        if d.current is None and d.missing:
            d.current = d.missing.popleft()
        if d.current is not None:
            self._log_progress(d, time.monotonic())
            # the first chunk tells the size; after it, keep FETCH_CREDIT requests outstanding
            limit = 1 if d.size < 0 else P.FETCH_CREDIT
            while d.outstanding < limit and (d.size < 0 and d.next_off == 0 or 0 <= d.next_off < d.size):
                frames = P.encode(Msg.FETCH, d.rid, w.ttl_ms(),
                                  {"body": {"id": d.current, "off": d.next_off, "len": P.CHUNK_BYTES}})
                if not send(sock, frames):
                    break
                d.next_off += P.CHUNK_BYTES
                d.outstanding += 1
            return
        for f in d.verifying:
            if not f.done():
                return
            f.result()  # raises BlockHashMismatch for a corrupt transfer
        if d.manifest is None:  # a re-fetch: the blocks are back in the store
            self.active.pop(d.rid, None)  # its progress line said what came back
            return
        if d.build is None:
            d.build = self.loader.submit(self._build, d)
            return
        if not d.build.done():
            return
        if d.loading is None:
            stages = d.build.result()
            d.freed = w.install(d.manifest.name, stages)  # registered: requests load what they need from now
            d.loading = self.loader.submit(self._load, stages if d.load else [])
            return
        if not d.loading.done():
            return
        stages, (loaded, _) = d.build.result(), d.loading.result()
        self.active.pop(d.rid, None)
        load_ms = (time.monotonic() - d.t0) * 1000
        self.log.info("deployed %s plan %d: hops %s in %.0f ms (%d B fetched, %d B loaded in %.0f ms, %d B freed)",
                      d.manifest.name, d.plan, [s.info.hop for s in stages], load_ms, d.fetched_bytes, loaded.bytes,
                      loaded.seconds * 1000, d.freed)
        _reply(sock, P.encode(Msg.DEPLOYED, d.rid, 0, {"body": {
            "model": d.manifest.name, "plan": d.plan, "stages": [s.info.to_msg() for s in stages],
            "load_ms": load_ms, "fetched_bytes": d.fetched_bytes, "loaded_bytes": loaded.bytes,
            "freed_bytes": d.freed, "resident_bytes": w.cache.resident_bytes}}))

    def _build(self, d: _Deploy) -> list[Stage]:
        """Loader thread: stage skeletons (no memory) and link codecs."""
        w = self.w
        out = []
        for info, (link_in, link_out) in zip(d.stages, d.links):
            entries = d.manifest.blocks[info.start:info.end]
            module = stage_skeleton(d.manifest, info.start, info.end, w.device)
            in_shape = list(d.manifest.input_shape if info.start == 0 else d.manifest.blocks[info.start - 1].out_shape)
            codec_in = create_link_codec(link_in, d.manifest, w.store, w.device)
            codec_out = create_link_codec(link_out, d.manifest, w.store, w.device)
            check_link(codec_out, link_out)
            out.append(Stage(info, module, [b.id for b in entries], in_shape, link_in, link_out,
                             codec_in, codec_out, sizes=[b.size_bytes for b in entries],
                             prev=d.prev.get(info.hop, ())))
        return out

    def _load(self, stages: list[Stage], warm_up: bool = True) -> tuple[Load, float]:
        """Loader thread: make ``stages`` resident (only missing blocks are read), warm them up if asked
        (a deploy: first-call allocations; a prefetch measures the switch alone); returns the load and seconds."""
        w, total, t0 = self.w, Load(), time.perf_counter()
        for s in stages:
            module, load = w.load(s)
            try:
                total.add(load)
                if warm_up:
                    with torch.inference_mode():
                        module(torch.zeros(1, *s.in_shape, device=w.device))
            finally:
                w.release(s)
        return total, time.perf_counter() - t0

    # --- PREFETCH ------------------------------------------------------------------------------
    def prefetch(self, sock: zmq.Socket, msg: P.Message) -> None:
        """Make a registered model's stages resident now; ``hint`` (models, soonest first) orders eviction."""
        w = self.w
        model = P.check_model_name(P.body_get(msg.body, "model", str))
        hint = [m for m in P.body_get(msg.body, "hint", list, []) if isinstance(m, str)][:P.MAX_HINT_MODELS]
        stages = [s for (m, _), s in sorted(w.stages.items()) if m == model]
        if not stages:
            _reply(sock, P.encode_error(msg.rid, Err.NOT_DEPLOYED, f"worker {w.name} has no stage of {model}"))
            return
        rank: dict[str, int] = {}
        for i, m in enumerate([model] + hint):
            for (sm, _), s in w.stages.items():
                if sm == m:
                    for bid in s.block_ids:
                        rank.setdefault(bid, i)
        w.cache.hint(rank)
        self.prefetching[msg.rid] = (model, self.loader.submit(self._load, stages, False))

    def _advance_prefetches(self, sock: zmq.Socket) -> None:
        for rid, (model, fut) in list(self.prefetching.items()):
            if not fut.done():
                continue
            del self.prefetching[rid]
            try:
                load, seconds = fut.result()
            except Exception as e:  # noqa: BLE001  (storage, device memory: this order only)
                # no room while other stages compute is the common case: the request loads what it needs itself
                level = logging.INFO if isinstance(e, DeployError) else logging.ERROR
                self.log.log(level, "prefetch of %s failed: %s: %s", model, type(e).__name__, e)
                _reply(sock, P.encode_error(rid, Err.DEPLOY_FAILED, f"worker {self.w.name}: prefetch of {model}: "
                                                                    f"{type(e).__name__}: {e}"))
                continue
            _reply(sock, P.encode(Msg.PREFETCH, rid, 0, {"body": {
                "model": model, "loaded_bytes": load.bytes, "load_ms": load.seconds * 1000, "ms": seconds * 1000,
                "blocks": load.blocks, "reused": load.reused,
                "resident_bytes": self.w.cache.resident_bytes}}))


def _reply(sock: zmq.Socket, frames: list[Any]) -> None:
    if not send(sock, frames):
        logging.getLogger("edgesplit.worker").warning("W: coordinator queue full; reply dropped (it will time out)")
