"""Snapshot stage: walk a training state on the caller's thread, plan its bytes into chunks, copy them out.

``walk`` turns the state into the manifest's structure and a list of leaves (dispatching on each value's type);
``plan`` lays the leaves out into shards and chunks and copies one chunk at a time into a staging buffer, so a
state larger than the budget streams through it; ``devices`` and ``xla`` move bytes off accelerators.
"""
