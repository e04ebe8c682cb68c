"""service: the REST control plane (files, fine-tuning jobs, models, tenants, metadata DB, storage, scheduler).

It never imports torch: data validation runs in a child process (``validation_worker``), training on Ray.
Entry points: ``service.main.create_app(settings)`` and ``python -m service``.
"""
