"""The only modules that touch foreign libraries' private names: one per library.

Each module's docstring lists every private name it uses and the version it was checked
against, so a library upgrade is one file to read, not a hunt through the package.
"""
