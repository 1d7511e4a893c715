"""The command line: one module a verb (`<verb>_cmd.py`), plus what several verbs share."""
