"""tidegate benchmarks: raw model ceilings, HTTP load with wrk, and a bare-Starlette baseline.

Run ``python -m bench.run_all`` (``make bench``). Never imported by the server.
"""
