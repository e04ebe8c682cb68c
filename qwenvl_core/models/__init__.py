"""Model families of qwenvl_core (one sub-package per architecture)."""
