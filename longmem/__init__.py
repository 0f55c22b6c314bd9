"""LongMem for fairseq: pass ``--user-dir longmem``; importing this package registers everything."""
from longmem import compat

compat.apply()

from longmem import models  # noqa: E402,F401  (registers newgpt and its archs)
