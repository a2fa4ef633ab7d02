"""The simulator's parts: virtual time and clocks (``clock``), the network (``network``), one node around
the real limiter core (``node``), a whole run (``world``), fault schedules (``schedule``), the bound a
schedule is judged against (``bound``), shrinking (``shrink``) and schedule files (``files``).
``workbench.run.simulate`` is the entry point."""
