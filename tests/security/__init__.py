"""The standing adversarial suite: one module per class of multi-tenant defect (issue 15)."""
