"""The ParM frontend: see docs/frontend.md and ``python -m services.frontend --help``."""
