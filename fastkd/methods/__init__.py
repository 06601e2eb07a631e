"""Distillation methods: one file per method plus the registry that builds the total loss."""
