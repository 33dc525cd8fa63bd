"""`twostep bench` on the offline worlds: arms (``arms``), readings (``reading``), tables and sections
(``report``), pictures (``figures``); the command itself is ``twostep/bench.py``."""
