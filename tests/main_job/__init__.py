"""The main job (python -m main_job) and its report."""
