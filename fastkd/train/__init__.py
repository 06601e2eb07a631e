"""Training: ``setup`` builds a run's parts from its config, ``trainer`` runs the step and the fit,
``distributed`` holds the torchrun facts, ``artifacts`` writes metrics and the report, ``__main__`` is
``python -m fastkd.train``. Import the submodules (this package imports nothing, so that
``python -m fastkd.train`` runs its ``__main__`` once)."""
