"""The live dashboard: memory, speed, the plan, the expert cache and a per-block expert heat map
of one engine.

`Dashboard` (board.py) is one rich renderable: a fixed `Layout` of small views (views.py) that all
draw from the latest `Reading`; cells.py turns figures into characters, memory.py measures memory.
Figures come from the engine's stats stream (`LiveStats`), the telemetry and the expert cache; the
dashboard measures no speed itself.
"""

from .board import SAMPLE_SECONDS, Dashboard, Reading
from .cells import heat_rows, hottest, rate_bars, resident_cells, sparkline
from .memory import AcceleratorMemory, MemoryProbe, device_budgets

__all__ = ["SAMPLE_SECONDS", "AcceleratorMemory", "Dashboard", "MemoryProbe", "Reading", "device_budgets", "heat_rows",
           "hottest", "rate_bars", "resident_cells", "sparkline"]
