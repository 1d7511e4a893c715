"""`minigpt doctor`: the checks (`checks.run_doctor`) and a preset for this machine."""
