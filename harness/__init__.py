"""Real processes on free loopback ports, for the tests, the demo and the benchmarks.

    ports.py      free_port: a loopback port free now that this process never handed out before
    twistd.py     TwistdServer: one ``twistd -n inference`` on a free port; start, wait ready,
                  talk, stop, and the check of its log for tracebacks nobody expected
    consul.py     ConsulAgent: a dev-mode Consul agent on free ports; start, stop, restart
    processes.py  Proc: any server command (twistd, gunicorn, a plain Klein app) as a process
                  group with its log file; wait ready, stop the group, stop_all on the way out
    netns.py  cluster.py  nginx.py
                  scripts/cluster (root only): hosts as network namespaces on one bridge, tc
                  on their links, a Consul server and an agent per host (``HostAgent``),
                  kleinserves, nginx with upstreams kept from Consul's health listing

Imported as ``harness`` from the repository root: pytest puts the root on ``sys.path``
(``pythonpath = .`` in setup.cfg) and scripts run as ``python -m scripts.…`` from the root.
Not part of the installed distribution: it drives the repository's own ``.venv`` and
``.tools`` (setup.cfg's package list leaves it out).
"""
