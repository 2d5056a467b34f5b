"""``python -m prisp``."""

from prisp.cli import main

main()
