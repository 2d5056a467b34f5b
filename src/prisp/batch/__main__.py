"""``python -m prisp.batch``: the batch commands on their own (the same ones ``prisp`` registers).

Handy for scripts and benchmarks that must not depend on the rest of the CLI.
"""

from __future__ import annotations

import typer

from prisp.batch.cli import export_app, personalize_batch_command

app = typer.Typer(help="Batch personalization and export.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
app.command("personalize-batch")(personalize_batch_command)
app.add_typer(export_app, name="export")

if __name__ == "__main__":  # the guard matters: worker processes re-import the main module
    app()
