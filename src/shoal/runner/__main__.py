"""`python -m shoal.runner --spec-json J`: one rank of one instance (see process.py)."""

from shoal.runner.process import main

main()
