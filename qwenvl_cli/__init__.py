"""The ``qwenvl`` command line: commands over ``qwenvl_core`` (models, data, local fine-tuning), a client of the REST
API (files, jobs, models, tenants, chat) and the embedded local stack (``up`` / ``down`` / ``status`` / ``demo``)."""
