"""The ``qwenvl`` command line: thin commands over ``qwenvl_core`` (and, later, the REST API)."""
