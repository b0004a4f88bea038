"""The benchmark (``make bench``): overhead, pacing, polling and scale, each measured side by side in one run.

Every figure runs the engine against the package's own simulator, started in a separate process
(`bench.simproc`) so that the server's CPU is not charged to the client under test. ``python -m bench``
prints a table and writes ``bench/results.json``; ``--quick`` runs smaller sizes.
"""
