"""Does the broker let a tailing consumer step over records?  A plain consumer and the
trainer's guarded source (``odl.offset_gaps``), side by side on the same partition.

    python scripts/broker_offset_gaps.py [--records N] [--producers K] [--burners B]

On a private broker (``bench.common.private_broker``: tansu locally), K producers append N
records each to one partition at once (small and large batches), with B core-burning processes
beside them; two consumers tail the partition while it grows: librdkafka as is, and
``trainers.kafka_source.SampleSource``.  When production ends, each reads on until it has the
last offset.  Prints, per consumer, the offsets it never received that a full read afterwards
holds, and the guard's waits (``docs/operations.md``).  Exit 1 if the guarded source missed any.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from bench.common import private_broker
from odl.config import load_config
from odl.kafka_util import create_topics, read_topic
from trainers.kafka_source import SampleSource

TOPIC = "gaps"


def produce(bootstrap: str, tag: str, n: int, batch: int) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": batch % 3,
                  "batch.num.messages": batch})
    for i in range(n):
        p.produce(TOPIC, key=f"{tag}{i}".encode(), value=tag.encode() * 200, partition=0)
        if i % 100 == 0:
            p.poll(0)
    p.flush()


class Tail(threading.Thread):
    """Reads offsets until told the last one exists, then until it has it (or 30 s pass)."""

    def __init__(self, fetch):
        super().__init__(daemon=True)
        self.fetch, self.seen, self.last = fetch, [], None

    def run(self) -> None:
        deadline = None
        while True:
            self.seen += [o for _, o, _ in self.fetch()]
            if self.last is not None:
                deadline = deadline or time.monotonic() + 30
                if (self.seen and self.seen[-1] >= self.last) or time.monotonic() > deadline:
                    return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=20_000, help="per producer")
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--burners", type=int, default=2)
    args = ap.parse_args()
    base = load_config()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(args.burners)]
    try:
        with private_broker(base) as bootstrap:
            cfg = base.model_copy(update={"kafka": base.kafka.model_copy(
                update={"bootstrap_servers": bootstrap, "partitions": 1})})
            create_topics(bootstrap, [TOPIC], partitions=1)
            plain = Consumer({"bootstrap.servers": bootstrap, "group.id": "plain",
                              "enable.auto.commit": False, "fetch.wait.max.ms": 10})
            plain.assign([TopicPartition(TOPIC, 0, 0)])
            guarded = SampleSource(cfg, TOPIC, "guarded", None, {0: 0})
            tails = {
                "plain": Tail(lambda: [(m.partition(), m.offset(), None)
                                       for m in plain.consume(2000, 0.1) if m.error() is None]),
                "guarded": Tail(lambda: guarded.fetch(2000, 0.1)),
            }
            for t in tails.values():
                t.start()
            producers = [threading.Thread(target=produce, args=(bootstrap, chr(97 + k),
                                                                args.records, 3 if k % 2 else 50))
                         for k in range(args.producers)]
            t0 = time.monotonic()
            for p in producers:
                p.start()
            for p in producers:
                p.join()
            took = time.monotonic() - t0
            total = args.producers * args.records
            for t in tails.values():
                t.last = total - 1
                t.join()
            held = {o for _, o, _ in read_topic(cfg, TOPIC)}
            plain.close()
            waits = (guarded._gaps.waited, guarded._gaps.stepped_over)
            guarded.close()
    finally:
        for b in burners:
            b.kill()
            b.wait()
    print(f"{total} records from {args.producers} producers in {took:.1f} s with "
          f"{args.burners} burners; the topic holds {len(held)}")
    missed = {}
    for name, t in tails.items():
        missed[name] = sorted(held - set(t.seen))
        print(f"  {name:<8} received {len(set(t.seen))}, never received {len(missed[name])}"
              f" {missed[name][:12]}")
    print(f"  guard: {waits[0]} gaps waited for, {waits[1]} offsets stepped over")
    print(f"RESULT broker_offset_gaps plain_missed={len(missed['plain'])} "
          f"guarded_missed={len(missed['guarded'])} guard_waits={waits[0]}")
    return 1 if missed["guarded"] else 0


if __name__ == "__main__":
    sys.exit(main())
