"""The sections of ``scripts/bench`` (``--only``): each module's ``run(bench)`` measures one."""
