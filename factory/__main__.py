"""`python -m factory` is the `factory` command."""
from factory.cli import app

app(prog_name="factory")
