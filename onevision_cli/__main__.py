"""`python -m onevision_cli ...` is the `onevision` command."""

from onevision_cli.main import main

main()
