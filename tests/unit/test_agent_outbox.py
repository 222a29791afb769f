"""agent outbox: windows stay on disk until acked, resend in order, survive restarts."""

from __future__ import annotations

from pathlib import Path

from agent.outbox import Outbox
from agent.testing import FakeTransport
from agent.transport import TransportHooks


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def wire(outbox: Outbox, transport: FakeTransport) -> None:
    transport.set_hooks(
        TransportHooks(
            on_connected=outbox.connection_lost,
            on_disconnected=outbox.connection_lost,
            on_acked=outbox.acked,
        )
    )


def pump(outbox: Outbox, transport: FakeTransport) -> int:
    return outbox.pump(lambda p: transport.publish("t", p, qos=1))


def add(outbox: Outbox, text: str) -> int:
    return outbox.add(lambda seq, dropped: f"{seq}:{dropped}:{text}".encode())


def test_kept_until_acked_then_deleted(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=1 << 20, max_age_s=3600)
    t = FakeTransport()
    wire(ob, t)
    assert [add(ob, "a"), add(ob, "b")] == [0, 1]
    assert pump(ob, t) == 2
    assert pump(ob, t) == 0  # in flight: not sent twice
    assert ob.seqs() == [0, 1]
    t.ack_all()
    assert ob.seqs() == []


def test_resent_in_seq_order_after_reconnect(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=1 << 20, max_age_s=3600)
    t = FakeTransport()
    wire(ob, t)
    add(ob, "a")
    pump(ob, t)
    t.drop()  # the publish of window 0 is lost with the connection
    add(ob, "b")
    add(ob, "c")
    assert pump(ob, t) == 0  # offline: nothing handed over, all stays on disk
    t.restore()
    pump(ob, t)
    assert [p.split(b":")[0] for p in t.on("t")] == [b"0", b"0", b"1", b"2"]
    t.ack_all()
    assert ob.seqs() == []


def test_unacked_windows_and_seq_survive_restart(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    ob = Outbox(path, max_bytes=1 << 20, max_age_s=3600)
    t = FakeTransport()
    wire(ob, t)
    add(ob, "a")
    add(ob, "b")
    pump(ob, t)
    ob.close()  # died before the acks came
    ob = Outbox(path, max_bytes=1 << 20, max_age_s=3600)
    t2 = FakeTransport()
    wire(ob, t2)
    assert ob.seqs() == [0, 1]
    pump(ob, t2)
    assert [p.split(b":")[2] for p in t2.on("t")] == [b"a", b"b"]
    t2.ack_all()
    assert add(ob, "c") == 2  # sequence numbers never restart


def test_bounded_by_bytes_and_age_with_dropped_count(tmp_path: Path) -> None:
    clock = Clock()
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=100, max_age_s=60, clock=clock)
    for _ in range(5):
        ob.add(lambda seq, dropped: b"x" * 40)
    assert ob.seqs() == [3, 4]  # 2 x 40 bytes fit in 100
    assert ob.dropped_total == 3
    add(ob, "next")
    for _ in range(3):  # drop the windows that carried the counts, too
        ob.add(lambda seq, dropped: f"{seq}:{dropped}:".encode() + b"x" * 30)
    t = FakeTransport()
    wire(ob, t)
    pump(ob, t)
    reported = sum(int(p.split(b":")[1]) for p in t.on("t"))
    # Every drop is reported exactly once, even when the window carrying a count was dropped.
    assert ob.dropped_total >= 6
    assert reported + ob.dropped_owed == ob.dropped_total
    t.ack_all()
    clock.t += 3600
    seq = add(ob, "late")
    assert ob.seqs() == [seq]  # the rest aged out
