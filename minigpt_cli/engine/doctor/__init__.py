"""`minigpt doctor`: the machine's checks (`checks.diagnose`) and a preset for it (`recommend`)."""
