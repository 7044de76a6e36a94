"""How many threads TensorFlow's ops may use in a trainer process (``trainer.intra_op_threads``).

A streaming trainer shares its machine with its own stream: the decode process with its
consumer (``trainers.decode_process``; with ``trainer.decode_process: false``, librdkafka's
threads and the prefetch thread in the trainer's process).  With TensorFlow's default (an
intra-op pool as wide as the machine) an op split across every core waits for its slowest
part, and a core taken by the stream stalls the whole op.  Leaving the stream one core is the
default; on a two-core machine the model then runs one intra-op thread, which trains as fast
as two there (``odl bench trainer``: docs/training.md).

The setting is per process and only takes before TensorFlow's runtime starts (its first op).
"""
from __future__ import annotations

import logging
import os

import tensorflow as tf

log = logging.getLogger("odl.trainer")


def intra_op_threads(setting: int | None) -> int:
    """The intra-op pool size for ``setting`` (None: every core this process may use but one)."""
    if setting is not None:
        return setting
    return max(1, len(os.sched_getaffinity(0)) - 1)


def apply_intra_op_threads(setting: int | None) -> bool:
    """Set the pool for this process; False (and a warning) if TensorFlow had already started
    with another size (a process that trained before, e.g. a test session)."""
    want = intra_op_threads(setting)
    have = tf.config.threading.get_intra_op_parallelism_threads()
    if have == want:
        return True
    try:
        tf.config.threading.set_intra_op_parallelism_threads(want)
    except RuntimeError:
        log.warning("TensorFlow already runs %s intra-op threads in this process; "
                    "trainer.intra_op_threads (%d) applies to a fresh one", have or "its default",
                    want)
        return False
    log.info("TensorFlow intra-op threads: %d", want)
    return True
