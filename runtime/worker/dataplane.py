"""The data plane loop: RUN in, outputs out to the next stage's replicas, results to requesters.

It owns the data ROUTER (RUNs arrive; ACK/ERROR go back to their senders) and one DEALER
per peer (:class:`~edgesplit.runtime.transport.PeerLinks`); nothing else touches them.

Custody. A worker ACKs hop k to its sender once its own output for that request exists
or the request ended. Outputs sent to the next stage stay in the kept table until that
stage ACKs, so for every request in flight exactly one party holds its latest input:
when the coordinator announces a lost worker, the keeper replays each output that was
waiting on it to a live replica of the same stage (``att`` + 1), or reports WORKER_LOST
to the requester when there is none. Results and errors for requesters are not kept:
the client holds its own input until the result arrives and replays from there.

Bounds. Everything held for a peer is capped and expires with the request's deadline,
so a requester that takes nothing (a client that left) never holds back another's
results: a reply it does not take is dropped and counted (``replies_dropped``). A full
input queue answers OVERLOADED at once; a sender that gets OVERLOADED from the next
stage keeps its output and retries shortly, on another replica when there is one.

Keyed. Only listed keys get past the socket's handshake; a RUN for hop 0 is then taken
only from a user or operator key, whose key becomes the request's ``rk``; a RUN for hop
k > 0 only from a worker the coordinator's plan puts at hop k-1 (its endpoint's key, as
the coordinator sent it). Results and errors go to ``rep`` over CURVE to ``rk``: only the
holder of the requester's secret key can receive them.
"""
from __future__ import annotations

import collections
import logging
import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from .. import protocol as P
from ..acks import AckBatch
from ..errors import ProtocolError
from ..protocol import Err, Msg
from ..security.roles import RUNNERS
from ..transport import PeerLinks, drain, send
from .compute import Done, Job

if TYPE_CHECKING:
    from .daemon import Worker

RETRY_OVERLOADED_S = 0.05  # a next stage that said OVERLOADED gets nothing for this long, or until it ACKs
MAX_LINK_REPLIES = 1024  # ACK/ERROR replies parked for senders whose queue is full (then dropped)
RECENT_RUNS = 4096  # (rid, hop, att) remembered to answer duplicates


@dataclass
class Kept:
    """An output sent to the next stage and not yet acknowledged (replayable on a replica)."""

    dest: str
    frames: list[Any]
    rep: str
    model: str
    hop: int
    deadline: float  # monotonic
    nbytes: int  # payload bytes, for the link's rate meter
    t_send: float  # monotonic
    replicas: tuple[str, ...]  # every endpoint of the next stage
    att: int
    retry_at: float = 0.0  # > 0: refused as OVERLOADED, send again then
    rk: str | None = None  # the requester's key (keyed clusters)


class DataPlane:
    """The io thread's state and loop."""

    def __init__(self, worker: "Worker") -> None:
        w = self.w = worker
        self.log = logging.getLogger(f"edgesplit.worker.{w.name}.data")
        # links to next stages (custody) and to requesters (results, errors) apart: what a requester names as
        # its ``rep`` can never close, re-key or crowd out a link that carries custody
        self.links = PeerLinks(w.ctx, w.data_ident, w.opts, max_outbox_msgs=w.cfg.max_kept,
                               max_links=w.cfg.max_peers, protected=self._carries_custody, sec=w.sec,
                               key_of=w.peer_keys.get)
        self.reply_links = PeerLinks(w.ctx, w.data_ident, w.opts, max_outbox_msgs=w.cfg.max_kept,
                                     max_links=w.cfg.max_peers, sec=w.sec, per_key=True)
        self.kept: collections.OrderedDict[tuple[bytes, int], Kept] = collections.OrderedDict()
        self.recent: collections.OrderedDict[tuple[bytes, int, int], bool] = collections.OrderedDict()
        self.replies: collections.deque = collections.deque()  # link replies the ROUTER could not take yet
        self.lost_peers: dict[str, str] = {}  # endpoint -> name, announced lost (cleared when announced alive)
        self.held: collections.deque[Done] = collections.deque()  # outputs waiting for room downstream
        # custody taken, ACKs not yet sent: per sender, with each pair's receipt time (the ACK says how long it was
        # held); they leave together, within ACK_DELAY_S, or at once for a sender owed half its credit (_pick's room)
        self.acks = AckBatch.for_credit(w.cfg.queue_depth)
        self.counters: collections.Counter[str] = collections.Counter()
        # per (model, outcome): how requests ended here (result, forwarded, deadline_dropped, timeout, overloaded,
        # or the error reported: bad_input, worker_lost, ...) and payload bytes/messages sent per next-stage endpoint;
        # the heartbeat reports them for the coordinator's /metrics
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.link_bytes: collections.Counter[str] = collections.Counter()
        self.link_msgs: collections.Counter[str] = collections.Counter()
        self._rr = 0
        self.paused: dict[str, float] = {}  # next-stage endpoint -> no sends before (it said OVERLOADED)
        # kept keys to send again (refused as OVERLOADED, or replayed), oldest first: the loop looks here
        # instead of scanning the kept table each pass (64 entries: about 12 us a pass)
        self.retrying: dict[tuple[bytes, int], None] = {}

    def _carries_custody(self, endpoint: str) -> bool:
        """Whether a link must stay open: a hosted stage sends there, or outputs await its ACK."""
        return any(endpoint in s.info.next for s in self.w.stages.values()) or \
            any(k.dest == endpoint for k in self.kept.values())

    def report_counters(self) -> dict[str, int]:
        return {**self.counters, "replies_dropped": self.counters["replies_dropped"] + self.links.dropped
                + self.reply_links.dropped, "peers": len(self.links) + len(self.reply_links)}

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        w = self.w
        next_sweep = time.monotonic()
        while not w.stopping.is_set():
            poller = zmq.Poller()
            poller.register(w.data, zmq.POLLIN)
            poller.register(w.waker, zmq.POLLIN)
            for sock, flags in [*self.links.poll_flags(), *self.reply_links.poll_flags()]:
                poller.register(sock, flags)
            busy = self.replies or self.held or self.retrying
            wait_ms = 5 if busy else 100
            ack_wait = self.acks.wait_s(time.monotonic())
            if ack_wait is not None:
                wait_ms = min(wait_ms, int(ack_wait * 1000 + 0.999))
            events = dict(poller.poll(wait_ms))
            if w.waker.fileno() in events:
                w.waker.drain()
            if w.data in events:
                drain(w.data, self.on_inbound, n_route=1)
            self.links.serve(events, self.on_link_reply)
            self.reply_links.serve(events, lambda ep, frames: None)  # a result socket answers nothing
            self._drain_events()
            now = time.monotonic()
            self._retry(now)  # before new outputs: a replay or a refused send is older, and would starve behind them
            self._drain_outputs()
            self._flush_acks(time.monotonic())
            while self.replies and send(w.data, self.replies[0][1], route=self.replies[0][0]):
                self.replies.popleft()
            if now >= next_sweep:
                next_sweep = now + 0.1
                self._expire(now)
        self.links.close_all()
        self.reply_links.close_all()

    def _drain_outputs(self) -> None:
        """Compute's outputs go downstream while the kept table has room (else compute waits: back-pressure)."""
        while len(self.kept) < self.w.cfg.max_kept:
            if self.held:
                done = self.held.popleft()
            else:
                try:
                    done = self.w.outq.get_nowait()
                except queue.Empty:
                    return
            if not self.forward(done):
                self.held.appendleft(done)
                return

    def _drain_events(self) -> None:
        while True:
            try:
                kind, arg = self.w.events.get_nowait()
            except queue.Empty:
                return
            if kind == "lost":
                self.on_peer_lost(*arg)
            elif kind == "alive":
                self.lost_peers.pop(arg, None)

    # --- inbound -------------------------------------------------------------------------------
    def ack(self, route: list[bytes], rid: bytes, hop: int, t_recv: float | None = None) -> None:
        """Take custody of (rid, hop) for its sender; owed ACKs leave together, one message per sender (``acks``).

        ``t_recv``: when it arrived (wall clock; default now); the ACK carries how long it was
        held since, so the sender's link meter times the transfer, not this stage's compute.
        """
        self.acks.add(tuple(route), rid, hop, time.time() if t_recv is None else t_recv)

    def _flush_acks(self, now: float) -> None:
        for route, frames in self.acks.take(now):
            self.reply_link(route, frames)

    def reply_link(self, route: list[bytes], frames: list[Any]) -> None:
        """A link reply (ACK/ERROR) to a sender; parked if its queue is full, dropped past a bound."""
        if not self.replies and send(self.w.data, frames, route=route):
            return
        if len(self.replies) < MAX_LINK_REPLIES:
            self.replies.append((route, frames))
        else:
            self.counters["replies_dropped"] += 1

    def on_inbound(self, route: list[bytes], frames: list[Any]) -> None:
        w = self.w
        t_recv = time.time()
        try:
            msg = P.decode(frames, max_frame_bytes=w.cfg.max_frame_bytes)
        except ProtocolError as e:
            self.counters["bad_messages"] += 1
            self.log.warning("W: refused a message from %r: %s", route[0][:32], e)
            self.reply_link(route, P.encode_error(P.salvage_rid(frames), Err.BAD_MESSAGE, f"worker {w.name}: {e}"))
            return
        if msg.type == Msg.HEARTBEAT:  # a liveness probe on the data socket
            self.reply_link(route, P.encode(Msg.HEARTBEAT, msg.rid, 0, {"body": {"name": w.name}}))
            return
        if msg.type == Msg.PROBE:  # a link probe: answered at once, so its sender times the link alone
            self.counters["probes"] += 1
            self.reply_link(route, P.encode(Msg.PROBE, msg.rid, 0))
            return
        if msg.type != Msg.RUN:
            self.counters["bad_messages"] += 1
            self.reply_link(route, P.encode_error(msg.rid, Err.BAD_MESSAGE,
                                                  f"worker {w.name}'s data socket takes RUN, got {msg.type.name}"))
            return
        hop, model = msg.get("hop"), msg.get("mdl")
        if w.sec.keyed and not self._authorised(route, frames, msg):
            return
        try:  # a coded payload is a flat byte frame: the batch is in the codec's header
            P.check_batch((msg.get("cmeta") or {}).get("shape", ()) if "cod" in msg.header
                          else msg.specs[0].shape if msg.specs else ())
        except ProtocolError as e:
            self.counters["bad_messages"] += 1
            self.reply_link(route, P.encode_error(msg.rid, Err.BAD_MESSAGE, f"worker {w.name}: {e}", hop=hop))
            return
        key = (msg.rid, hop, msg.get("att", 0))
        if key in self.recent:  # a duplicate (maybe from another sender's replay): custody is here already
            self.ack(route, msg.rid, hop)
            return
        stage = w.stages.get((model, hop))
        if stage is None:
            hosted = sorted(f"{m}/{h}" for m, h in w.stages)
            self.reply_link(route, P.encode_error(
                msg.rid, Err.NOT_DEPLOYED, f"worker {w.name} does not host stage {hop} of {model} "
                f"(hosts {hosted[:16]}); deploy the model or refresh the route", hop=hop))
            return
        if msg.get("pln", stage.info.plan) != stage.info.plan:
            self.reply_link(route, P.encode_error(
                msg.rid, Err.NOT_DEPLOYED, f"{model} was redeployed: the request follows plan {msg.get('pln')}, "
                f"worker {w.name} hosts plan {stage.info.plan}; refresh the route and resend", hop=hop))
            return
        if msg.budget_ms <= 0:
            self.counters["expired"] += 1
            self.outcomes[(model, "deadline_dropped")] += 1
            self.ack(route, msg.rid, hop)  # custody ends here, unrun
            return
        try:
            w.inq.put_nowait(Job(msg, route, t_recv, time.monotonic() + msg.budget_ms / 1000.0))
        except queue.Full:
            self.counters["overloaded"] += 1
            self.outcomes[(model, "overloaded")] += 1
            self.reply_link(route, P.encode_error(msg.rid, Err.OVERLOADED, f"worker {w.name}'s input queue is full "
                                                  f"({w.cfg.queue_depth} requests)", hop=hop))
            return
        self.recent[key] = False
        while len(self.recent) > RECENT_RUNS:
            self.recent.popitem(last=False)
        self.counters["received"] += 1

    def _authorised(self, route: list[bytes], frames: list[Any], msg: P.Message) -> bool:
        """Keyed: hop 0 from a user or operator (stamped as the requester), hop k > 0 from the plan's hop k-1."""
        w, hop = self.w, msg.get("hop")
        peer = w.sec.peer_of(frames[0])
        if hop == 0:
            ok = peer is not None and peer.role in RUNNERS
            if ok:
                msg.header["rk"] = peer.key  # results go to this key, whatever the sender wrote
        else:
            stage = w.stages.get((msg.get("mdl"), hop))
            ok = peer is not None and stage is not None and peer.key in {w.peer_keys.get(ep) for ep in stage.prev}
        if not ok:
            self.counters["forbidden"] += 1
            who = f"a {peer.role} key" if peer is not None else "an unlisted key"
            self.reply_link(route, P.encode_error(msg.rid, Err.FORBIDDEN, f"worker: {who} may not send a "
                                                  f"RUN for hop {hop}", hop=hop))
        return ok

    # --- outbound ------------------------------------------------------------------------------
    def _ack_upstream(self, job: Job) -> None:
        msg = job.msg
        key = (msg.rid, msg.get("hop"), msg.get("att", 0))
        if key in self.recent:
            self.recent[key] = True
        self.ack(job.upstream, msg.rid, msg.get("hop"), job.t_recv)

    def _live(self, replicas: tuple[str, ...]) -> list[str]:
        return [ep for ep in replicas if ep not in self.lost_peers]

    def _pick(self, replicas: tuple[str, ...], avoid: str | None = None) -> str | None:
        """The live replica with room, fewest outputs awaiting its ACK first (None: none has room now).

        Room: fewer than ``queue_depth`` outputs awaiting its ACK (its input queue can take them),
        no OVERLOADED from it since its last ACK, and space in its outbox. This is credit-based
        flow control: a busy next stage holds outputs here (and compute waits) instead of being
        asked again and again.
        """
        now = time.monotonic()
        live = [ep for ep in self._live(replicas) if ep != avoid] or self._live(replicas)
        load = collections.Counter(k.dest for k in self.kept.values())
        room = [ep for ep in live if load[ep] < self.w.cfg.queue_depth and self.paused.get(ep, 0.0) <= now
                and not self.links.full(ep)]
        if not room:
            return None
        self._rr += 1
        return min(room, key=lambda ep: (load[ep], (room.index(ep) + self._rr) % len(room)))

    def forward(self, done: Done) -> bool:
        """Send a computed output on (or report its error), then ACK upstream. False: no room now, retry."""
        w, job = self.w, done.job
        msg = job.msg
        rid, hop, model, rep, rk = msg.rid, msg.get("hop"), msg.get("mdl"), msg.get("rep"), msg.get("rk")
        if done.expired:
            self.outcomes[(model, "deadline_dropped")] += 1
            self._ack_upstream(job)
            return True
        if done.error is not None:
            self.report(rep, rid, hop, job.deadline, *done.error, att=msg.get("att", 0), rk=rk, model=model)
            self._ack_upstream(job)
            return True
        stage = done.stage
        budget_ms = int((job.deadline - time.monotonic()) * 1000)
        fields: dict[str, Any] = {"mdl": model, "hop": hop + 1, "pln": stage.info.plan}
        if rk is not None:
            fields["rk"] = rk
        if not stage.link_out.is_raw:
            fields["cod"], fields["cmeta"] = stage.link_out.codec, done.cmeta
        if "trc" in msg.header:
            nbytes = sum(P.to_wire(p)[0].nbytes for p in done.payload)
            fields["trc"] = [*msg.get("trc"), P.trace_record(hop, w.name, job.t_recv, done.t_start, done.t_end,
                                                             time.time(), nbytes)]
        if stage.info.is_last:
            try:
                frames = P.encode(Msg.RESULT, rid, budget_ms, fields, done.payload)
            except ProtocolError as e:  # e.g. a trace that no longer fits the header
                return self._refuse(done, e)
            if not self.reply_links.send(rep, frames, job.deadline, droppable=True, server_key=rk):
                self.counters["replies_dropped"] += 1
            self.counters["results"] += 1
            self.outcomes[(model, "result")] += 1
            self._ack_upstream(job)
            return True
        if not self._live(stage.info.next):
            names = sorted({self.lost_peers.get(ep, ep) for ep in stage.info.next})
            self.report(rep, rid, hop + 1, job.deadline, Err.WORKER_LOST, f"every worker of stage {hop + 1} of "
                        f"{model} ({', '.join(names)}) was lost; the coordinator re-plans, then resend",
                        att=msg.get("att", 0), rk=rk, model=model)
            self._ack_upstream(job)
            return True
        fields["rep"] = rep
        att = msg.get("att", 0)
        if att:
            fields["att"] = att
        dest = self._pick(stage.info.next)
        if dest is None:
            return False  # every replica is busy: hold the output (compute waits) until one ACKs
        try:
            frames = P.encode(Msg.RUN, rid, budget_ms, fields, done.payload)
        except ProtocolError as e:
            return self._refuse(done, e)
        if not self.links.send(dest, frames, job.deadline):
            return False
        self.kept[(rid, hop + 1)] = Kept(dest, frames, rep, model, hop + 1, job.deadline,
                                         P.total_bytes(frames[1:]), time.monotonic(),
                                         stage.info.next, att, rk=rk)
        self.counters["sent"] += 1
        self.outcomes[(model, "forwarded")] += 1
        self._sent(dest, self.kept[(rid, hop + 1)].nbytes)
        self._ack_upstream(job)
        return True

    def _refuse(self, done: Done, e: ProtocolError) -> bool:
        """An output that cannot be encoded ends its request with BAD_MESSAGE (the worker goes on)."""
        msg = done.job.msg
        self.report(msg.get("rep"), msg.rid, msg.get("hop"), done.job.deadline, Err.BAD_MESSAGE,
                    f"worker {self.w.name} cannot send the output of stage {msg.get('hop')} of {msg.get('mdl')}: {e}",
                    att=msg.get("att", 0), rk=msg.get("rk"), model=msg.get("mdl") or "")
        self._ack_upstream(done.job)
        return True

    def report(self, rep: str | None, rid: bytes, hop: int, deadline: float, code: Err, reason: str,
               att: int = 0, rk: str | None = None, model: str = "") -> None:
        """Send a request's ERROR to its requester: best effort, bounded, dropped if it does not take it.

        ``att`` says which attempt failed, so a requester that has replayed it ignores the old news.
        """
        self.counters["errors"] += 1
        self.outcomes[(model, P.ERR_NAMES.get(code, "INTERNAL").lower())] += 1
        fields = {"hop": hop, "att": min(att, 255)} if att else {"hop": hop}
        if rep and not self.reply_links.send(rep, P.encode_error(rid, code, reason, **fields), deadline, droppable=True,
                                       server_key=rk):
            self.counters["replies_dropped"] += 1

    # --- replies from the next stage -------------------------------------------------------------
    def on_link_reply(self, endpoint: str, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames)
        except ProtocolError as e:
            self.log.warning("W: bad reply from %s: %s", endpoint, e)
            return
        hop = msg.get("hop")
        if msg.type == Msg.ACK:
            now = time.monotonic()
            self.paused.pop(endpoint, None)  # it took something: its queue has room again
            for key, held in zip(msg.acked(), msg.held_s()):
                k = self.kept.pop(key, None)
                if k is not None:  # a next stage's ACK: time the link to it, up to receipt there
                    self.w.rates[k.dest].observe(k.nbytes, k.t_send, now - held)
        elif msg.type == Msg.ERROR:
            k = self.kept.get((msg.rid, hop))
            if k is None or k.dest != endpoint:
                return
            code, reason = msg.get("err")
            if code == Err.OVERLOADED:  # keep custody; send again when a replica has room
                now = time.monotonic()
                self.paused[endpoint] = now + RETRY_OVERLOADED_S
                k.retry_at = now
                self.retrying[(msg.rid, hop)] = None
                return
            del self.kept[(msg.rid, hop)]
            self.report(k.rep, msg.rid, k.hop, k.deadline, Err(code) if code in P.ERR_NAMES else Err.INTERNAL, reason,
                        att=k.att, rk=k.rk, model=k.model)

    def _sent(self, dest: str, nbytes: int) -> None:
        self.link_bytes[dest] += nbytes
        self.link_msgs[dest] += 1

    def _retry(self, now: float) -> None:
        """Send again what a next stage refused as OVERLOADED (or a lost worker held), as replicas get room.

        Earliest deadline first: a replay after a loss has waited longest and has least time left.
        """
        for key in list(self.retrying):
            k = self.kept.get(key)
            if k is None or not k.retry_at:  # acknowledged, failed or expired meanwhile
                del self.retrying[key]
        for key in sorted(self.retrying, key=lambda key: self.kept[key].deadline):
            k = self.kept[key]
            dest = self._pick(k.replicas)
            if dest is None:
                continue
            frames = P.restamp(k.frames, int((k.deadline - now) * 1000))
            if self.links.send(dest, frames, k.deadline):
                k.dest, k.frames, k.retry_at, k.t_send = dest, frames, 0.0, now
                del self.retrying[key]
                self._sent(dest, k.nbytes)

    def on_peer_lost(self, endpoint: str, name: str) -> None:
        """Replay every output that waited on the lost worker to a live replica, else report it lost."""
        self.lost_peers[endpoint] = name
        while len(self.lost_peers) > 256:
            del self.lost_peers[next(iter(self.lost_peers))]
        self.links.drop_outbox(endpoint)
        self.links.close(endpoint)
        now = time.monotonic()
        replayed = failed = 0
        for key, k in list(self.kept.items()):
            if k.dest != endpoint:
                continue
            if self._live(k.replicas) and now < k.deadline:  # replay on a replica, now or when one has room
                k.att += 1
                k.frames = P.with_attempt(k.frames, k.att)
                k.retry_at = now
                self.retrying[key] = None
                replayed += 1
                continue
            del self.kept[key]
            failed += 1
            self.report(k.rep, key[0], k.hop, k.deadline, Err.WORKER_LOST,
                        f"worker {name} ({endpoint}) running stage {k.hop} of {k.model} was lost before finishing "
                        "and no replica of it is alive", att=k.att, rk=k.rk, model=k.model)
        self._retry(now)
        self.counters["replayed"] += replayed
        if replayed or failed:
            self.log.warning("peer %s lost: %d request(s) replayed on a replica, %d reported failed", name,
                             replayed, failed)

    def _expire(self, now: float) -> None:
        """Kept outputs past their deadline: the requester has given up (and said so itself); free them."""
        for key, k in list(self.kept.items()):
            if now > k.deadline:
                del self.kept[key]
                self.links.discard(k.dest, k.frames)
                self.counters["kept_expired"] += 1
                self.outcomes[(k.model, "timeout")] += 1
        self.links.expire(now)
        self.reply_links.expire(now)

