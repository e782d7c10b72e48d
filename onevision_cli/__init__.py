"""The `onevision` command line: the top of the house. It dispatches to plain functions in every layer
(`pipelines`, `components`, `serving`, `model`, `onevision`) and nothing of ours imports it
(tests/unit/test_import_direction.py keeps both true)."""
