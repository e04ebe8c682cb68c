"""service: the REST control plane (files, fine-tuning jobs, models, chat completions, tenants, storage).

Not built yet: see issue 5. It will never import torch; it talks to ``workflows`` job contracts.
"""
