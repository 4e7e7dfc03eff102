"""Load: find and validate a checkpoint's manifest, read its chunks with verification, rebuild or restore in place.

``manifest`` reads one checkpoint's manifest; ``reads`` reads and checks chunks; ``in_place`` streams them into a
target's own tensors; ``rebuild`` builds the saved structure; ``apply`` restores it into modules, optimizers and
tensors; ``verify`` checks everything without loading; ``catalog`` lists the committed checkpoints of a directory.
"""
