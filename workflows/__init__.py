"""workflows: orchestration on Ray (fine-tune jobs on Ray Train, the Ray Serve application, evaluation).

Not built yet: see issues 4 and 6. Ray stays at the edges; the training loop and the engine live in
``qwenvl_core``.
"""
