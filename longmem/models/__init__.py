from longmem.models import newgpt  # noqa: F401
