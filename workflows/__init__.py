"""workflows: orchestration on Ray: fine-tune jobs on Ray Train (``finetune``), MLflow tracking (``tracking``), the
Ray Serve application (``serve_app``, and ``app``: the deployable one, with the control plane as its ingress).

Ray stays at the edges; the training loop and the engine live in
``qwenvl_core``.
"""
