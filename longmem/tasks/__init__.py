from longmem.tasks import longmem_language_modeling  # noqa: F401
