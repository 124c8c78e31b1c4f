"""The smoke preset on smaller splits, for the tests that start whole `kdaudit run`
processes (interrupted, launched): a full run in about 15 s on a 2-core CPU."""

CONFIG = """\
[data]
n_members = 64
n_nonmembers = 64
n_public = 64
canaries_repeated = 2
canaries_once = 16
[pretrain]
epochs = 0.5
[teacher]
epochs = 2.0
checkpoint_every = 3
[audit]
signals = ["loss", "zlib", "mink", "ref_base", "blind"]
canary_candidates = 20
memorization_records = 24
utility_records = 24
"""
