"""service: the REST control plane (files, fine-tuning jobs, models, tenants, metadata DB, storage, scheduler).

The API process never imports torch: data validation runs in a child process (``validation_worker``), training on
Ray; only ``routes.chat`` (mounted in the serving ingress, not by ``create_app``) imports the serving engine.
Entry points: ``service.main.create_app(settings)`` and ``python -m service``.
"""
