"""HTTP routes, one module per resource; handlers are thin and call ``repository`` / ``storage``."""
