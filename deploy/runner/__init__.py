"""The experiment runner: a sweep's config, its deployments, the launcher
that starts their processes, ``make local`` / ``make serve``, and the report."""
