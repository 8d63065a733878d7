"""Imported first by the CLI, for its side effect: gRPC's C core quiet below ERROR.

The core reads ``GRPC_VERBOSITY`` once, when it loads, and otherwise prints INFO lines (each
failed TLS handshake, for one) that would break a command's one-line error. ``chunkstore
node`` keeps them for its log; so does anyone who sets ``GRPC_VERBOSITY`` themselves.
"""

import os
import sys

if sys.argv[1:2] != ["node"]:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
