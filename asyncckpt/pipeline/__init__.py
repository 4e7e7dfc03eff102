"""Write pipeline: staged chunks → concurrent shard writes → commit, on the engine's runtime.

``feed`` is the one loop that copies a plan's chunks into staging buffers (driven by both faces); ``writer``
writes shard files and reports what it wrote, publishing nothing; ``committer`` turns the plan and the writers'
results into a manifest, publishes it atomically and sweeps what no manifest names; ``jobs`` ties them together
per save; ``handles`` is what the caller holds.
"""
