"""`python -m minigpt_cli` runs the same CLI as the `minigpt` console script."""

from minigpt_cli.cli.app import main

if __name__ == "__main__":
    main()
