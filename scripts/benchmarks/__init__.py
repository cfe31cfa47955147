"""kleinserve's benchmarks, run by ``scripts/bench`` as ``python -m scripts.benchmarks``.

    cli.py          the flags (``--help``), the run, the report; ``scripts/bench NAME`` runs
                    one of the measurements that stand on their own (below)
    plan.py         what a run measures and for how long (``Plan``), the batching files
    runner.py       ``Bench``: models, bodies, servers, children and one point of load
    sections/       one module per section, each a ``run(bench)``: inprocess, engine, http,
                    grpc, empty, flask, soak, memory
    without_http.py the inprocess and engine measurements, in a child process each
    models.py       the digits and MobileNetV2 models and their request bodies
    procs.py        memory of a process tree, wrk, the batching counters of /metrics
    report.py       ratios, tables and docs/benchmarks.md; plot.py its plot
    empty_app.py    the empty Klein route; flask_app.py  Flask under gunicorn
    images.py  swap.py  client.py  request_memory.py  memory_cycles.py  scaleout.py
                    measurements of their own: ``scripts/bench images|swap|client|
                    request-memory|memory-cycles|scaleout`` (scaleout_load.py: its load
                    generator; scaleout_model.py: its model; scaleout_report.py: its page)

Servers, ports and Consul agents come from ``harness/`` at the repository root, the same
code the tests and ``scripts/demo`` use. Nothing here asserts a timing.
"""
