"""The ``papa-merge`` command: a thin click shell over :mod:`merge`."""
