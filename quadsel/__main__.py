"""`python -m quadsel` is the `quadsel` command."""
from quadsel.jobs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
