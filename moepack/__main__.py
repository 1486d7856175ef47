"""`python -m moepack`: the command line (moepack/cli.py)."""

from moepack.cli import main

main(prog_name="moepack")
