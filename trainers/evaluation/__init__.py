"""`odl eval`: the trainer's own model replayed over a time-ordered log beside plain peers.

``logs`` turns a log into rows, ``protocol`` replays them with each learner seeing labels when
the stream would reveal them, ``learners`` holds the contestants (ODL online / frozen / daily,
popularity, River, Vowpal Wabbit), ``report`` turns the scores into figures, a table and a PNG.
"""
