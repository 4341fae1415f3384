"""Generators that exist before the template snapshot, so tests can check forks get their own.

The kernel process imports this module before the snapshot is taken. Every fork therefore
starts with byte-identical copies of these objects; the resume handler
(kernel_launcher.reseed_python_generators, which finds them through gc) must reseed them.
A cell reaches them with ``from forkvm_agent import template_state``.

Nothing here reads /proc/sys/kernel/random/boot_id: Linux generates the boot id on first
read, so a read before the snapshot would give every fork the template's boot id.
"""

from __future__ import annotations

import random

import numpy

# A numpy Generator (PCG64) and a stdlib Random created in the template, before the snapshot.
rng = numpy.random.default_rng()
py_random = random.Random()
