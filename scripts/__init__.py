"""The repository's scripts, run from the root as ``python -m scripts.…`` by the shell
commands beside them (``bench``, ``demo``, ``export-demo-model``).

A regular package (not a namespace one) so that no installed ``scripts`` package can take
its place on ``sys.path``.
"""
