"""Entry point of the kernel process: an IPython kernel plus a private resume listener.

The agent cannot reach into the kernel's memory, so the kernel process itself listens on a
Unix socket for the agent's "make yourself unique" request (new HMAC key, new session id,
fresh userspace generators) and answers with proof that it did so.

Usage: python -m forkvm_agent.kernel_launcher CONNECTION_FILE RESUME_SOCKET
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import socket
import sys
import threading
from typing import Any

import numpy

from forkvm_agent.agent_protocol import resume_proof


def reseed_python_generators() -> int:
    """Reseed every userspace generator a snapshot may have duplicated; returns how many.

    Forks of one snapshot share `random`'s state, numpy's global RandomState and any
    Generator created before the snapshot. The kernel CRNG has been re-keyed by the agent
    before this runs, so seeding from os.urandom gives each fork its own streams.
    """
    count = 0
    random.seed()
    numpy.random.seed()
    count += 2
    for obj in gc.get_objects():
        if isinstance(obj, random.Random) and obj is not random._inst:
            obj.seed()
            count += 1
        elif isinstance(obj, numpy.random.Generator):
            fresh = type(obj.bit_generator)()
            obj.bit_generator.state = fresh.state
            count += 1
        elif isinstance(obj, numpy.random.RandomState) and obj is not numpy.random.mtrand._rand:
            obj.seed()
            count += 1
    return count


class ResumeListener(threading.Thread):
    def __init__(self, path: str, session: Any) -> None:
        super().__init__(name="forkvm-resume", daemon=True)
        self._session = session
        if os.path.exists(path):
            os.unlink(path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        os.chmod(path, 0o600)
        self._server.listen(1)

    def run(self) -> None:
        while True:
            conn, _ = self._server.accept()
            with conn, conn.makefile("rwb") as stream:
                try:
                    answer = self._handle(json.loads(stream.readline()))
                except Exception as exc:  # the agent turns this into an ERROR frame
                    answer = {"error": f"{type(exc).__name__}: {exc}"}
                stream.write(json.dumps(answer).encode() + b"\n")
                stream.flush()

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        key = bytes.fromhex(request["key"])
        nonce = bytes.fromhex(request["nonce"])
        generators = reseed_python_generators()
        # Session.key's observer rebuilds the HMAC, so messages signed with the old key fail.
        self._session.key = key
        self._session.session = request["session"]
        return {
            "proof": resume_proof(self._session.key, nonce),
            "generators_reseeded": generators,
            "session": self._session.session,
            "python_random_digest": hashlib.sha256(repr(random.getstate()).encode()).hexdigest()[:16],
        }


def main() -> None:
    connection_file, resume_socket = sys.argv[1], sys.argv[2]
    from ipykernel.kernelapp import IPKernelApp

    # Generators made before the snapshot, which the resume must reseed (see template_state).
    from forkvm_agent import template_state  # noqa: F401

    app = IPKernelApp.instance()
    app.initialize(["-f", connection_file])
    ResumeListener(resume_socket, app.session).start()
    app.start()


if __name__ == "__main__":
    main()
