"""Imported first by the CLI, for its side effects on native libraries that read their
settings once, when they load.

- gRPC's C core is kept quiet below ERROR: otherwise it prints INFO lines (each failed TLS
  handshake, for one) that would break a command's one-line error. ``chunkstore node`` keeps
  them for its log; so does anyone who sets ``GRPC_VERBOSITY`` themselves.
- OpenBLAS (loaded with numpy) gets one thread: chunkstore does no linear algebra, and the
  idle pool of one thread per core otherwise spins for ~0.1 CPU-seconds after every start.

Both only set defaults: a variable already in the environment wins.
"""

import os
import sys

if sys.argv[1:2] != ["node"]:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
