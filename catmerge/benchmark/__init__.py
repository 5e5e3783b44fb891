"""The offline mini benchmark: tasks built from real images that ship inside PyPI packages."""
