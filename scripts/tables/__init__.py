"""The generators of the README results tables; shared machinery in :mod:`scripts.tables.common`."""
