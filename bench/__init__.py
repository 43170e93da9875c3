"""amaters benchmarks: a load generator on the Twisted client, reference servers, scenarios, reports.

``python -m bench --quick --out DIR`` runs every scenario in a short form; ``docs/benchmarks.md``
explains what each one measures.  Every number written comes from a measurement in the same run.
"""
